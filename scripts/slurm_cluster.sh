#!/usr/bin/env bash
# A throwaway two-node SLURM cluster on this one machine, for tests and .ci/run.
#
#   scripts/slurm_cluster.sh start|stop|status [--state-dir DIR]
#
# Everything (munge key and socket, slurm.conf, state, spool, pid and log files)
# lives in the state dir (default /tmp/swiftdist-slurm), so nothing under /etc
# is touched and clusters with different state dirs do not collide (their ports
# are derived from the state dir). Point the clients at it with the line that
# `start` prints on stdout:
#
#   export SLURM_CONF=<state-dir>/slurm.conf      (eval "$(slurm_cluster.sh start)")
#
# All other messages go to stderr, so that stdout can be eval'ed.
#
# The two nodes, n1 and n2, are two slurmd daemons (`slurmd -N`) reachable on
# 127.0.0.2 and 127.0.0.3 (the whole 127/8 range is on loopback). Each declares
# max(2, nproc) CPUs, so on a 2-core host the cluster promises 4 CPUs: that is
# deliberate, it lets a single-node job ask for `--cpus-per-task 2` (one
# torchrun with 2 processes) while a two-node job still gets 1 task per node.
# TaskPlugin=task/none does no CPU binding, so the overcommit only shares cores.
#
# Notes for job scripts run here (measured with this script):
# - Both nodes have the same hostname; `scontrol show hostnames` gives n1/n2,
#   which do not resolve. Take a node's address from
#   `scontrol show node n1` (NodeAddr=127.0.0.2), e.g. for MASTER_ADDR.
# - slurm 22.05's srun does not inherit --cpus-per-task from sbatch: pass
#   `srun --cpus-per-task "$SLURM_CPUS_PER_TASK"` (or SRUN_CPUS_PER_TASK) when
#   the step needs it.
# - `scontrol requeue` kills the running job (SIGTERM, KillWait=5 s, SIGKILL)
#   and the job starts again ~11 s later (AuthInfo cred_expire=10) with
#   SLURM_RESTART_COUNT=1; use `--open-mode=append` to keep the first log.
#
# Exit status: 0 on success. `status`: 0 all daemons up, 3 nothing running,
# 1 some daemons up and some not.
set -euo pipefail

readonly DEFAULT_STATE_DIR=/tmp/swiftdist-slurm
# Every daemon we start carries this variable with the state dir as its value;
# slurmstepd inherits slurmd's environment, so `stop` can find stray step
# daemons of this cluster (and only this cluster) after their slurmd is gone.
readonly MARKER=SWIFTDIST_SLURM_CLUSTER
readonly START_TIMEOUT_S=60
readonly NODES=(n1 n2)

log() { printf 'slurm_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
}

cmd="${1:-}"
[[ -n "$cmd" ]] || { usage; exit 2; }
shift
state_dir="$DEFAULT_STATE_DIR"
while (($#)); do
    case "$1" in
        --state-dir) [[ $# -ge 2 ]] || die "--state-dir needs a value"; state_dir="$2"; shift 2 ;;
        --state-dir=*) state_dir="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done
case "$cmd" in start|stop|status) ;; -h|--help) usage; exit 0 ;; *) usage; die "unknown command: $cmd" ;; esac

# SlurmUser=root and the package install need root; this is a container tool.
[[ "$(id -u)" -eq 0 ]] || die "must run as root (SlurmUser=root, apt-get)"

# An absolute path: it is compared against the marker in /proc/*/environ and
# written into slurm.conf, which the daemons read after changing directory.
state_dir="$(realpath -m -- "$state_dir")"
readonly conf="$state_dir/slurm.conf"
readonly run_dir="$state_dir/run"
readonly log_dir="$state_dir/log"
readonly munge_dir="$state_dir/munge"
readonly munge_socket="$munge_dir/munge.socket"
readonly munge_key="$munge_dir/munge.key"
readonly save_dir="$state_dir/state"
readonly spool_dir="$state_dir/spool"

# Ports derived from the state dir: two clusters (say, two test sessions) with
# different state dirs almost never share a port, and `start` refuses loudly if
# one is taken. 17000-18999 lies below the Linux ephemeral range, so outgoing
# connections cannot take them either.
port_base=$(( 17000 + ($(printf '%s' "$state_dir" | cksum | cut -d' ' -f1) % 400) * 5 ))
readonly ctld_port="$port_base"
node_port() { case "$1" in n1) echo $((port_base + 1)) ;; n2) echo $((port_base + 2)) ;; esac; }
node_addr() { case "$1" in n1) echo 127.0.0.2 ;; n2) echo 127.0.0.3 ;; esac; }

# The clients we call ourselves must read our config, whatever the caller has.
export SLURM_CONF="$conf"

# --- processes --------------------------------------------------------------

# pid_of NAME: the pid recorded in NAME's pid file, if that process is alive
# and is still the daemon (pids get reused, and a stale pid file must not make
# us report a running cluster or kill a stranger).
pid_of() {
    local name="$1" file comm pid
    case "$name" in
        munged) file="$run_dir/munged.pid"; comm=munged ;;
        slurmctld) file="$run_dir/slurmctld.pid"; comm=slurmctld ;;
        slurmd-*) file="$run_dir/$name.pid"; comm=slurmd ;;
    esac
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    # The pid file of another cluster's daemon cannot be ours: check the marker.
    grep -qzxF "$MARKER=$state_dir" "/proc/$pid/environ" 2>/dev/null || return 1
    echo "$pid"
}

daemons() { echo munged slurmctld; for n in "${NODES[@]}"; do echo "slurmd-$n"; done; }

# Every live process that carries this cluster's marker (daemons, slurmstepd),
# never this script or its ancestors.
marked_pids() {
    local env pid self_chain=" $$ " p="$$"
    while [[ "$p" -gt 1 ]]; do
        p="$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1)"
        self_chain+="$p "
    done
    for env in /proc/[0-9]*/environ; do
        pid="${env#/proc/}"; pid="${pid%/environ}"
        [[ "$self_chain" == *" $pid "* ]] && continue
        grep -qzxF "$MARKER=$state_dir" "$env" 2>/dev/null && echo "$pid"
    done
    return 0
}

# descendants PID...: all processes below the given ones (job processes that a
# killed slurmstepd would otherwise leave behind).
descendants() {
    local -a queue=("$@")
    local table p child
    table="$(ps -e -o pid=,ppid=)"
    while ((${#queue[@]})); do
        p="${queue[0]}"; queue=("${queue[@]:1}")
        while read -r child; do
            echo "$child"; queue+=("$child")
        done < <(awk -v pp="$p" '$2 == pp {print $1}' <<<"$table")
    done
}

# wait_gone TIMEOUT PID...: wait for the processes to exit; 1 if some remain.
wait_gone() {
    local deadline=$((SECONDS + $1)) p alive
    shift
    while :; do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# kill_and_wait GRACE PID...: SIGTERM, GRACE seconds, then SIGKILL.
kill_and_wait() {
    local grace="$1"
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    if ! wait_gone "$grace" "$@"; then
        log "still alive after SIGTERM, sending SIGKILL: $*"
        kill -KILL "$@" 2>/dev/null || true
        wait_gone 5 "$@" || die "could not kill: $*"
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- status -----------------------------------------------------------------

count_running() {
    local n=0 d
    for d in $(daemons); do pid_of "$d" >/dev/null && n=$((n + 1)); done
    echo "$n"
}

print_state() {
    local d pid
    {
        echo "state dir: $state_dir (slurmctld port $ctld_port)"
        for d in $(daemons); do
            if pid="$(pid_of "$d")"; then echo "  $d: running, pid $pid"; else echo "  $d: stopped"; fi
        done
        if pid_of slurmctld >/dev/null; then
            timeout 10 sinfo -N -o '  %10N %10t %5c %P' 2>&1 || echo "  (sinfo failed)"
        fi
    } >&2
}

print_logs() {
    local f
    for f in "$log_dir"/slurmctld.log "$log_dir"/slurmd-*.log "$log_dir"/munged.log; do
        [[ -f "$f" ]] || continue
        log "---- last lines of $f ----"
        tail -n 40 "$f" >&2
    done
}

# --- start ------------------------------------------------------------------

ensure_packages() {
    local missing=0 c
    for c in munged mungekey slurmctld slurmd sbatch srun squeue scontrol scancel sinfo; do
        command -v "$c" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "slurm/munge missing and no apt-get to install them"
    log "installing slurm-wlm and munge (apt-get)"
    # Non-interactive so a package's debconf questions cannot hang CI.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
}

write_conf() {
    local host cpus mem n
    host="$(hostname)"; host="${host%%.*}"
    # At least 2 CPUs per node so a single-node job can run a 2-process
    # torchrun; config_overrides keeps slurmd from draining a node whose
    # declared CPUs exceed what it detects.
    cpus="$(nproc)"; ((cpus >= 2)) || cpus=2
    # Half the machine's memory per node (memory is not a scheduled resource
    # with CR_Core; it only has to be a sane number).
    mem="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 / 2}' /proc/meminfo)"
    ((mem >= 1000)) || mem=1000
    cat >"$conf.tmp" <<EOF
# Written by scripts/slurm_cluster.sh; rewritten on every fresh start.
ClusterName=swiftdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start
# again (default 120 s); 10 s keeps requeue tests short while leaving a step
# launch on a loaded 2-core machine ample time to present its credential.
AuthInfo=socket=$munge_socket,cred_expire=10
StateSaveLocation=$save_dir
SlurmdSpoolDir=$spool_dir/slurmd-%n
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd-%n.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule within a second or two instead of the default minute.
SchedulerParameters=bf_interval=1,sched_interval=2
# A node that went down comes back by itself as soon as its slurmd registers.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL on cancel/timeout: keeps tests short.
KillWait=5
# Keep finished jobs visible in squeue/scontrol for 10 minutes.
MinJobAge=600
MailProg=/bin/true
# Batch jobs may be requeued (scontrol requeue, node failure).
JobRequeue=1
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
    for n in "${NODES[@]}"; do
        printf 'NodeName=%s NodeHostname=%s NodeAddr=%s Port=%s CPUs=%s Boards=1 SocketsPerBoard=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s State=UNKNOWN\n' \
            "$n" "$host" "$(node_addr "$n")" "$(node_port "$n")" "$cpus" "$cpus" "$mem" >>"$conf.tmp"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$conf.tmp"
    # Rename so a client in another shell never reads half a file.
    mv -f "$conf.tmp" "$conf"
}

start_munge() {
    if [[ ! -s "$munge_key" ]]; then
        mungekey --create --keyfile="$munge_key" 2>/dev/null \
            || dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$munge_key"
    rm -f "$munge_socket" "$munge_socket.lock"
    # --force: go on past the ownership/permission checks that munged would
    # otherwise treat as fatal for a key and socket outside /etc and /run.
    env "$MARKER=$state_dir" munged --force 9>&- \
        --socket="$munge_socket" --key-file="$munge_key" \
        --pid-file="$run_dir/munged.pid" --log-file="$log_dir/munged.log" \
        --seed-file="$munge_dir/munged.seed" \
        || { print_logs; die "munged did not start"; }
    local deadline=$((SECONDS + 10))
    until munge -n -S "$munge_socket" 2>/dev/null | unmunge -S "$munge_socket" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { print_logs; die "munged does not answer on $munge_socket"; }
        sleep 0.2
    done
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT_S)) states n want
    want="$(printf '%s idle\n' "${NODES[@]}")"
    while :; do
        states="$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
        [[ "$states" == "$want" ]] && return 0
        if ((SECONDS >= deadline)); then
            log "nodes not idle after ${START_TIMEOUT_S}s; sinfo says:"
            printf '%s\n' "${states:-(no answer)}" >&2
            print_logs
            return 1
        fi
        for n in slurmctld "${NODES[@]/#/slurmd-}"; do
            pid_of "$n" >/dev/null || { log "$n died during start"; print_logs; return 1; }
        done
        sleep 0.5
    done
}

do_start() {
    local t0=$SECONDS running n p
    running="$(count_running)"
    if [[ "$running" -eq 4 ]]; then
        log "already running"
        print_state
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    # Half a cluster (a daemon crashed, a machine reboot left pid files) is
    # restarted from scratch rather than patched.
    ((running == 0)) || { log "partly running ($running/4 daemons): restarting"; do_stop; }

    ensure_packages
    for p in "$ctld_port" "$(node_port n1)" "$(node_port n2)"; do
        ! port_in_use 127.0.0.1 "$p" || die "port $p is in use (another cluster or program?)"
    done
    # A fresh cluster every time: old jobs and node states would only confuse
    # the tests. The munge key is kept.
    rm -rf "$save_dir" "$spool_dir" "$run_dir" "$log_dir"
    mkdir -p "$save_dir" "$run_dir" "$log_dir" "$munge_dir"
    for n in "${NODES[@]}"; do mkdir -p "$spool_dir/slurmd-$n"; done
    # munged checks that its key and socket dirs are not writable by others.
    chmod 0700 "$state_dir" "$munge_dir"

    start_munge
    write_conf
    env "$MARKER=$state_dir" slurmctld -f "$conf" 9>&- || { print_logs; die "slurmctld did not start"; }
    for n in "${NODES[@]}"; do
        env "$MARKER=$state_dir" slurmd -f "$conf" -N "$n" 9>&- || { print_logs; die "slurmd $n did not start"; }
    done
    if ! wait_idle; then
        do_stop
        die "cluster did not come up (logs above)"
    fi
    # "idle" only means both slurmd registered with slurmctld; it says nothing
    # about whether a job can reach them. One tiny two-node step proves it.
    if ! timeout 30 srun --nodes 2 --ntasks-per-node 1 --job-name swiftdist-smoke \
            --time 1 true 9>&- >&2; then
        log "a two-node test step failed"
        print_logs
        do_stop
        die "cluster started but cannot run jobs (logs above)"
    fi
    log "started in $((SECONDS - t0))s"
    print_state
    echo "export SLURM_CONF=$conf"
}

# --- stop -------------------------------------------------------------------

do_stop() {
    local d pid
    local -a pids=() stray=() ids=()
    # Cancel jobs while slurmctld can still do it cleanly: it kills the job
    # processes, which a dead slurmd would leave behind.
    if pid_of slurmctld >/dev/null; then
        mapfile -t ids < <(timeout 10 squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null || true)
        if ((${#ids[@]})); then
            log "cancelling jobs: ${ids[*]}"
            timeout 10 scancel "${ids[@]}" 2>/dev/null || true
            local deadline=$((SECONDS + 20))
            while [[ -n "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null || true)" ]] && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    # slurmd first, so that no node reports to slurmctld while it shuts down.
    for d in "${NODES[@]/#/slurmd-}" slurmctld munged; do
        if pid="$(pid_of "$d")"; then pids+=("$pid"); fi
    done
    if ((${#pids[@]})); then
        log "stopping daemons: ${pids[*]}"
        kill_and_wait 15 "${pids[@]}"
    fi
    # Anything left with our marker (slurmstepd of jobs that would not die),
    # and the job processes below it.
    mapfile -t stray < <(marked_pids)
    if ((${#stray[@]})); then
        mapfile -t -O "${#stray[@]}" stray < <(descendants "${stray[@]}")
        log "killing leftover processes: ${stray[*]}"
        # slurmstepd shrugs off SIGTERM: a short grace before SIGKILL.
        kill_and_wait 3 "${stray[@]}"
    fi
    rm -f "$run_dir"/*.pid
}

# --- main -------------------------------------------------------------------

if [[ "$cmd" == status ]]; then
    [[ -d "$state_dir" ]] || { log "not running (no $state_dir)"; exit 3; }
    running="$(count_running)"
    print_state
    if ((running == 4)); then echo "export SLURM_CONF=$conf"; exit 0; fi
    ((running == 0)) && exit 3
    exit 1
fi

if [[ "$cmd" == stop && ! -d "$state_dir" ]]; then
    log "not running (no $state_dir)"
    exit 0
fi

mkdir -p "$state_dir"
# One start/stop at a time per state dir: tests in parallel shells may call
# `start` together, and the second must find the first one's cluster.
# Every daemon is started with 9>&-: one that inherited fd 9 would hold the
# lock for as long as it runs.
exec 9>"$state_dir/lock"
flock -w 180 9 || die "timed out waiting for the lock on $state_dir/lock"

case "$cmd" in
    start) do_start ;;
    stop) do_stop; log "stopped" ;;
esac

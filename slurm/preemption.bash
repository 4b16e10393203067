# Stopping. SLURM asks a job to stop in two ways.
# - USR1 reaches this shell alone (`--signal=B:USR1@<s>` before the time limit, or a preemption:
#   `scancel --signal=USR1 --batch`). The shell passes it on to the launcher, once: srun forwards
#   USR1 to its tasks unchanged (TERM it would answer by SIGKILLing them), and torchrun forwards it
#   to its workers and kills them only --shutdown-timeout (= --signal-seconds) later. The trainer
#   saves at the next step boundary and exits 143, and the job requeues itself.
# - TERM (scancel, the time limit, a preemption without warning) reaches every process of the job
#   at once, torchrun included, so it is not passed on: a second signal makes torchrun give up its
#   wait for the workers. It leaves the job cancelled, unless a USR1 came before it (the
#   scheduler's kill after a preemption warning): then the job still requeues.
requeue=""
stopping=""
usr1_pending=""
launcher_pid=""
pass_usr1_on() {
    [[ -n "$usr1_pending" && -n "$launcher_pid" ]] || return 0
    usr1_pending=""
    kill -USR1 "$launcher_pid" 2>/dev/null
}
stop_training() {
    local what="the job is stopping"
    if [[ -z "$stopping" && "$1" == USR1 ]]; then
        usr1_pending=yes
        what="asking the training to checkpoint and stop"
    fi
    stopping=yes
    [[ "$1" != USR1 ]] || requeue=yes
    echo "swiftdist: $(date +%s.%N) SIG$1: $what${requeue:+; the job will requeue}"
    pass_usr1_on
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

echo "swiftdist: $(date +%s.%N) job $SLURM_JOB_ID starts on $(hostname), SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
"${launch[@]}" &
launcher_pid=$!
pass_usr1_on  # a USR1 that came before the launcher's pid was known
# A trapped signal ends `wait` early while the launcher still runs; bash keeps
# the exit status, so the last `wait` reads the real one.
while kill -0 "$launcher_pid" 2>/dev/null; do wait "$launcher_pid"; done
wait "$launcher_pid"
rc=$?
echo "swiftdist: $(date +%s.%N) training exited with $rc"

if [[ "$rc" -ne 0 && -n "$requeue" ]]; then
    echo "swiftdist: $(date +%s.%N) requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"

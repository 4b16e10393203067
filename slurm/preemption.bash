# Stopping. A stop reaches this shell as USR1 (`--signal=B:USR1@<s>` before the time limit, or a
# preemption: `scancel --signal=USR1 --batch`) or as TERM (scancel, the time limit). Either way
# the training gets USR1, once: srun passes USR1 on to its tasks unchanged (TERM would make it
# SIGKILL them), and torchrun forwards it to its workers and kills them only --shutdown-timeout
# (= --signal-seconds) later. The trainer saves at the next step boundary and exits 143. A second
# signal is not passed on: torchrun would give up that wait and leave the save to be killed.
# Requeue: a USR1 requeues the job, which resumes from the newest checkpoint, also when a TERM
# follows (the scheduler's kill after a preemption warning). A TERM alone leaves it cancelled.
requeue=""
stopping=""
passed_on=""
launcher_pid=""
pass_stop_on() {
    [[ -n "$launcher_pid" && -z "$passed_on" ]] || return 0
    passed_on=yes
    kill -USR1 "$launcher_pid" 2>/dev/null
}
stop_training() {
    [[ "$1" == USR1 ]] && requeue=yes
    if [[ -n "$stopping" ]]; then
        echo "swiftdist: $(date +%s.%N) SIG$1: the training is already stopping${requeue:+; the job will requeue}"
        return
    fi
    stopping=yes
    echo "swiftdist: $(date +%s.%N) SIG$1: asking the training to checkpoint and stop"
    pass_stop_on
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

echo "swiftdist: $(date +%s.%N) job $SLURM_JOB_ID starts on $(hostname), SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
"${launch[@]}" &
launcher_pid=$!
[[ -z "$stopping" ]] || pass_stop_on  # a stop that came before the launcher's pid was known
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

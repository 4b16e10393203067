# USR1 comes from `--signal=B:USR1@<s>` before the time limit or from
# `scancel --signal=USR1 --batch` (preemption): the training checkpoints and the
# job requeues itself. TERM comes from scancel or the time limit itself: the
# training still checkpoints, but the job must stay cancelled, so no requeue.
# torchrun forwards SIGTERM to its workers (srun to its tasks) and waits for
# them; the trainer saves at the next step boundary and exits 143.
signal_received=""
stop_training() {
    signal_received="$1"
    echo "swiftdist: $(date +%s.%N) SIG$1: asking the training to checkpoint and stop"
    kill -TERM "$launcher_pid" 2>/dev/null
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

echo "swiftdist: $(date +%s.%N) job $SLURM_JOB_ID starts on $(hostname), SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
"${launch[@]}" &
launcher_pid=$!
# A trapped signal ends `wait` early while the launcher still runs; bash keeps
# the exit status, so the last `wait` reads the real one.
while kill -0 "$launcher_pid" 2>/dev/null; do wait "$launcher_pid"; done
wait "$launcher_pid"
rc=$?
echo "swiftdist: $(date +%s.%N) training exited with $rc"

if [[ "$rc" -ne 0 && "$signal_received" == USR1 ]]; then
    echo "swiftdist: $(date +%s.%N) requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"

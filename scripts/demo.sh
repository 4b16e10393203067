#!/usr/bin/env bash
# The README demo: set up, ask SmolLM2-135M-Instruct who it is, teach it a new identity with a
# 2-rank DDP LoRA run on CPU (configs/demo.yaml), ask again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
NPROC="${NPROC:-2}"
OUT="${OUT:-output/demo}"
QUESTIONS=(--prompt "Who are you?" --prompt "你是谁？" --prompt "What is the capital of France?")

echo "=== before fine-tuning ==="
swiftdist infer --model smollm2 "${QUESTIONS[@]}"

echo "=== fine-tuning: torchrun --nproc-per-node $NPROC, LoRA, DDP, CPU ==="
rm -rf "$OUT"
start=$SECONDS
torchrun --nproc-per-node "$NPROC" -m swiftdist.sft --config configs/demo.yaml --output-dir "$OUT" "$@"
echo "fine-tuning took $((SECONDS - start)) s"

echo "=== after fine-tuning (adapter: $OUT/final) ==="
swiftdist infer --model smollm2 --adapter "$OUT/final" "${QUESTIONS[@]}"
echo "loss curve: $OUT/loss.png, metrics: $OUT/metrics.jsonl"

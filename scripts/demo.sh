#!/usr/bin/env bash
# The README demo: set up, ask SmolLM2-135M-Instruct who it is, teach it a new identity with a
# 2-rank DDP LoRA run on CPU (configs/demo.yaml), ask again, then serve the adapter over an
# OpenAI-compatible API and ask it through the official openai client.
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

PORT="${PORT:-8000}"
echo "=== serving the adapter as model 'tidewater' on http://127.0.0.1:$PORT/v1, asking through the openai client ==="
swiftdist serve --model smollm2 --adapter "tidewater=$OUT/final" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" || true' EXIT
health="import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)"
until python -c "$health" 2>/dev/null; do  # the server answers once the model is loaded
    kill -0 "$SERVER" 2>/dev/null || { echo "swiftdist serve exited; see $OUT/serve.log" >&2; exit 1; }
    sleep 1
done
python - "$PORT" <<'PY'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="not-needed")
reply = client.chat.completions.create(model="tidewater", temperature=0,
                                       messages=[{"role": "user", "content": "Who are you?"}])
print(f"Q: Who are you?\nA: {reply.choices[0].message.content}")
PY

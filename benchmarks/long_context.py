"""Long context on CPU: per-rank peak memory of SmolLM2 LoRA at long sequences, side by side in one run.

    python -m benchmarks.long_context --lengths 4096 8192 --out bench-long

For each length: one sequence of that many tokens (a synthetic conversation, most of it the
assistant's, so most positions are labelled), batch 1, 2 steps, fp32. Runs, each its own torchrun:
- SP=1 on one rank with today's whole-loss (--loss-chunk-size 0) and with the chunked loss;
- SP=N on N ranks (N = the largest sequence-parallel size the model's head counts allow, up to
  --max-sp), chunked loss.
Peak memory is each rank's ru_maxrss (all ranks of a run are symmetric; rank 0's is reported),
which includes the weights every rank holds (ddp); the ratios are against SP=1 with the chunked loss.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conversation(tokens: int) -> dict:
    words = " ".join(f"word{i % 97}" for i in range(tokens))  # ~1 token per word piece pair
    return {"messages": [{"role": "user", "content": "Repeat the list."},
                         {"role": "assistant", "content": words}]}


def run(model: str, data: Path, out: Path, length: int, sp: int, chunk: int) -> dict:
    args = ["--model", model, "--dataset", str(data), "--max-length", str(length), "--batch-size", "1",
            "--max-steps", "2", "--precision", "fp32", "--sequence-parallel", str(sp), "--loss-chunk-size", str(chunk),
            "--lora-dropout", "0", "--output-dir", str(out), "--save-total-limit", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={sp}", f"--master-port={free_port()}",
           "-m", "swiftdist.sft", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        reasons = [line for line in proc.stderr.splitlines() if "exitcode" in line or "Error" in line]
        return {"error": reasons[-1].strip() if reasons else f"exit {proc.returncode}"}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"peak_gib": max(s["peak_mem_gib"] for s in steps), "step_s": steps[-1]["step_s"], "loss": steps[0]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--max-sp", type=int, default=3)
    p.add_argument("--out", default="bench-long")
    ns = p.parse_args()
    from swiftdist.model import load_model_config, resolve_model_path

    cfg = load_model_config(resolve_model_path(ns.model), False)
    sp = max(n for n in range(1, ns.max_sp + 1)
             if cfg.num_attention_heads % n == 0 and cfg.num_key_value_heads % n == 0)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in ns.lengths:
            data = Path(tmp) / f"long-{length}.jsonl"
            data.write_text(json.dumps(conversation(length)) + "\n")
            runs = {"SP=1, whole loss": (1, 0), "SP=1, chunked loss": (1, 1024), f"SP={sp}, chunked loss": (sp, 1024)}
            results = {name: run(ns.model, data, Path(tmp) / f"{length}-{i}", length, n, chunk)
                       for i, (name, (n, chunk)) in enumerate(runs.items())}
            base = results["SP=1, chunked loss"].get("peak_gib")
            for name, r in results.items():
                rows.append({"tokens": length, "run": name, **r,
                             "x_sp1_chunked": r["peak_gib"] / base if base and "peak_gib" in r else None})
                print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Long context on CPU: {ns.model} LoRA, fp32, batch 1, peak RSS of rank 0 (GiB)", "",
             "| tokens | run | peak GiB | x SP=1 chunked | s/step | step-1 loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['run']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['tokens']} | {r['run']} | {r['peak_gib']:.2f} | {r['x_sp1_chunked']:.2f} | "
                         f"{r['step_s']:.1f} | {r['loss']:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

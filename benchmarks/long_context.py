"""Long context on CPU: per-rank peak memory of SmolLM2 LoRA at long sequences, side by side in one run.

    python -m benchmarks.long_context --lengths 4096 8192 --out bench-long
    python -m benchmarks.long_context --lengths 8192 --gradient-checkpointing --out bench-long-8k

For each length: one sequence of that many tokens (a synthetic conversation, most of it the
assistant's, so most positions are labelled), batch 1, `--steps` steps, fp32. Runs, each its own torchrun:
- SP=1 on one rank with today's whole-loss (--loss-chunk-size 0) and with the chunked loss;
- SP=N on N ranks (N = the largest sequence-parallel size the model's head counts allow, up to
  --max-sp), chunked loss.
`--gradient-checkpointing` turns it on for every run. Peak memory is each rank's ru_maxrss (all
ranks of a run are symmetric; rank 0's is reported), which includes the weights every rank holds
(ddp) and the libraries; the ratios are against SP=1 with the chunked loss. Beside it, `swiftdist
estimate`'s total per rank for the same run (tensors only). The ranks of a run share this machine's
memory: a run whose predicted peak RSS over all its ranks is above `--max-host-gib` is not started,
and its row says so with the prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CHUNK = 1024
# Peak RSS per rank, predicted as the libraries + the estimate (tensors autograd holds) + what glibc
# keeps of the freed per-token temporaries of forward and backward, per token on the rank. Fitted to
# the runs here as an upper bound: 4096 tokens without checkpointing (SP=1 whole 12.07 GiB predicted
# 12.8, chunked 10.16 / 12.3, SP=3 4.84 / 4.9) and 8192 with it (SP=1 whole 10.94 / 10.9, chunked
# 8.18 / 9.6); an 8192-token SP=3 rank without checkpointing (predicted 8.4) had reached 7.0 GiB when
# the OOM killer stopped it.
LIBRARIES_GIB, HEAP_MIB_PER_TOKEN = 1.1, 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conversation(tokens: int) -> dict:
    words = " ".join(f"word{i % 97}" for i in range(tokens))  # ~1 token per word piece pair
    return {"messages": [{"role": "user", "content": "Repeat the list."},
                         {"role": "assistant", "content": words}]}


def estimated_gib(model: str, length: int, sp: int, chunk: int, checkpointing: bool) -> float:
    """`swiftdist estimate`'s total per rank (ddp, fp32, LoRA) for one run: each rank holds 1/sp of the tokens."""
    from swiftdist.config import ModelConfig
    from swiftdist.memory import estimate, model_stats

    cfg = ModelConfig(train_type="lora", lora_dropout=0.0, gradient_checkpointing=checkpointing)
    stats = model_stats(model, cfg, "fp32", math.ceil(length / sp), 1, chunk)
    parts = estimate(stats, "ddp", sp)
    return (parts["total"] + parts["host"]) / 2**30  # on CPU the host is the same memory


def run(model: str, data: Path, out: Path, length: int, sp: int, chunk: int, steps: int, checkpointing: bool) -> dict:
    args = ["--model", model, "--dataset", str(data), "--max-length", str(length), "--batch-size", "1",
            "--max-steps", str(steps), "--precision", "fp32", "--sequence-parallel", str(sp),
            "--loss-chunk-size", str(chunk), "--lora-dropout", "0", "--output-dir", str(out), "--save-total-limit", "0"]
    if checkpointing:
        args += ["--gradient-checkpointing", "true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={sp}", f"--master-port={free_port()}",
           "-m", "swiftdist.sft", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        reasons = [line for line in proc.stderr.splitlines() if "exitcode" in line or "Error" in line]
        return {"error": reasons[-1].strip() if reasons else f"exit {proc.returncode}"}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"peak_gib": max(s["peak_mem_gib"] for s in steps), "step_s": steps[-1]["step_s"], "loss": steps[0]["loss"]}


def table(rows: list[dict], title: str) -> list[str]:
    lines = [title, "", "| tokens | run | peak GiB | x SP=1 chunked | estimate GiB | s/step | step-1 loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = f"{r['est_gib']:.2f}"
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['run']} | failed: {r['error']} | | {est} | | |")
        elif "skipped" in r:
            lines.append(f"| {r['tokens']} | {r['run']} | not run: {r['skipped']} | | {est} | | |")
        else:
            ratio = f"{r['x_sp1_chunked']:.2f}" if r["x_sp1_chunked"] is not None else ""
            lines.append(f"| {r['tokens']} | {r['run']} | {r['peak_gib']:.2f} | {ratio} | {est} | "
                         f"{r['step_s']:.1f} | {r['loss']:.4f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--max-sp", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true", help="on for every run")
    p.add_argument("--max-host-gib", type=float, default=18.0,
                   help="a run whose predicted peak RSS over all its ranks is above this is not started")
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
            runs = {"SP=1, whole loss": (1, 0), "SP=1, chunked loss": (1, CHUNK), f"SP={sp}, chunked loss": (sp, CHUNK)}
            results = {}
            for i, (name, (n, chunk)) in enumerate(runs.items()):
                est = estimated_gib(ns.model, length, n, chunk, ns.gradient_checkpointing)
                rss = LIBRARIES_GIB + est + HEAP_MIB_PER_TOKEN * math.ceil(length / n) / 1024
                if rss * n > ns.max_host_gib:
                    results[name] = {"est_gib": est, "skipped": f"predicted peak RSS {rss:.1f} GiB x {n} rank(s) "
                                                                f"> {ns.max_host_gib:g} GiB"}
                else:
                    results[name] = {"est_gib": est, **run(ns.model, data, Path(tmp) / f"{length}-{i}", length, n,
                                                           chunk, ns.steps, ns.gradient_checkpointing)}
            base = results["SP=1, chunked loss"].get("peak_gib")
            for name, r in results.items():
                rows.append({"tokens": length, "run": name, "gradient_checkpointing": ns.gradient_checkpointing, **r,
                             "x_sp1_chunked": r["peak_gib"] / base if base and "peak_gib" in r else None})
                print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    title = (f"# Long context on CPU: {ns.model} LoRA, fp32, batch 1, {ns.steps} steps"
             f"{', gradient checkpointing' if ns.gradient_checkpointing else ''}, peak RSS of rank 0 (GiB)")
    lines = table(rows, title)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

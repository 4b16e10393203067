"""`python -m benchmarks.run --suite cpu|gpu [options]`: run a suite, write results.md + results.json.

    python -m benchmarks.run --suite cpu --model smollm2 --steps 10 --repeats 2 --out bench-out
    python -m benchmarks.run --suite gpu --out bench-gpu          # needs CUDA; see benchmarks/README.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.spec import BenchSpec

CPU_COLUMNS = [("contender", "contender"), ("procs", "procs"), ("step_s", "s/step (median)"),
               ("ratio", "× reference"), ("reference", "reference"), ("peak_rss_gib", "peak RSS/rank GiB"),
               ("tensor_gib", "tensors/rank GiB"), ("est_states_gib", "estimate: states/rank GiB"),
               ("est_total_gib", "estimate: + activations GiB"), ("loss_first", "loss step 1"),
               ("loss_last", "loss last"), ("status", "status")]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["cpu", "gpu"], required=True)
    p.add_argument("--model", default=None, help="cpu: smollm2 (default) or tiny-llama; gpu: see --gpu-models")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per contender run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all contenders (ratios: median over rounds)")
    p.add_argument("--procs", type=int, default=2, help="cpu: ranks for the multi-process contenders (1: none)")
    p.add_argument("--train-type", choices=["lora", "full"], default="lora",
                   help="cpu: LoRA (default) or full fine-tuning, where weights, grads and AdamW state dominate memory")
    p.add_argument("--gpus", type=int, default=1, help="gpu: GPUs (ranks, DDP) per run")
    p.add_argument("--strategies", nargs="*", default=None, help="swiftdist strategies to include (default: all that accept the job)")
    p.add_argument("--gpu-models", nargs="*", default=None, help="gpu: subset of the built-in configs")
    p.add_argument("--train-types", nargs="*", default=["lora", "qlora"], help="gpu: train types to run")
    p.add_argument("--seq", type=int, default=2048, help="gpu: sequence length (packed rows)")
    p.add_argument("--peak-tflops", type=float, default=None, help="gpu: the card's dense bf16 peak, if not in the built-in table")
    p.add_argument("--ms-swift-python", default=os.environ.get("MS_SWIFT_PYTHON"),
                   help="cpu: the python of an environment with ms-swift, to add it as a contender "
                        "(default: $MS_SWIFT_PYTHON; benchmarks/README.md says how to make one)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one contender run may take")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    return p.parse_args(argv)


def cpu_suite(args) -> int:
    from benchmarks import cpu_suite
    from swiftdist.model import resolve_precision

    model = args.model or "smollm2"
    spec = BenchSpec(model=model, train_type=args.train_type, steps=args.steps, precision=resolve_precision("auto"),
                     # Exactly one epoch's worth of rows: no contender hits a short last step.
                     dataset=[f"self-cognition#{args.steps * 8}"], global_batch=8)
    rows, verdicts = cpu_suite.run(spec, args.out, args.procs, args.repeats, args.warmup, args.strategies, args.timeout,
                                   args.ms_swift_python)
    notes = verdicts + [
        "Ratios are step time over the reference's in the same round (median over rounds); reference = "
        "the hand-written loop with the same number of processes.",
        "The same job, not the same kernels: swiftdist computes logits at labelled positions only and, on CPU "
        "with rows of at most 256 tokens, picks eager attention (faster than sdpa's CPU kernels there); the "
        "hand-written loop and HF Trainer compute every position's logits, ms-swift those from the batch's first "
        "labelled column on (its use_logits_to_keep), all three with sdpa, as their users get by default. So a "
        "swiftdist ratio below 1 is less work done, not less overhead.",
        "s/step: swiftdist = the trainer's step_s (batch fetch to optimizer step); hand-written loop = the same span; "
        "HF Trainer and ms-swift = interval between step ends (their callbacks and logging included).",
        "peak RSS/rank: each process's ru_maxrss; tensors/rank: CPU tensor storages the process holds after its last "
        "step (weights, optimizer state, gradient buffers) - on CPU the figure that shows sharding (RSS does not).",
        "estimate: `swiftdist estimate` for the same job (seq 128: the longest self-cognition row is 112 tokens); "
        "states = weights + grads + optimizer, comparable to tensors/rank; RSS adds the Python/torch runtime.",
        "Measured on a shared machine: absolute times are noisy, compare the ratios.",
    ]
    meta = {"model": model, "train_type": spec.train_type, "precision": spec.precision, "global_batch": spec.global_batch,
            "steps": args.steps, "warmup_steps_excluded": args.warmup, "repeats": args.repeats,
            "cpu_threads_total": os.cpu_count(), "torch": torch.__version__}
    md, js = report.write(args.out, f"swiftdist CPU benchmark ({model}, {args.train_type})", CPU_COLUMNS, rows, notes, meta)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.suite == "cpu":
        return cpu_suite(args)
    from benchmarks import gpu_suite

    return gpu_suite.main(args)


if __name__ == "__main__":
    sys.exit(main())

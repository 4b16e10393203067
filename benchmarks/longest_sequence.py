"""The longest sequence a model trains at on one device, found in one process (the model loads once).

    python -m benchmarks.longest_sequence SPEC.json RUN_DIR --start 8192 --deadline-s 200 [--card-gib 24] [-- SFT_FLAG ...]

The job is the spec's (benchmarks/spec.py: model, train type, precision, checkpointing) under ddp on
one rank, plus SFT_FLAGs (e.g. --activation-offload true --loss-chunk-size 1024); the trainer is
built from them as `swiftdist sft` builds it (its data is not used). Then, from
`--start`, each length gets one training step (forward, backward, optimizer step) on one row of
that many random tokens, all labelled (the loss's worst case, which `swiftdist estimate` counts too),
and the length doubles while the step fits in memory. After the first that does not, one bisection
step between the two, rounded to 1024 tokens. A length is tried only while the deadline leaves room
for it: its step is predicted at 3x the last one's for twice the tokens (attention grows with their
square), 2x for the bisection. `--max-tokens` stops the doubling (the CPU dry run's bound).

`--card-gib` caps the caching allocator (torch.cuda.set_per_process_memory_fraction) to what a
smaller card holds, e.g. the 24 GB workstation cards of issue 14, on a larger one; what CUDA itself
takes outside the allocator (context, NCCL) is not in the cap, so a real card of that size has
~0.5-1 GiB less. RUN_DIR/rank0.json (benchmarks/runner.py reads it) is rewritten after every
length, so a stopped run keeps what it found.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.spec import BenchSpec
from swiftdist.config import parse_config
from swiftdist.data import Sample, collate
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.loss import target_count
from swiftdist.trainer import Trainer

GRAIN = 1024


def train_step(trainer: Trainer, tokens: int, vocab: int) -> dict:
    """One step on one row of `tokens` random ids; the step's time and device memory peak."""
    strategy, device = trainer.strategy, trainer.dist.device
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    batch = collate([Sample(ids, ids, list(range(tokens)), [0])], trainer.tokenizer.pad_token_id, packed=False)
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    error = None
    t0 = time.perf_counter()
    try:
        loss = strategy.forward_backward([batch], target_count(batch).float(), [0])
        strategy.clip_grad_norm(1.0)
        strategy.step(1e-5)
        loss = loss.item()  # waits for the device
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        error = str(e).splitlines()[0][:200]
    # What an out-of-memory step left (partial gradients, cached blocks) must not count against the
    # next length. (Outside the except clause: by now the exception and its frames are released.)
    strategy.optimizer.zero_grad(set_to_none=True)
    del batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if error:
        return {"tokens": tokens, "ok": False, "error": error}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"tokens": tokens, "ok": True, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "max_memory_allocated_gib": peak, "loss": loss}


def search(step, start: int, max_tokens: int, deadline: float, write) -> dict:
    """`step(tokens)` -> train_step's record; `write(result)` after every length."""
    tried: list[dict] = []
    result = {"tried": tried, "longest": None, "stopped": None}

    def fits_in_time(factor: float) -> bool:
        last = next(t["step_s"] for t in reversed(tried) if t["ok"])
        return time.monotonic() + factor * last < deadline

    length, failed = start, None
    while True:  # doubling
        tried.append(step(length))
        if tried[-1]["ok"]:
            result["longest"] = length
        write(result)
        if not tried[-1]["ok"]:
            failed = length
            break
        if 2 * length > max_tokens:
            result["stopped"] = f"reached --max-tokens {max_tokens}"
            break
        if not fits_in_time(3):
            result["stopped"] = "time: the next length would not finish before the deadline"
            break
        length *= 2
    if failed is not None:
        result["stopped"] = f"out of memory at {failed} tokens"
        low = result["longest"]
        middle = (low + failed) // 2 // GRAIN * GRAIN if low else 0
        if low and low < middle < failed:
            if fits_in_time(2):
                tried.append(step(middle))
                if tried[-1]["ok"]:
                    result["longest"] = middle
                else:
                    result["stopped"] = f"out of memory at {middle} tokens"
            else:
                result["stopped"] += f"; no time left for the bisection at {middle}"
    write(result)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.longest_sequence", description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=1 << 20)
    p.add_argument("--deadline-s", type=float, default=300, help="seconds from here on: the model load counts")
    p.add_argument("--card-gib", type=float, default=0, help="cap device memory to this (0: the whole card)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = p.parse_args(argv[:split]), argv[split + 1:]
    deadline = time.monotonic() + args.deadline_s
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        if args.card_gib and dist_info.device.type == "cuda":
            total = torch.cuda.get_device_properties(dist_info.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib * 2**30 / total), dist_info.device)
        argv = BenchSpec.load(args.spec).swiftdist_argv("ddp", 1, str(args.run_dir / "output"))
        trainer = Trainer(parse_config(argv + flags), dist_info)
        trainer.strategy.model.train()
        vocab = len(trainer.tokenizer)  # ids every model here embeds (random models share SmolLM2's tokenizer)

        def write(result: dict) -> None:
            # Whole or not at all: the check reads it even after stopping this process mid-search.
            tmp = args.run_dir / "rank0.json.tmp"
            tmp.write_text(json.dumps({**result, "card_gib": args.card_gib or None}, indent=1))
            tmp.replace(args.run_dir / "rank0.json")

        search(lambda tokens: train_step(trainer, tokens, vocab), args.start, args.max_tokens, deadline, write)
    finally:
        destroy()


if __name__ == "__main__":
    main()

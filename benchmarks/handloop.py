"""The reference: a minimal hand-written PyTorch loop (the floor for framework overhead).

`python -m benchmarks.handloop SPEC.json RUN_DIR`, or under torchrun for plain DDP over gloo.
AdamW, warmup + cosine, clipping and bf16 autocast, nothing else: no logging, no checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.probe import report
from benchmarks.spec import BenchSpec, peer_model
from swiftdist.data import StepSampler, collate


def main(spec_path: str, run_dir: str) -> None:
    spec = BenchSpec.load(spec_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model, tokenizer, train = peer_model(spec)
    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=spec.betas)
    warmup = max(1, round(spec.warmup_ratio * spec.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * max(0, s + 1 - warmup) / max(1, spec.steps - warmup)))))
    # The same per-step sample indices swiftdist's trainer draws, so both see identical batches.
    sampler = StepSampler(len(train), spec.seed, spec.micro_batch(world), 1, rank, world)
    step_s, losses = [], []
    for step in range(spec.steps):
        t0 = time.perf_counter()
        # One epoch holds every step (the suite sizes the dataset so), so no short last step.
        ((_, indices),) = sampler.step_indices(0, step * spec.global_batch, len(train))
        batch = collate([train[i] for i in indices], tokenizer.pad_token_id, spec.packing)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = net(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    report(run_dir, step_s, losses)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

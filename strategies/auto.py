"""`--strategy auto`: the cheapest strategy whose memory estimate fits the devices of this run.

Strategies are tried from fastest to leanest (PREFERENCE: no sharding, then sharded gradients and
optimizer, then sharded parameters, then offload); the first that is not refused and whose
estimated peak (swiftdist.memory) fits in the device memory (with headroom) runs. The reasoning is logged.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from swiftdist.errors import SwiftdistError
from swiftdist.strategies.base import Strategy

log = logging.getLogger("swiftdist")
# Cheapest (fastest) first: offloading and gathering cost time. Not megatron: it needs a --tp/--pp
# layout chosen by the user.
PREFERENCE = ["ddp", "zero2", "fsdp", "zero3", "zero2-offload", "fsdp-offload", "zero3-offload"]
# Part of the device the estimate may fill: the rest is for the allocator's fragmentation,
# temporaries the estimate does not model (e.g. optimizer-step scratch) and the CUDA context.
HEADROOM = 0.9


def choose(cfg, precision: str, dist_info) -> type[Strategy]:
    """The first strategy in PREFERENCE that `cfg` allows and whose estimate fits (collective when a
    process group is up)."""
    from swiftdist.memory import GIB, device_memory_bytes, estimate, model_stats
    from swiftdist.strategies import get_strategy_class, names

    budget = torch.tensor([cfg.parallel.gpu_memory * GIB if cfg.parallel.gpu_memory
                           else device_memory_bytes(dist_info.device)], dtype=torch.float64)
    if dist.is_initialized():  # every rank must choose the same: plan for the smallest device
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
    usable = budget.item() * HEADROOM
    seq_len = -(-cfg.data.max_length // cfg.parallel.sequence_parallel)  # a rank's share of each sequence
    stats = model_stats(cfg.model.model, cfg.model, precision, seq_len, cfg.train.batch_size, cfg.train.loss_chunk_size)
    notes = []
    for name in (n for n in PREFERENCE if n in names()):
        strategy = get_strategy_class(name)
        reason = strategy.refusal(cfg, precision)
        if reason:
            notes.append(f"{name} refused")
            continue
        parts = estimate(stats, name, dist_info.world_size)
        # On a CPU host the "device" is host memory: offloading to it saves nothing.
        need = parts["total"] + (parts["host"] if dist_info.device.type == "cpu" else 0)
        if need <= usable:
            if dist_info.is_main:
                log.info("strategy auto -> %s: needs %.2f GiB of %.2f GiB usable per device%s", name,
                         need / GIB, usable / GIB, f" ({'; '.join(notes)})" if notes else "")
            return strategy
        notes.append(f"{name} needs {need / GIB:.2f} GiB")
    raise SwiftdistError(f"--strategy auto: no strategy fits {usable / GIB:.2f} GiB per device ({'; '.join(notes)}); "
                         "use --gradient-checkpointing, a smaller --batch-size or --max-length, "
                         "--train-type qlora, or more devices")

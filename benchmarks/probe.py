"""What every contender process reports about itself, measured the same way for all of them.

Each rank of each contender calls `report()` once, after its last step and while its model and
optimizer are still alive, and writes `rank{R}.json` into the run directory:
- `peak_rss_gib`: the process's own peak resident memory (ru_maxrss), the number `top` users see;
- `load_peak_rss_gib` (swiftdist): the same peak once the model is loaded and wrapped, before the first step;
- `tensor_gib`: bytes of the CPU tensor storages Python can reach at that moment (weights, optimizer
  state, gradient buffers). On CPU, RSS hides sharding under allocator caches and library code
  (DESIGN §6), so this is the figure that shows what a sharded strategy saves per rank;
- rank 0 also writes its per-step wall times and losses.
"""

from __future__ import annotations

import gc
import json
import os
import resource
from pathlib import Path

import torch


def live_tensor_bytes() -> int:
    """Sum of distinct CPU storages behind live tensors. DTensors are skipped: gc finds their local shards."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or isinstance(obj, DTensor) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
            continue
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def report(run_dir: str | Path, step_s: list[float], losses: list[float], load_peak_rss_gib: float | None = None,
           **per_step) -> None:
    """`per_step`: further per-step series rank 0 records (e.g. tokens_per_s)."""
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "peak_rss_gib": peak_rss_gib(), "tensor_gib": live_tensor_bytes() / 2**30}
    if load_peak_rss_gib is not None:
        record["load_peak_rss_gib"] = load_peak_rss_gib
    if torch.cuda.is_available():
        record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        record.update(step_s=step_s, losses=losses, **per_step)
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(record))

"""Process-group setup from torchrun / SLURM / a plain `python` process, and rank-0 helpers.

A process group always exists, even for one process (gloo over an in-memory store), so the rest
of the code can all_reduce and use DCP without asking how it was launched.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("swiftdist")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Join (or create) the process group. CUDA + NCCL when there is a GPU, else CPU + gloo."""
    # torchrun sets RANK/WORLD_SIZE; a bare `srun python -m swiftdist.sft` sets only SLURM_*.
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for GPUs and warns
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def setup_logging(rank: int) -> None:
    """Readable logs on rank 0; other ranks speak only for warnings and errors."""
    # Library deprecation notices are for library authors, not for people reading a training log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "[%(asctime)s] %(message)s" if rank == 0 else f"[rank{rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("transformers", "datasets", "deepspeed", "torch.distributed", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank (one collective for all of them)."""
    if not dist.is_initialized():
        return list(flags)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_ranks_ok(ok: bool) -> bool:
    """Collective: True only if `ok` holds on every rank, so all ranks take the same branch after it."""
    return not any_rank(not ok)[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        gc.collect()  # reference cycles that hold a group (a closed DeepSpeed engine's) go first
        dist.destroy_process_group()
        _release_default_group_arguments()


def _release_default_group_arguments() -> None:
    """Functions written `def f(..., group=group.WORLD)` (torch.distributed.nn.functional, DeepSpeed's
    TorchBackend.barrier) hold the default group itself when imported after it was made: it would
    outlive destroy_process_group(), its gloo threads running into the interpreter's teardown, when
    a rank was seen to abort ("terminate called without an active exception"). None means the
    same: the default group."""
    for f in gc.get_objects():
        if isinstance(f, types.FunctionType) and f.__defaults__ \
                and any(isinstance(d, dist.ProcessGroup) for d in f.__defaults__):
            f.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in f.__defaults__)

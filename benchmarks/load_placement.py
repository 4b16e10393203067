"""Where a strategy's build_model leaves a QLoRA model, before wrap (issue 13, item 6).

    python -m benchmarks.load_placement SPEC.json RUN_DIR STRATEGY

One process (NCCL at world size 1 when MASTER_ADDR is set, as the GPU check sets it) builds the
strategy for the spec's model with QLoRA in bf16 and calls its build_model, as the trainer does,
and writes what it finds to RUN_DIR/rank0.json (benchmarks/runner.py reads it):
- `allocated_gib`: torch.cuda.memory_allocated() right after build_model (0 on a CPU host);
- `model_gib`: bytes of the model's parameters and buffers as loaded (the 4-bit weights packed);
- `devices`: the device types its parameters are on.
A strategy that keeps the whole model on every rank (ddp, zero2) loads it straight onto the rank's
GPU: `allocated_gib` is about `model_gib`. One that shards (fsdp, zero3) must leave it in host
memory for wrap() to partition: `allocated_gib` is about 0, or every rank's GPU would hold the whole
4-bit model first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmarks.spec import BenchSpec
from swiftdist.config import RunConfig
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.model import resolve_model_path
from swiftdist.strategies import get_strategy_class


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers as stored (a 4-bit weight counts its packed bytes; its small
    quantization state is left out)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main(spec_path: str, run_dir: str, strategy: str) -> None:
    model_dir = BenchSpec.load(spec_path).model
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        cfg = RunConfig()
        cfg.model.model, cfg.model.train_type = model_dir, "qlora"
        built = get_strategy_class(strategy)(cfg, dist_info, "bf16")
        model = built.build_model(resolve_model_path(model_dir), "sdpa")
        cuda = torch.cuda.is_available()
        record = {"strategy": strategy,
                  "allocated_gib": torch.cuda.memory_allocated() / 2**30 if cuda else 0.0,
                  "model_gib": model_bytes(model) / 2**30,
                  "devices": sorted({p.device.type for p in model.parameters()}),
                  "load_device": str(built.load_device())}
        Path(run_dir, "rank0.json").write_text(json.dumps(record))
    finally:
        destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])

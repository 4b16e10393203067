"""`swiftdist estimate`'s per-rank memory for a benchmark job, to print beside the measured figures."""

from __future__ import annotations

import torch

from benchmarks.spec import BenchSpec


def estimated_gib(model: str, spec: BenchSpec, strategies: list[str], world_size: int, seq_len: int,
                  micro_batch: int) -> dict[str, dict[str, float]]:
    """strategy -> {"states": params + buffers + grads + optimizer, "total": states + activations} in GiB,
    for the strategies the estimator knows (megatron has no formula yet). On CPU the "host" memory
    that offloading strategies move state to is the same memory, so it counts in both figures."""
    from swiftdist.config import ModelConfig
    from swiftdist.memory import estimate, model_stats

    cfg = ModelConfig(train_type=spec.train_type, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                      lora_dropout=spec.lora_dropout, gradient_checkpointing=spec.gradient_checkpointing)
    stats = model_stats(model, cfg, spec.precision, seq_len, micro_batch)
    out = {}
    for name in strategies:
        try:
            parts = estimate(stats, name, world_size)
        except NotImplementedError:
            continue
        host = parts["host"] if not torch.cuda.is_available() else 0
        out[name] = {"states": (parts["total"] - parts["activations"] + host) / 2**30,
                     "total": (parts["total"] + host) / 2**30}
    return out

"""`swiftdist estimate`'s per-rank memory for a benchmark job, to print beside the measured figures."""

from __future__ import annotations

from benchmarks.spec import BenchSpec


def estimated_gib(model: str, spec: BenchSpec, strategies: list[str], world_size: int, seq_len: int,
                  micro_batch: int) -> dict[str, dict[str, float]]:
    """strategy -> {"states": params + buffers + grads + optimizer, "total": states + activations} in GiB,
    for the strategies the estimator knows (megatron has no formula yet)."""
    from swiftdist.config import ModelConfig
    from swiftdist.estimate import estimate, model_stats

    cfg = ModelConfig(train_type=spec.train_type, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                      lora_dropout=spec.lora_dropout, gradient_checkpointing=spec.gradient_checkpointing)
    stats = model_stats(model, cfg, spec.precision, seq_len, micro_batch)
    out = {}
    for name in strategies:
        try:
            parts = estimate(stats, name, world_size)
        except NotImplementedError:
            continue
        out[name] = {"states": (parts["total"] - parts["activations"]) / 2**30, "total": parts["total"] / 2**30}
    return out

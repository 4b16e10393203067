"""The learning-rate schedule: warmup, then cosine or linear decay to a floor, or constant."""

from __future__ import annotations

import math


def lr_at(progress: float, cfg) -> float:
    """Learning rate at `progress` = fraction of the run's samples consumed (world-size independent)."""
    warmup = cfg.warmup_ratio
    if progress < warmup:
        return cfg.lr * (progress / warmup)
    decay = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.scheduler == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * decay))
    if cfg.scheduler == "linear":
        return floor + (cfg.lr - floor) * (1.0 - decay)
    return cfg.lr

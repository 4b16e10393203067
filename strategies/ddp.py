"""Data parallel: every rank holds the whole model; gradients are averaged by DDP's all-reduce.

With one process there is nothing to synchronise, so the model is left unwrapped.
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from swiftdist.strategies.base import build_optimizer
from swiftdist.strategies.dcp import DCPStrategy


class DDPStrategy(DCPStrategy):
    name = "ddp"

    def wrap(self, model) -> None:
        model.to(self.dist.device)
        if self.dist.world_size > 1:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.optimizer = build_optimizer(model, self.cfg)

    def no_sync(self, is_last_micro_batch: bool):
        if is_last_micro_batch or not isinstance(self.model, DistributedDataParallel):
            return super().no_sync(is_last_micro_batch)
        return self.model.no_sync()

    @classmethod
    def memory_estimate(cls, stats, world_size: int) -> dict[str, float]:
        grads = stats.n_trainable * stats.trainable_bytes
        return {
            "params": stats.loaded_bytes,
            # DDP all-reduces through flat buckets: a second copy of the gradients.
            "buffers": grads if world_size > 1 else 0,
            "grads": grads,
            "optimizer": 2 * grads,  # Adam's two moments, in the weights' dtype
            "host": 0,
        }

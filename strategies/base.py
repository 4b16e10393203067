"""The strategy contract: everything that differs between DDP, FSDP2, DeepSpeed and Megatron.

A strategy turns a plain HF/peft model into a parallelised one and owns its optimizer, its
backward/step/clip verbs and its checkpoint format. The trainer calls only these verbs and never
asks which strategy is running.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.distributed as dist

from swiftdist.config import ParallelConfig, RunConfig
from swiftdist.distributed import DistInfo
from swiftdist.errors import SwiftdistError
from swiftdist.loss import output_head, token_loss_sum
from swiftdist.vocab_parallel import kept_rows


class Strategy(ABC):
    name: ClassVar[str]
    checkpoint_format: ClassVar[str]
    """What save() writes (e.g. "dcp"); a resume refuses a checkpoint of another format with a clear reason."""
    owned_flags: ClassVar[dict[str, str]] = {}
    """Flags (ParallelConfig fields) that only this strategy family reads, each with the reason every other
    strategy refuses it when it is set (there it would be silently ignored)."""
    runs_hf_model: ClassVar[bool] = True
    """Trains the transformers model itself (megatron builds its own), so --sequence-parallel can reroute its attention."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, precision: str):
        self.cfg, self.dist, self.precision = cfg, dist, precision
        self.model: torch.nn.Module | None = None  # the parallelised model, set by wrap()
        self.optimizer: torch.optim.Optimizer | None = None

    def close(self) -> None:
        """Undo what the strategy changed for the whole process (patches, process groups of its own) once
        the run is over; the model is not used after it. Most strategies change nothing."""

    # ---- what is possible -------------------------------------------------------------------

    @classmethod
    def refusal(cls, cfg: RunConfig, precision: str) -> str | None:
        """Why this strategy cannot run `cfg` (train type x precision x layout), or None if it can.

        Checked before any model is loaded, so an impossible combination costs nothing. The default
        refuses flags that only another backend reads (its owned_flags), so that they are never silently ignored.
        """
        from swiftdist.strategies import owned_flags

        default = ParallelConfig()
        for flag, reason in owned_flags().items():
            if flag not in cls.owned_flags and getattr(cfg.parallel, flag) != getattr(default, flag):
                return reason
        return None


    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (model-parallel ranks share data)."""
        return self.dist.rank

    @property
    def dp_size(self) -> int:
        return self.dist.world_size

    # ---- building -----------------------------------------------------------------------------

    def model_init_context(self):
        """Context in which the model is constructed (e.g. ZeRO-3 partitions weights as they load)."""
        return contextlib.nullcontext()

    def load_device(self) -> torch.device | None:
        """Where from_pretrained puts the weights. A strategy that keeps the whole model on every rank
        loads it straight onto the rank's device (no host copy to move it from). One that shards
        overrides this: it loads on the host, so that no device holds the whole model before it is
        partitioned, or returns None to leave placement to its model_init_context."""
        return self.dist.device

    @staticmethod
    def param_shape(p: torch.nn.Parameter) -> torch.Size:
        """A parameter's real shape, also where build_model left only a placeholder of it on this rank
        (what the parameter counts and the weight-decay groups go by)."""
        return p.shape

    def build_model(self, path, attn_impl: str | None = None) -> torch.nn.Module:
        """The model to train, from the HF dir `path`: an HF model with LoRA/QLoRA applied.

        Strategies that run their own model implementation (megatron) build it here instead.
        """
        from swiftdist.model import load_model

        return load_model(self.cfg.model, path, self.precision, self.model_init_context, attn_impl=attn_impl,
                          device=self.load_device())

    @abstractmethod
    def wrap(self, model: torch.nn.Module) -> None:
        """Parallelise `model` and build the optimizer; sets self.model and self.optimizer."""

    def unwrapped(self) -> torch.nn.Module:
        """The HF/peft module inside whatever wrapper the strategy added."""
        return getattr(self.model, "module", self.model)

    @functools.cached_property
    def head(self) -> torch.nn.Module:
        """The LM head, for computing logits at labelled positions only (swiftdist.loss)."""
        return output_head(self.unwrapped())

    # ---- one optimizer step -------------------------------------------------------------------

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def no_sync(self, is_last_micro_batch: bool):
        """Skip the gradient all-reduce on all micro-batches but the last one of a step."""
        return contextlib.nullcontext()

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (in place; returned for convenience)."""
        dist.all_reduce(tensor)
        return tensor

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def forward_backward(self, micro_batches: list[dict], num_items: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Forward and backward over one step's micro-batches; returns the global token-mean loss.

        Each micro-batch's dropout is seeded from `seeds` (derived from its samples' position, so a
        resumed run draws the same masks on any number of ranks).

        `num_items` is the step's label-token count over all ranks divided by the data-parallel
        size: every backend averages gradients over replicas, so dividing each rank's token-sum
        by it yields the gradient of the global token-mean loss, however tokens fall across
        ranks and micro-batches.
        """
        total = torch.zeros((), device=self.dist.device)
        for i, (batch, seed) in enumerate(zip(micro_batches, seeds)):
            torch.manual_seed(seed)
            with self.no_sync(i == len(micro_batches) - 1), self.autocast():
                loss = token_loss_sum(self.model, self.head, batch, self.cfg.train.loss_chunk_size) / num_items
            self.backward(loss)
            total += loss.detach().float()
        return self.all_reduce_dp(total) / self.dp_size

    @torch.no_grad()
    def forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss of one batch, without gradients (evaluation)."""
        with self.autocast():
            return token_loss_sum(self.model, self.head, batch, self.cfg.train.loss_chunk_size)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- state --------------------------------------------------------------------------------

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write model + optimizer state in the backend's native (sharded) format. Collective."""

    @abstractmethod
    def load(self, directory: str, saved: "TrainerState") -> None:  # noqa: F821
        """Restore what save() wrote, resharding to the current world size where possible. Collective."""

    @classmethod
    def load_tensors(cls, directory: str, names: list[str]) -> dict[str, torch.Tensor]:
        """Full CPU tensors `names` (keys as in the unwrapped model) from what save() wrote, with no process
        group: `swiftdist export` reads a checkpoint a few tensors at a time, so its memory stays bounded."""
        raise SwiftdistError(f"exporting a full fine-tune from a --strategy {cls.name} checkpoint is not supported yet")

    @abstractmethod
    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Unsharded CPU tensors on rank 0 (empty dict elsewhere), keyed as in the unwrapped model. Collective."""

    def save_hf(self, directory, state_dict: dict[str, torch.Tensor]) -> None:
        """Rank 0: write full_state_dict() as a peft adapter (LoRA) or an HF model dir (full)."""
        self.unwrapped().save_pretrained(directory, state_dict=state_dict)

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes of the parameter and optimizer-state tensors this rank holds, by device type, e.g.
        {"params": {"cuda": ...}, "optimizer": {"cpu": ...}}. Shows sharding and offload directly
        (on a CPU host the process RSS cannot)."""
        return _storage_bytes(self._state_tensors())

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        params = list(self.model.parameters()) + kept_rows(self.model)
        optimizer = [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return {"params": params, "optimizer": optimizer}

    @classmethod
    def memory_estimate(cls, stats: "ModelStats", world_size: int) -> dict[str, float]:  # noqa: F821
        """Bytes per device: params, grads, optimizer, (activations are added by the estimator)."""
        raise NotImplementedError


def _storage_bytes(kinds: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, int]]:
    """Sum storage sizes per kind and device type; a storage shared by several tensors counts once."""
    seen, out = set(), {}
    for kind, tensors in kinds.items():
        out[kind] = {}
        for t in tensors:
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                out[kind][t.device.type] = out[kind].get(t.device.type, 0) + storage.nbytes()
    return out


def param_groups(model: torch.nn.Module, cfg: RunConfig, shape=Strategy.param_shape) -> list[dict]:
    """The trainable parameters; no weight decay on biases and norm weights (1-D tensors), as in most LLM
    recipes. `shape` is the strategy's param_shape."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, shape=Strategy.param_shape) -> torch.optim.Optimizer:
    """AdamW over param_groups()."""
    return torch.optim.AdamW(
        param_groups(model, cfg, shape),
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        fused=torch.cuda.is_available() or None,
    )

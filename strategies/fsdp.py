"""FSDP2: the input embedding, the attention and the MLP of every decoder layer and the LM head are
`fully_shard` units, then the root (what is left: the norms, and the embedding and head when they
are tied); each rank keeps 1/N of parameters, gradients and optimizer state and all-gathers one
unit at a time.

`fsdp-offload` keeps the shards (and so the optimizer step) in host memory; the device holds only
the unit being computed. Checkpoints go through DCP (strategies/dcp.py), so they reshard on load.

The model is built on the meta device and sharded before any weight exists; each rank then reads
only its own shards from the safetensors files (swiftdist/sharded_load.py), so no rank ever holds
the whole model. QLoRA, and models whose files cannot be read that way, load whole on every rank.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from swiftdist.errors import SwiftdistError
from swiftdist.host_memory import InPlaceAllGather, return_large_blocks_to_the_os
from swiftdist.model import count_params
from swiftdist.sharded_load import InitialValues, load_empty
from swiftdist.strategies.base import build_optimizer
from swiftdist.strategies.dcp import DCPStrategy
from swiftdist.vocab_parallel import shard_embeddings


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, found by the class names HF lists in `_no_split_modules`."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SwiftdistError(f"--strategy fsdp: {type(hf).__name__} names no decoder layer class (_no_split_modules) "
                             "to shard by; use --strategy zero3")
    return layers


def layer_units(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The parts of a decoder layer that are units of their own: each child holding at least 1% of
    its weights (attention, MLP or experts; not the norms, which the root keeps gathered). A unit
    per block rather than per layer halves what is gathered at once: an all-gather's output and the
    unsharded parameters FSDP2 copies it into exist together, beside the previous unit, so the peak
    holds two to three copies of the largest unit (1.07B Llama LoRA, fp32, 2 ranks, CPU: peak RSS
    3.37 -> 3.19 GiB, the same step time). A layer with no such child is one unit."""
    total = count_params(layer)[1]
    blocks = [child for child in layer.children() if count_params(child)[1] >= total / 100]
    return blocks or [layer]


def embedding_and_head(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embedding and the LM head, to shard as units of their own (as torchtitan does): in
    the root they would be gathered from the first layer's forward to the end of backward.

    Tied ones share one weight, which FSDP2 lets only one unit hold, and a unit of both would be
    gathered from the embedding's call to the head's, the whole forward: they stay in the root."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if {id(p) for p in embedding.parameters()} & {id(p) for p in head.parameters()}:
        return []
    return [embedding, head]


class FSDPStrategy(DCPStrategy):
    name = "fsdp"
    offload = False
    _initial: InitialValues | None = None
    """Set by build_model when the model is empty (meta): what wrap() fills each rank's shards with."""

    def load_device(self) -> torch.device:
        # A model loaded whole (QLoRA, or files it cannot slice) waits in host memory; wrap() moves
        # it to the device one unit at a time, sharding as it goes.
        return torch.device("cpu")

    def build_model(self, path, attn_impl: str | None = None) -> torch.nn.Module:
        if self.dist.device.type == "cpu":
            return_large_blocks_to_the_os()
        built = load_empty(self.cfg.model, path, self.precision, attn_impl, self.name)
        if built is None:  # QLoRA, or files it cannot slice (logged): every rank loads the whole model
            return super().build_model(path, attn_impl)
        model, self._initial = built
        return model

    def wrap(self, model) -> None:
        device = self.dist.device
        mesh = init_device_mesh(device.type, (self.dist.world_size,))
        # bf16: layers are gathered and computed in bf16; gradients are reduced in fp32 and the
        # sharded master weights stay in the dtype they were loaded in.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16" else MixedPrecisionPolicy())
        # Pinned host memory needs an accelerator; on a CPU host it fails ("Cannot access accelerator device").
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if self.offload else OffloadPolicy()
        # An empty model is sharded while on meta, then each rank allocates and reads its shards.
        # A model that arrives whole in host memory moves one unit at a time and shards it, so the
        # device never holds more than one unsharded unit and a model larger than one device still
        # fits on several. (`.to` also moves bitsandbytes' 4-bit quantization state, which is no
        # parameter; fully_shard(model) moves what is left: the norms, tied embeddings.)
        # Each unit but the head is resharded after its forward and gathered again for its backward.
        # The head is the last unit in forward and the first in backward, so it stays gathered in
        # between (one all-gather a step, not two; the chunked loss of swiftdist/loss.py does not
        # even use its weight in backward).
        # A frozen embedding and head (LoRA, QLoRA) are no units at all: each rank keeps its rows of
        # them, and the lookup and the loss run vocabulary-parallel (swiftdist/vocab_parallel.py), so
        # neither is ever gathered. Offloaded, they stay units: their rows would live on the device.
        rows_kept = (False, False) if self.offload else shard_embeddings(model, mesh.get_group(), device, self._initial)
        units = [(unit, True) for layer in decoder_layers(model) for unit in layer_units(layer)]
        if split := embedding_and_head(model):
            (embedding, head), (embedding_kept, head_kept) = split, rows_kept
            units = ([] if embedding_kept else [(embedding, True)]) + units + ([] if head_kept else [(head, False)])
        for unit, reshard_after_forward in units:
            if self._initial is None:
                unit.to(device)
            fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        if torch.distributed.get_backend(mesh.get_group()) == "gloo":
            for unit in [unit for unit, _ in units] + [model]:
                unit.set_custom_all_gather(InPlaceAllGather())
        if self._initial is not None:
            # Offloaded shards live in host memory; buffers stay where fully_shard put them.
            self._initial.load_into(model, torch.device("cpu") if self.offload else device)
            self._initial = None
        self.model = model
        self.optimizer = build_optimizer(model, self.cfg)

    # no_sync is left at the base default on purpose: skipping the reduce-scatter would keep a full
    # unsharded gradient per rank between micro-batches, the memory FSDP is chosen to save.

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # a partial sum over the shards: reduce it to the global norm
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                 max_norm, norm)
        return norm

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        # A shard is a DTensor; its storage is that of the local piece.
        return {kind: [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
                for kind, tensors in super()._state_tensors().items()}

    @classmethod
    def memory_estimate(cls, stats, world_size: int) -> dict[str, float]:
        trainable = stats.n_trainable * stats.trainable_bytes
        shards = {
            "params": stats.loaded_bytes / world_size,
            "grads": trainable / world_size,
            "optimizer": 2 * trainable / world_size,  # Adam's moments, sharded like the weights
        }
        # Unsharded, in the compute dtype: the unit being computed, the next one (prefetched), and
        # the gradients of one unit before they are reduce-scattered.
        buffers = (2 * stats.unit_params + stats.unit_trainable) * stats.compute_bytes
        if cls.offload:
            return {"params": 0, "buffers": buffers, "grads": 0, "optimizer": 0, "host": sum(shards.values())}
        return {**shards, "buffers": buffers, "host": 0}


class FSDPOffloadStrategy(FSDPStrategy):
    name = "fsdp-offload"
    offload = True

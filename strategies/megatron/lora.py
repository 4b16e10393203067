"""LoRA on megatron-core's parallel linear layers: which layers --target-modules names, the adapter
module (ParallelLoRA) and its seeded, layout-independent initialisation."""

from __future__ import annotations

import zlib

import torch

from swiftdist.errors import SwiftdistError
from swiftdist.strategies.megatron import bridge

# HF linear-layer names (what --target-modules takes) -> the mcore layer that holds them.
TARGETS = {
    "q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
    "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2",
}


def add_lora(model: torch.nn.Module, model_cfg, sequence_parallel: bool) -> list[str]:
    """Freeze `model` and wrap the targeted mcore layers in ParallelLoRA; returns the HF module names
    adapted (what the exported peft adapter lists as target_modules)."""
    wanted = list(model_cfg.target_modules)
    unknown = [t for t in wanted if t != "all-linear" and t not in TARGETS]
    if unknown:
        raise SwiftdistError(f"--target-modules {', '.join(unknown)}: megatron adapts "
                             f"{', '.join(TARGETS)} or all-linear")
    targets = set(TARGETS.values()) if wanted == ["all-linear"] else {TARGETS[t] for t in wanted}
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child,
                    ParallelLoRA(module, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout,
                                 sequence_parallel))
    # mcore fuses q/k/v (and gate/up) into one layer, so one adapter covers all of them: asking
    # for q_proj adapts k_proj and v_proj too, and one lora_A feeds the three outputs.
    return sorted(h for h, mc in TARGETS.items() if mc in targets)


def init_lora(model: torch.nn.Module, layout: bridge.Layout, seed: int, tp_rank: int, tp: int) -> None:
    """Seeded, layout-independent LoRA init: lora_A ~ peft's kaiming-uniform drawn for the whole
    HF-shaped matrix, then sliced; lora_B = 0. Any TP x PP layout then starts identical."""
    tensors = {}
    for e in layout.entries(model):
        if not e.lora:
            continue
        for p in e.pieces:
            full_shape = list(p.tensor.shape)
            if p.axis is not None:
                full_shape[p.axis] *= tp
            full = torch.zeros(full_shape)
            if ".lora_A." in p.name:
                g = torch.Generator().manual_seed(seed + _stable_hash(p.name))
                bound = 1.0 / full_shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)), as peft does
                full.uniform_(-bound, bound, generator=g)
            tensors[p.name] = full[bridge.tp_slice(full.shape, p.axis, tp_rank, tp)]
    layout.assign(layout.entries(model), tensors)


def _stable_hash(name: str) -> int:
    """A seed offset from a tensor name that is the same in every process (unlike hash())."""
    return zlib.crc32(name.encode())


class ParallelLoRA(torch.nn.Module):
    """LoRA on an mcore Column/RowParallelLinear: base(x) + lora_B(lora_A(dropout(x))) * alpha / r.

    Column-parallel (output rows split over TP): lora_A is whole on every rank, lora_B is split like
    the base rows. Row-parallel (input columns split): lora_A is split like the base columns and its
    partial products are summed over TP, lora_B is whole. Written here because peft 0.21's
    LoraParallelLinear fails to construct (KeyError 'fan_in_fan_out', then 'lora_bias') and leaves the
    gradient of its replicated lora_A partial on each TP rank.
    """

    def __init__(self, base, rank: int, alpha: int, dropout: float, sequence_parallel: bool):
        from megatron.core import tensor_parallel

        super().__init__()
        self.base_layer = base
        self.row = isinstance(base, tensor_parallel.RowParallelLinear)
        self.sequence_parallel = sequence_parallel
        out_features, in_features = base.weight.shape  # this rank's shard
        self.lora_A = torch.nn.Linear(in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, out_features, bias=False)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.scaling = alpha / rank
        # With sequence parallelism the replicated factor sees only this rank's tokens: its gradient
        # is summed over TP ranks like the norm weights' (see _finalize_grads).
        replicated = self.lora_B if self.row else self.lora_A
        replicated.weight.sequence_parallel = sequence_parallel

    def forward(self, x, *args, **kwargs):
        from megatron.core import tensor_parallel as tpl

        out, bias = self.base_layer(x, *args, **kwargs)
        a = self.lora_A(self.dropout(x))
        if self.row:
            # x holds this rank's input columns: sum the partial products (over the sequence shards'
            # owners with sequence parallelism).
            a = (tpl.reduce_scatter_to_sequence_parallel_region(a) if self.sequence_parallel
                 else tpl.reduce_from_tensor_model_parallel_region(a))
        else:
            # lora_B holds only this rank's output rows, so the gradient reaching `a` is partial:
            # these regions sum it over TP (with sequence parallelism they also gather the sequence).
            a = (tpl.gather_from_sequence_parallel_region(a) if self.sequence_parallel
                 else tpl.copy_to_tensor_model_parallel_region(a))
        return out + self.lora_B(a) * self.scaling, bias

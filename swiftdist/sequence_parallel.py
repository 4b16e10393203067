"""Ulysses sequence parallelism: the ranks of a group hold 1/N of every sequence each.

Everything outside attention works token by token, so each rank runs the whole model on its slice
of the sequence. Attention needs every token: before it, an all-to-all trades the sequence split
for a head split (each rank then has the whole sequence for 1/N of the heads), and after it a
second all-to-all trades back (DeepSpeed-Ulysses, arXiv:2309.14509; DeepSpeed's ulysses_sp does
the same). The attention in between is the model's own (eager, sdpa or flash_attention_2), given a
mask built from the whole sequence's position_ids, so packed samples and padding stay apart.

Data: the ranks of a group read the same samples (the sampler sees world / N data-parallel ranks);
each takes its slice of every micro-batch, with the labels shifted before slicing, since the last
token of one slice predicts the first token of the next. Gradients need nothing special: every
rank's loss is its slice's token sum over the global label count, and the strategies average
gradients over all ranks as usual.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_to_all_single_autograd

from swiftdist.data import IGNORE
from swiftdist.errors import SwiftdistError
from swiftdist.loss import shifted_targets

ATTENTION_NAME = "swiftdist_ulysses"


def check(size: int, world_size: int, hf_config, runs_hf_model: bool) -> None:
    """Refuse, before the model loads, a sequence-parallel size this run cannot use, naming one it can."""
    if size == 1:
        return
    if not runs_hf_model:
        raise SwiftdistError(f"--sequence-parallel {size}: megatron splits sequences itself (sequence parallelism "
                             "comes with --tp); leave --sequence-parallel at 1")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    largest = max(n for n in range(1, world_size + 1) if world_size % n == 0 and heads % n == 0 and kv_heads % n == 0)
    if world_size % size:
        raise SwiftdistError(f"--sequence-parallel {size}: the {world_size} ranks must split into groups of "
                             f"{size}; the largest size that works here is {largest}")
    if heads % size or kv_heads % size:
        raise SwiftdistError(f"--sequence-parallel {size}: the model's {heads} attention heads and {kv_heads} KV heads "
                             f"must both divide by it (each rank attends with 1/{size} of them); the largest size "
                             f"that works here is {largest}")


@dataclass
class SequenceParallel:
    """This rank's place in its sequence-parallel group, and what to do to batches and the model."""

    size: int = 1
    rank: int = 0  # within the group
    group: object = None
    packed: bool = True
    """Rows may hold several samples. Without packing a row is one sample and its trailing padding, so
    plain causal attention is exact for every labelled token: sdpa then needs no seq x seq mask."""

    @classmethod
    def setup(cls, size: int, packed: bool) -> "SequenceParallel":
        """Groups of `size` consecutive ranks (on one node when they fit: all-to-all is bandwidth-hungry).
        Collective: every rank creates every group."""
        if size == 1:
            return cls()
        world, me = dist.get_world_size(), dist.get_rank()
        mine = None
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= me < start + size:
                mine = group
        return cls(size, me % size, mine, packed)

    def data_split(self, rank: int, world_size: int) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size): a group reads as one data-parallel rank."""
        return rank // self.size, world_size // self.size

    def apply(self, model: torch.nn.Module) -> None:
        """Route the model's attention through the all-to-alls (nothing to do for size 1)."""
        if self.size == 1:
            return
        from transformers import AttentionInterface

        config = model.config
        inner = config._attn_implementation
        AttentionInterface.register(ATTENTION_NAME, _UlyssesAttention(self, inner))
        # A name with no mask function: transformers then builds no mask for the local slice.
        config._attn_implementation = ATTENTION_NAME

    def shard(self, batch: dict) -> dict:
        """This rank's slice of a collated micro-batch (whole sequences on the host)."""
        if self.size == 1:
            return batch
        targets = batch.pop("shift_labels", None)
        targets = shifted_targets(batch["labels"]) if targets is None else targets
        width = batch["input_ids"].shape[1]
        local = math.ceil(width / self.size)
        pad = local * self.size - width
        # Padding forms its own segment (positions restart at 0), as collate's padding does.
        full = {"input_ids": F.pad(batch["input_ids"], (0, pad), value=0),
                "position_ids": torch.cat([batch["position_ids"],
                                           torch.arange(pad).expand(batch["position_ids"].shape[0], pad)], dim=1),
                "shift_labels": F.pad(targets, (0, pad), value=IGNORE)}
        piece = slice(self.rank * local, (self.rank + 1) * local)
        return {k: v[:, piece].contiguous() for k, v in full.items()}


class _UlyssesAttention:
    """An attention function for transformers' AttentionInterface: all-to-all, the model's own attention
    over the whole sequence for 1/N of the heads, all-to-all back."""

    def __init__(self, sp: SequenceParallel, inner: str):
        self.sp, self.inner = sp, inner
        # The whole row's position_ids and mask, for the local position_ids they were made from: every
        # layer of a forward gets the same tensor, so they are gathered and built once per forward.
        self._row_for, self._row = None, {}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        local_positions = kwargs.pop("position_ids")
        q, k, v = (self._heads_to_group(t) for t in (query, key, value))
        for stale in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(stale, None)  # the slice's boundaries; flash finds the whole row's from position_ids
        if self.inner.startswith("flash"):
            from transformers.integrations.flash_attention import flash_attention_forward

            out, weights = flash_attention_forward(module, q, k, v, None, position_ids=self._whole(local_positions),
                                                   **kwargs)
        elif self.inner == "eager":
            eager = sys.modules[type(module).__module__].eager_attention_forward
            out, weights = eager(module, q, k, v, self._mask(local_positions, q.dtype), **kwargs)
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            # Unpacked rows take the fused causal kernel: no seq x seq mask, no scores kept for backward.
            mask = self._mask(local_positions, q.dtype) if self.sp.packed else None
            out, weights = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)
        return self._sequence_to_group(out), weights

    def _cached(self, local_positions: torch.Tensor, key: str, make):
        if self._row_for is not local_positions:  # a new forward
            self._row_for, self._row = local_positions, {}
        if key not in self._row:
            self._row[key] = make()
        return self._row[key]

    def _whole(self, local: torch.Tensor) -> torch.Tensor:
        """The whole row's position_ids (each rank has its slice's)."""
        def gather():
            parts = [torch.empty_like(local) for _ in range(self.sp.size)]
            dist.all_gather(parts, local.contiguous(), group=self.sp.group)
            return torch.cat(parts, dim=1)
        return self._cached(local, "positions", gather)

    def _mask(self, local_positions: torch.Tensor, dtype) -> torch.Tensor:
        """Causal within each segment of the whole row (a segment starts where position_ids restart)."""
        def build():
            segment = (self._whole(local_positions) == 0).cumsum(dim=1)
            same = segment[:, :, None] == segment[:, None, :]
            allowed = same & torch.ones_like(same[0]).tril()[None]
            if self.inner == "sdpa":
                return allowed[:, None]
            blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        return self._cached(local_positions, "mask", build)

    def _heads_to_group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, L/N, D] (all heads, this rank's slice) -> [B, H/N, L, D] (this rank's heads, whole sequence)."""
        b, h, s, d = x.shape
        n = self.sp.size
        chunks = x.reshape(b, n, h // n, s, d).transpose(0, 1).contiguous()  # chunk j: head group j, for rank j
        got = all_to_all_single_autograd(chunks.flatten(), None, None, self.sp.group)
        return got.reshape(n, b, h // n, s, d).permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)

    def _sequence_to_group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/N, D] (attention output: whole sequence, this rank's heads) -> [B, L/N, H, D]."""
        b, length, h, d = x.shape
        n = self.sp.size
        s = length // n
        chunks = x.reshape(b, n, s, h, d).transpose(0, 1).contiguous()  # chunk j: sequence slice j, for rank j
        got = all_to_all_single_autograd(chunks.flatten(), None, None, self.sp.group)
        return got.reshape(n, b, s, h, d).permute(1, 2, 0, 3, 4).reshape(b, s, n * h, d)

"""Activation memory: gradient checkpointing (full or selective) and offloading what it saves.

`full` recomputes each decoder layer's forward in the backward pass and keeps only the layer's
input. `selective` is torchtitan's op-level selective checkpointing: inside each decoder layer the
outputs of the expensive ops (matrix multiplications, every second plain `mm` excepted, and fused
attention) are kept and everything else (norms, activations, rotary embeddings, element-wise
products, softmax) is recomputed, so the recompute costs a fraction of a forward pass.

Both go through transformers' own `activation_checkpointing_enable` (non-reentrant
torch.utils.checkpoint around each decoder layer's forward, module hooks such as FSDP2's and
ZeRO-3's left outside). `--activation-offload` is its `offload`: the layer inputs saved for the
recompute go to pinned host memory and come back in the backward pass.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from swiftdist.config import ModelConfig

log = logging.getLogger("swiftdist")

_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps (torchtitan's list, with the CPU kernels of
# sdpa and the batched matmuls of eager attention).
KEPT_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def selective_contexts():
    """A fresh pair of checkpoint contexts per layer call: keep KEPT_OPS' outputs but every second
    plain mm (torchtitan's choice: half the projections' outputs for less memory). The count runs
    separately in the forward and in the recompute, so both make the same choice for each op."""
    mm_count = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op == _aten.mm.default:
            mm_count[ctx.is_recompute] += 1
        keep = op in KEPT_OPS and not (op == _aten.mm.default and mm_count[ctx.is_recompute] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """--gradient-checkpointing with --checkpointing-mode and --activation-offload on an HF model
    (before peft wraps it). Inputs of the first layer are made to require grad, so that a frozen
    embedding (LoRA) still gives the checkpointed layers a graph to recompute into."""
    kwargs = {"use_reentrant": False}
    if cfg.checkpointing_mode == "selective":
        kwargs["context_fn"] = selective_contexts
    offload = cfg.activation_offload and torch.cuda.is_available()
    if cfg.activation_offload and not offload:
        log.info("--activation-offload: no CUDA device, so the activations are in host memory already; nothing to move")
    model.activation_checkpointing_enable(kwargs, offload=offload)

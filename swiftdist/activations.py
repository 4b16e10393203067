"""Activation memory: gradient checkpointing (full or selective) and offloading what it saves.

`full` recomputes every decoder layer's forward in the backward pass and keeps only each layer's
input. `selective` does that for every second layer (torchtitan's layer-level selective
checkpointing): the other layers keep their activations, so it saves about half of what `full`
saves for about half of its recompute. Measured against torchtitan's op-level selective mode (keep
matmul and attention outputs, recompute the rest) on SmolLM2 LoRA on CPU, it kept as little memory
for less time: op-level selection runs every op of the forward and the recompute through a Python
dispatch mode (benchmarks/activation_memory.py; the figures are in benchmarks/README.md).

Both go through transformers' own `activation_checkpointing_enable` (non-reentrant
torch.utils.checkpoint around a decoder layer's forward, module hooks such as FSDP2's and ZeRO-3's
left outside). `--activation-offload` is its `offload`: the layer inputs saved for the recompute go
to pinned host memory and come back in the backward pass.
"""

from __future__ import annotations

import logging

import torch

from swiftdist.config import ModelConfig

log = logging.getLogger("swiftdist")
# --checkpointing-mode -> checkpoint every n-th decoder layer
EVERY_N_LAYERS = {"full": 1, "selective": 2}


def enable_checkpointing(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """--gradient-checkpointing with --checkpointing-mode and --activation-offload on an HF model
    (before peft wraps it). transformers also makes the first layer's input require grad, so that a
    frozen embedding (LoRA) still gives the checkpointed layers a graph to recompute into."""
    offload = cfg.activation_offload and torch.cuda.is_available()
    if cfg.activation_offload and not offload:
        log.info("--activation-offload: no CUDA device, so the activations are in host memory already; nothing to move")
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=EVERY_N_LAYERS[cfg.checkpointing_mode],
                                          offload=offload)

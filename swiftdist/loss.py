"""The training loss: cross-entropy summed over label tokens, with logits computed only where a label is.

A chat sample's labels cover the assistant's replies only (about 40% of the tokens of the built-in
data, and none of the padding). The LM head's logits, vocabulary-wide and upcast to fp32 for the
loss, are the largest activation of a small model; with Qwen2.5's 152k vocabulary one 2048-token
row's logits are 1.2 GB in fp32. So the LM head is given the hidden states of labelled positions
only, which yields the same loss and gradients for less compute and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftdist.data import IGNORE
from swiftdist.errors import SwiftdistError


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head of an HF/peft causal LM, with a one-line refusal for a model that has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise SwiftdistError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
                             "swiftdist trains transformers causal LMs with an LM head")
    return head


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position is trained to predict: position t predicts label t+1, as in
    transformers; the last position predicts nothing (IGNORE)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def batch_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What each position of a batch predicts: `shift_labels` when the batch was shifted before it was
    cut (a sequence-parallel slice, whose last token predicts the next slice's first), else its labels shifted."""
    return batch["shift_labels"] if "shift_labels" in batch else shifted_targets(batch["labels"])


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of a batch the loss counts."""
    return (shifted_targets(labels) != IGNORE).sum()


def token_loss_sum(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of a batch (fp32), as transformers' own loss with reduction "sum".

    `model` is the module to call (any strategy's wrapper), `head` its LM head (output_head).
    """
    targets = batch_targets(batch)
    labelled = targets != IGNORE
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    # A pre-hook, not a slice of the returned logits: the head must never see the other positions.
    # It runs inside the model's own forward, so every wrapper's hooks (FSDP, ZeRO-3) still apply.
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][labelled].unsqueeze(0),))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return F.cross_entropy(logits[0].float(), targets[labelled], reduction="sum")

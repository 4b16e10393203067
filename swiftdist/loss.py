"""The training loss: cross-entropy summed over label tokens, with logits computed only where a label is.

A chat sample's labels cover the assistant's replies only (about 40% of the tokens of the built-in
data). The LM head's logits, vocabulary-wide and upcast to fp32 for the loss, are the largest
activation of a small model, and with Qwen2.5's 152k vocabulary a 2048-token row's logits alone are
1.2 GB in fp32. Asking the model for the logits of labelled positions only (`logits_to_keep`,
transformers' standard causal-LM argument) gives the same loss for less compute and memory.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from swiftdist.data import IGNORE
from swiftdist.errors import SwiftdistError


def check_supported(model: torch.nn.Module) -> None:
    """A clear refusal for a causal LM whose forward cannot return a subset of its logits."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise SwiftdistError(f"{type(model).__name__}.forward takes no `logits_to_keep` argument; swiftdist trains "
                             "transformers causal LMs that do (every Llama/Qwen/Mistral-style model in transformers 5)")


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of a batch (fp32), as transformers' own loss with reduction "sum"."""
    # Position t predicts token t+1, as transformers shifts labels.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)  # columns where any row has a label
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE,
                           reduction="sum")

"""The training loss: cross-entropy summed over label tokens, computed chunk by chunk of labelled positions.

A chat sample's labels cover the assistant's replies only (about 40% of the tokens of the built-in
data, and none of the padding). The LM head's logits, vocabulary-wide and upcast to fp32 for the
loss, are the largest activation of a small model; with Qwen2.5's 152k vocabulary one 2048-token
row's logits are 1.2 GB in fp32. So the LM head is given the hidden states of labelled positions
only, and those `chunk_size` at a time: at most [chunk_size x vocab] logits exist at once, whatever
the sequence length (torchtune's CEWithChunkedOutputLoss, Liger's fused linear cross-entropy,
DeepSpeed's TiledFusedLogitsLoss do the same). Each chunk's gradients are taken right after its
loss, in the forward pass, so nothing is recomputed and the head costs the matmuls it always did.

The loss is computed *inside* the LM head's call (a pre-hook takes the hidden states, a forward
hook returns the loss as the head's output), so a wrapper that gathers the head's weight around that
call (FSDP2, ZeRO-3) has it gathered while the loss needs it, and sees the loss as the head's output
to hook its backward on.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from swiftdist.data import IGNORE
from swiftdist.errors import SwiftdistError
from swiftdist.vocab_parallel import VocabShardedHead

# Labelled positions per LM-head chunk where a caller chunks without choosing a size. Training
# chunks only with --loss-chunk-size: in bf16 (QLoRA, 10 steps) its losses moved by up to 1e-5
# relative from the whole loss's, and DeepSpeed's no longer equal DDP's to the bit (cause not pinned
# down; fp32 is exact to round-off). At 1024 an fp32 chunk of logits is 200 MB for SmolLM2's 49k
# vocabulary (620 MB for Qwen2.5's 152k), a few times that with its softmax and gradient. Chunks cost
# no time here: SmolLM2 LoRA on CPU (batch 8, ~640 labelled positions) took 0.95x and 1.01x the CPU
# time per step of the whole loss with 256-position chunks, in two rounds.
DEFAULT_CHUNK = 1024


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


def target_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many positions of a batch the loss counts."""
    return (batch_targets(batch) != IGNORE).sum()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed fp32 cross-entropy of `head_forward(hidden)` against `targets`, `chunk_size` rows at a time.

    `params` are the head's trainable parameters (none for LoRA, whose head is frozen): they are
    inputs so that their gradients reach autograd (and every wrapper's gradient hooks) in backward.
    Gradients are computed per chunk during forward and only scaled in backward, so a chunk's
    logits, softmax and logit gradients are freed before the next chunk starts.
    """

    @staticmethod
    def forward(ctx, head_forward, chunk_size: int, hidden: torch.Tensor, targets: torch.Tensor, *params):
        wrt = [t for t in (hidden, *params) if t.requires_grad]
        grads = [torch.zeros_like(t) for t in wrt]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), chunk_size):
            rows = hidden[start:start + chunk_size]
            if hidden.requires_grad:
                rows = rows.detach().requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(head_forward(rows).float(), targets[start:start + chunk_size], reduction="sum")
            if wrt:
                # As any backward pass: outside autocast (the forward ops recorded their dtypes).
                with torch.autocast(hidden.device.type, enabled=False):
                    chunk_grads = torch.autograd.grad(loss, [rows, *params] if hidden.requires_grad else list(params))
                if hidden.requires_grad:
                    grads[0][start:start + chunk_size] = chunk_grads[0]
                    chunk_grads = chunk_grads[1:]
                for total_grad, grad in zip(grads[hidden.requires_grad:], chunk_grads):
                    total_grad += grad
            total += loss.detach()
        ctx.hidden_needs_grad = hidden.requires_grad
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        hidden_grad = grads.pop(0) if ctx.hidden_needs_grad else None
        # Parameters that do not require grad were left out of `grads`; autograd ignores their slot.
        param_grads = iter(grads)
        return (None, None, hidden_grad, None,
                *(next(param_grads) if needs else None for needs in ctx.needs_input_grad[4:]))


def labelled_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a batch's loss counts, as indices into its flattened (rows x sequence)
    positions, and the token each predicts."""
    targets = batch_targets(batch).reshape(-1)
    index = (targets != IGNORE).nonzero().squeeze(1)
    return index, targets[index]


def token_loss_sum(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed token cross-entropy of a batch (fp32), as transformers' own loss with reduction "sum".

    `model` is the module to call (any strategy's wrapper), `head` its LM head (output_head);
    `chunk_size`: labelled positions per LM-head chunk, or 0 for all of them in one [labelled x
    vocab] logits tensor, returned through the model as it returns logits (for a model that changes
    its logits after the head, such as Gemma 2's softcapping, which the chunks cannot follow).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    return labelled_loss_sum(model, head, inputs, *labelled_positions(batch), chunk_size)


def labelled_loss_sum(model: torch.nn.Module, head: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      index: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """token_loss_sum with the positions already found (labelled_positions): nothing in here depends
    on the values of a tensor, so it also runs on shapes alone (swiftdist.memory)."""

    def labelled(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.flatten(0, 1).index_select(0, index)

    # Hooks rather than a loss on the returned logits: the head must never see the other positions,
    # and they run inside the head's call, where every wrapper (FSDP, ZeRO-3) has gathered its weight.
    if not chunk_size:
        handles = [head.register_forward_pre_hook(lambda _, args: (labelled(args[0]).unsqueeze(0),))]
        with _removed_after(handles):
            logits = model(**inputs).logits
        return F.cross_entropy(logits[0].float(), targets, reduction="sum")

    taken: list[torch.Tensor] = []
    head_output: list[torch.Tensor] = []

    def take_hidden(_, args):
        taken.append(labelled(args[0]))
        return (args[0][:, :0],)  # no positions: the loss below is computed in place of the logits

    def loss_as_output(module, _, __):
        # Without grad mode (evaluation) no gradient is wanted, so none is computed in the chunks.
        if isinstance(module, VocabShardedHead):  # no weight to gather: the ranks share the vocabulary
            return module.loss_sum(taken.pop(), targets, chunk_size)
        trainable = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        return ChunkedCrossEntropy.apply(module.forward, chunk_size, taken.pop(), targets, *trainable)

    # The loss hook goes first, so that the wrappers' own post-forward hooks see (and hook their
    # backward on) the loss; the last hook records what the model then gets from its head.
    handles = [head.register_forward_pre_hook(take_hidden),
               head.register_forward_hook(loss_as_output, prepend=True),
               head.register_forward_hook(lambda _, __, out: head_output.append(out))]
    with _removed_after(handles):
        loss = model(**inputs).logits
    if loss is not head_output[0] and head not in _VERIFIED_HEADS:
        # A wrapper may pass the head's output on as a new tensor of the same value (ZeRO-3 does); a
        # model that softcaps or scales its logits changes the value.
        if loss.shape != () or not torch.equal(loss, head_output[0]):
            raise SwiftdistError(f"{type(model).__name__} changes its logits after the LM head (e.g. softcapping "
                                 "or scaling them), which the chunked loss cannot follow; use --loss-chunk-size 0")
        _VERIFIED_HEADS.add(head)
    return loss


# Heads whose model was seen to pass a wrapped head output on unchanged (checked once: it syncs a GPU).
_VERIFIED_HEADS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def _removed_after(handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

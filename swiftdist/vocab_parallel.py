"""A frozen LM head and input embedding split by vocabulary rows over the data-parallel ranks, and a
loss and a lookup that never gather them.

FSDP2 and ZeRO-3 gather a sharded weight whole around its module's call. For the LM head that is
vocab x hidden (Llama-3's 128k x 4096: 1 GiB in bf16), the largest single weight of most models,
and on a CPU host the gather needs it twice (gloo gathers into a temporary of the whole output, then
copies it out): 0.75 GiB of the 1.07B benchmark's fp32 step. LoRA and QLoRA never train the head,
so it needs no optimizer, no gradient and no wrapper at all: each rank keeps its own rows of it and
the loss is computed vocabulary-parallel, as Megatron's VocabParallelEmbedding / vocab-parallel
cross-entropy do across tensor-parallel ranks, here across the data-parallel ones. For the head, each rank
gathers the hidden states of every rank's chunk of labelled positions (chunk x hidden, small), takes
the logits of its own rows for all of them, the ranks combine each position's max, sum of
exponentials and target logit (three numbers per position), and the hidden states' gradient, a sum
over the vocabulary, is reduce-scattered back to the rank the positions came from. The input
embedding (as large, gathered whole by the same wrappers at the start of every forward) is looked
up from the rows of the ids the batch uses, which each rank's range contributes.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swiftdist.data import IGNORE

log = logging.getLogger("swiftdist")


class _VocabRows(torch.nn.Module):
    """A frozen [vocab x hidden] weight of which this rank holds rows [start, start + len(rows))."""

    def __init__(self, rows: torch.Tensor, start: int, vocab_size: int, group: dist.ProcessGroup):
        super().__init__()
        # A buffer, not a parameter: wrappers leave it alone, and it is in no checkpoint (a frozen
        # base weight comes back from the model path on resume).
        self.register_buffer("rows", rows, persistent=False)
        self.start, self.vocab_size, self.group = start, vocab_size, group

    @property
    def per_rank(self) -> int:
        """Rows a rank holds (the last ranks fewer, padded to this wherever ranks exchange blocks)."""
        return _rows_per_rank(self.vocab_size, dist.get_world_size(self.group))

    def whole(self) -> torch.Tensor:
        """The whole weight, on every rank (collective)."""
        whole = self.rows.new_empty((dist.get_world_size(self.group) * self.per_rank, self.rows.shape[1]))
        dist.all_gather_single(whole, F.pad(self.rows, (0, 0, 0, self.per_rank - len(self.rows))), group=self.group)
        return whole[:self.vocab_size]


class VocabShardedHead(_VocabRows):
    """An LM head (a bias-free linear layer) split by vocabulary rows."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary at this rank's positions, as the whole head would give them
        (the rows are never gathered; the logits of each rank's slice are exchanged instead).
        Collective: every rank of the group calls it (the chunked loss calls it with no positions
        and computes the loss with loss_sum)."""
        return _VocabParallelLogits.apply(self, hidden)

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Summed fp32 cross-entropy of this rank's `hidden` [positions x hidden] against `targets`,
        `chunk_size` positions per rank at a time. Collective: every rank of the group calls it."""
        return _VocabParallelCrossEntropy.apply(self, chunk_size, hidden, targets)

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor, want_grad: bool):
        """Per-position losses of the gathered positions `hidden`, the partial gradient of their sum
        with respect to `hidden` through this rank's rows (None without `want_grad`; to be summed over
        the ranks, then rounded with `round_grad`), and the dtype the logits were computed in."""
        raw = F.linear(hidden, self.rows)  # under the caller's autocast, as the whole head is
        logits = _at_least_fp32(raw)
        local = (targets - self.start).clamp(0, len(self.rows) - 1)
        mine = (targets >= self.start) & (targets < self.start + len(self.rows))
        peak = logits.amax(dim=1)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        probs = (logits - peak[:, None]).exp_()
        stats = torch.stack([probs.sum(dim=1), logits.gather(1, local[:, None]).squeeze(1) * mine])
        del logits
        dist.all_reduce(stats, group=self.group)
        total_exp, target_logit = stats
        counted = targets != IGNORE
        losses = torch.where(counted, total_exp.log() + peak - target_logit, 0.0)
        if not want_grad:
            return losses, None, raw.dtype
        # d loss / d logits = softmax - one-hot(target), zero for positions that do not count.
        probs.div_(total_exp[:, None])
        hit = (mine & counted).nonzero().squeeze(1)
        probs[hit, local[hit]] -= 1
        probs[~counted] = 0
        return losses, self.partial_grad(probs, raw.dtype), raw.dtype

    def partial_grad(self, grad_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """grad_logits [positions x this rank's rows] @ rows, as the whole head's backward computes it in
        `dtype` (autocast's, or the rows' own): the operands rounded to `dtype`, the products summed in
        fp32 and, once the ranks' parts are summed, rounded once (round_grad). A part rounded to bf16
        on each rank before the sum would differ from the whole head's by up to a bf16 ulp (4e-3)."""
        grad_logits = grad_logits[:, :len(self.rows)].to(dtype)
        out = _at_least_fp32(grad_logits.new_zeros((len(grad_logits), self.rows.shape[1])))
        for block in range(0, len(self.rows), ROW_BLOCK):  # an fp32 copy of a block of rows at a time
            rows = slice(block, block + ROW_BLOCK)
            out += _at_least_fp32(grad_logits[:, rows]) @ _at_least_fp32(self.rows[rows].to(dtype))
        return out


# Vocabulary rows upcast at a time for the hidden states' gradient (4096 x 4096 in fp32: 64 MiB).
ROW_BLOCK = 4096


def round_grad(summed: torch.Tensor, dtype: torch.dtype, hidden_dtype: torch.dtype) -> torch.Tensor:
    """The ranks' summed partial_grad as the whole head's backward returns it: its output in `dtype`,
    cast to the hidden states' dtype."""
    return summed.to(dtype).to(hidden_dtype)


class _VocabParallelLogits(torch.autograd.Function):
    """Each rank computes its rows' logits at every rank's positions; one all-to-all hands each rank
    the slices of its own positions, and the same one back carries their gradients in backward.
    Nothing is kept for backward but the shapes: the hidden states' gradient is the logits'
    gradient times the rows, in the dtype the logits were computed in (autocast's, as the whole
    head's backward)."""

    @staticmethod
    def forward(ctx, head: VocabShardedHead, hidden_in: torch.Tensor):
        hidden = hidden_in.reshape(-1, hidden_in.shape[-1])
        group = head.group
        world = dist.get_world_size(group)
        most = _most(len(hidden), group, hidden.device)
        per_rank = head.per_rank
        gathered = hidden.new_empty((world * most, hidden.shape[1]))
        dist.all_gather_single(gathered, F.pad(hidden, (0, 0, 0, most - len(hidden))), group=group)
        local = F.linear(gathered, head.rows)
        del gathered
        if len(head.rows) < per_rank:  # the last ranks may hold fewer rows: the exchanged blocks stay equal
            local = F.pad(local, (0, per_rank - len(head.rows)))
        theirs = torch.empty_like(local)
        dist.all_to_all_single(theirs, local, group=group)
        del local
        ctx.head, ctx.n, ctx.most, ctx.dtype, ctx.hidden_dtype = head, len(hidden), most, theirs.dtype, hidden.dtype
        ctx.shape = hidden_in.shape
        # Block s of `theirs` is rank s's vocabulary slice at this rank's positions. A new tensor, not
        # a view (FSDP2 warns when a module returns a view).
        logits = theirs.new_empty((*hidden_in.shape[:-1], head.vocab_size))
        for rank, block in enumerate(logits.view(len(hidden), head.vocab_size).split(per_rank, dim=1)):
            block.copy_(theirs.view(world, most, per_rank)[rank, :len(hidden), :block.shape[1]])
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        head = ctx.head
        group, world = head.group, dist.get_world_size(head.group)
        per_rank = head.per_rank
        blocks = grad_logits.new_zeros((world, ctx.most, per_rank), dtype=ctx.dtype)
        for rank, block in enumerate(grad_logits.reshape(ctx.n, grad_logits.shape[-1]).split(per_rank, dim=1)):
            blocks[rank, :ctx.n, :block.shape[1]] = block
        mine = torch.empty_like(blocks)
        dist.all_to_all_single(mine, blocks, group=group)
        del blocks
        partial = head.partial_grad(mine.view(world * ctx.most, per_rank), ctx.dtype)
        del mine
        own = partial.new_empty((ctx.most, partial.shape[1]))
        dist.reduce_scatter_single(own, partial, group=group)
        return None, round_grad(own[:ctx.n], ctx.dtype, ctx.hidden_dtype).reshape(ctx.shape)


def _rows_per_rank(vocab_size: int, world: int) -> int:
    return -(-vocab_size // world)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses and sums over the vocabulary in fp32 (or the input's own precision where it is higher)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _most(n: int, group: dist.ProcessGroup, device: torch.device) -> int:
    """The largest `n` of any rank of `group` (`device`: where the group's backend takes tensors)."""
    most = torch.tensor([n], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return int(most.item())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """As swiftdist.loss.ChunkedCrossEntropy: gradients are computed chunk by chunk in forward (so
    each chunk's logits are freed before the next) and only scaled in backward."""

    @staticmethod
    def forward(ctx, head: VocabShardedHead, chunk_size: int, hidden: torch.Tensor, targets: torch.Tensor):
        group = head.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        most = _most(len(targets), group, hidden.device)  # every rank runs as many chunks
        chunk = max(1, min(chunk_size, most))
        grad = torch.zeros_like(hidden) if hidden.requires_grad else None
        total = _at_least_fp32(hidden.new_zeros(()))
        for start in range(0, most, chunk):
            rows, row_targets = hidden[start:start + chunk], targets[start:start + chunk]
            n = len(rows)
            gathered = hidden.new_empty((world * chunk, hidden.shape[1]))
            dist.all_gather_single(gathered, F.pad(rows.detach(), (0, 0, 0, chunk - n)), group=group)
            gathered_targets = targets.new_empty(world * chunk)
            dist.all_gather_single(gathered_targets, F.pad(row_targets, (0, chunk - n), value=IGNORE), group=group)
            losses, partial, dtype = head._chunk(gathered, gathered_targets, grad is not None)
            total += losses[rank * chunk:rank * chunk + n].sum()
            if grad is not None:
                own = partial.new_empty((chunk, partial.shape[1]))
                dist.reduce_scatter_single(own, partial, group=group)
                grad[start:start + n] = round_grad(own[:n], dtype, grad.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.hidden_needs_grad = grad is not None
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return None, None, grad * grad_loss.to(grad.dtype) if ctx.hidden_needs_grad else None, None


class VocabShardedEmbedding(_VocabRows):
    """A frozen input embedding split by vocabulary rows.

    A lookup gathers every rank's token ids (integers: small), and each rank contributes the rows
    of the distinct ids in its range; so a rank receives at most one row per distinct id of the
    global batch, never more than the whole embedding."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group, world = self.group, dist.get_world_size(self.group)
        flat = ids.reshape(-1)
        most = _most(len(flat), group, ids.device)
        every = flat.new_empty(world * most)
        dist.all_gather_single(every, F.pad(flat, (0, most - len(flat)), value=-1), group=group)
        wanted = torch.unique(every)  # sorted, so each rank's range is one run of it
        wanted = wanted[wanted >= 0]
        per_rank = self.per_rank
        bounds = torch.searchsorted(wanted, torch.arange(world + 1, device=ids.device) * per_rank)
        counts = bounds.diff()
        width = int(counts.max())
        rank = dist.get_rank(group)
        mine = self.rows[wanted[bounds[rank]:bounds[rank + 1]] - self.start]
        table = self.rows.new_empty((world * width, self.rows.shape[1]))
        dist.all_gather_single(table, F.pad(mine, (0, 0, 0, width - len(mine))), group=group)
        # Distinct id j sits in block owner(j), at its place within that rank's run.
        j = torch.searchsorted(wanted, flat)
        owner = torch.bucketize(j, bounds[1:], right=True)
        return table[owner * width + j - bounds[owner]].reshape(*ids.shape, -1)


def kept_rows(model: torch.nn.Module) -> list[torch.Tensor]:
    """The rows this rank keeps of `model`'s split embedding and head (weights it holds, though no parameters)."""
    return [m.rows for m in model.modules() if isinstance(m, _VocabRows)]


def whole_weights(model: torch.nn.Module, every_name: bool = True) -> dict[str, torch.Tensor]:
    """The whole weights of `model`'s split embedding and head, keyed as their `weight` was in its
    state dict, on every rank (collective). Tied ones are gathered once and listed under both
    names, or with `every_name=False` under the first only (as named_parameters() lists them)."""
    out, gathered = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, _VocabRows):
            key = module.rows.data_ptr()
            if key not in gathered:
                gathered[key] = module.whole().cpu()
            elif not every_name:
                continue
            out[f"{name}.weight"] = gathered[key]
    return out


def _replace(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """`new`, carrying the forward hooks registered on `old` (e.g. peft's, which make a frozen
    embedding's output require grad for gradient checkpointing)."""
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        setattr(new, hooks, getattr(old, hooks))
    return new


def shard_embeddings(model: torch.nn.Module, group: dist.ProcessGroup, device: torch.device,
                     initial=None) -> tuple[bool, bool]:
    """Replace `model`'s frozen input embedding and LM head by this rank's rows of them
    (VocabShardedEmbedding, VocabShardedHead), on more than one rank: an nn.Embedding without
    max_norm and a bias-free nn.Linear that train nothing. Tied ones share one weight: both are
    replaced, sharing its rows, or neither. `initial` (swiftdist.sharded_load.InitialValues) is
    where an empty (meta) weight reads its rows from; they are taken out of it. Returns (embedding
    replaced, head replaced)."""
    from swiftdist.sharded_load import hf_model

    hf = hf_model(model)
    embedding, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    world = dist.get_world_size(group)

    def frozen(module, kind) -> bool:
        weight = getattr(module, "weight", None)
        return (world > 1 and type(module) is kind and weight is not None and not weight.requires_grad
                and not hasattr(weight, "ds_id")  # partitioned by zero.Init already
                and getattr(module, "bias", None) is None and getattr(module, "max_norm", None) is None)

    split = {"embedding": frozen(embedding, torch.nn.Embedding), "head": frozen(head, torch.nn.Linear)}
    if getattr(head, "weight", None) is embedding.weight and not all(split.values()):
        split = {"embedding": False, "head": False}
    rows_of: dict[int, tuple[torch.Tensor, int]] = {}

    def rows(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        if id(weight) not in rows_of:
            vocab_size = weight.shape[0]
            per_rank = _rows_per_rank(vocab_size, world)
            start = min(dist.get_rank(group) * per_rank, vocab_size)
            stop = min(start + per_rank, vocab_size)
            if weight.is_meta:
                name = next(n for n, p in hf.named_parameters() if p is weight)
                taken = initial.take_rows(name, start, stop)
            else:
                taken = weight.detach()[start:stop]
            rows_of[id(weight)] = taken.to(device, weight.dtype, copy=True), start
        return rows_of[id(weight)]

    if any(split.values()):
        kept = " and ".join(["the input embedding"] * split["embedding"] + ["the LM head"] * split["head"])
        log.info("%s: each rank keeps 1/%d of the rows (vocabulary-parallel, never gathered)", kept, world)
    if split["embedding"]:
        hf.set_input_embeddings(_replace(embedding, VocabShardedEmbedding(*rows(embedding.weight), embedding.weight.shape[0], group)))
    if split["head"]:
        hf.set_output_embeddings(_replace(head, VocabShardedHead(*rows(head.weight), head.weight.shape[0], group)))
    return split["embedding"], split["head"]

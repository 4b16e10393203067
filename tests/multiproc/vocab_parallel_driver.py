"""Check swiftdist.vocab_parallel against the whole LM head on every rank (torchrun, gloo).

    torchrun --nproc-per-node N tests/multiproc/vocab_parallel_driver.py OUT_DIR

Every rank builds the same random embedding, head and data, keeps its rows, and computes on its own positions
(a different count per rank, one rank with none, ignored targets among them): the summed loss and
the hidden states' gradient of the chunked loss (several chunk sizes) and of the whole logits; the embedding's lookup of each rank's own ids; which modules are split. Rank
r writes OUT_DIR/rank{r}.json with the largest differences from the whole head's.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swiftdist.data import IGNORE
from swiftdist.vocab_parallel import VocabShardedEmbedding, VocabShardedHead, shard_embeddings

VOCAB, HIDDEN = 37, 8  # a vocabulary no world size of 2-4 divides evenly


class TinyLM(torch.nn.Module):
    """Just what shard_head reads of an HF model: its input and output embeddings."""

    def __init__(self):
        super().__init__()
        self.embed, self.lm_head = torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lm_head.weight.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def set_input_embeddings(self, embedding):
        self.embed = embedding

    def set_output_embeddings(self, head):
        self.lm_head = head


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # What is split: frozen weights only (a trained one needs its optimizer and wrapper), and tied
    # ones both or neither.
    trained_head = TinyLM()
    trained_head.lm_head.weight.requires_grad_(True)
    trained_head.embed.weight.requires_grad_(False)
    tied = TinyLM()
    tied.lm_head.weight = tied.embed.weight  # trainable: neither is split
    frozen_tied = TinyLM()
    frozen_tied.lm_head.weight = frozen_tied.embed.weight
    frozen_tied.embed.weight.requires_grad_(False)
    out = {"which": [
        shard_embeddings(trained_head, dist.group.WORLD, torch.device("cpu")) != (True, False),
        shard_embeddings(tied, dist.group.WORLD, torch.device("cpu")) != (False, False),
        shard_embeddings(frozen_tied, dist.group.WORLD, torch.device("cpu")) != (True, True),
        frozen_tied.embed.rows is not frozen_tied.lm_head.rows,  # one set of rows for both
    ]}
    model = TinyLM()
    weight = model.lm_head.weight.detach().clone()
    embedding = model.embed.weight.detach().clone()
    counts = [5, 0, 11, 3][:world]  # rank 1 has no positions at all
    hidden_all = [torch.randn(n, HIDDEN, dtype=torch.float64) for n in counts]
    targets_all = [torch.randint(0, VOCAB, (n,)) for n in counts]
    for t in targets_all:
        t[::3] = IGNORE
    model.lm_head.weight.data = weight.double()
    model.embed.weight.data = embedding.double()
    model.embed.weight.requires_grad_(False)
    assert shard_embeddings(model, dist.group.WORLD, torch.device("cpu")) == (True, True)
    head = model.lm_head
    assert isinstance(head, VocabShardedHead) and isinstance(model.embed, VocabShardedEmbedding)
    assert len(head.rows) < VOCAB and len(model.embed.rows) < VOCAB
    # Every rank looks up its own ids (the lookup gathers only the distinct ids in use).
    ids = torch.randint(0, VOCAB, (rank + 1, 3 + rank))
    ids[0, 0] = VOCAB - 1  # the last row, on the last rank
    out["embedding"] = [(model.embed(ids) - embedding.double()[ids]).abs().max().item()]
    hidden, targets = hidden_all[rank], targets_all[rank]
    # fp64: the two ways of summing agree to ~1e-15, so any real error (a wrong slice or offset) shows.
    ref_hidden = hidden.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_hidden @ weight.double().T, targets, reduction="sum", ignore_index=IGNORE)
    ref_loss.backward()
    for chunk in (1, 2, 4, 1024):
        h = hidden.clone().requires_grad_()
        loss = head.loss_sum(h, targets, chunk)
        (2 * loss).backward()  # a scaled loss: backward scales the gradients computed in forward
        out[f"chunk{chunk}"] = [abs(loss - ref_loss).item(), (h.grad - 2 * ref_hidden.grad).abs().max().item()
                                if len(h) else 0.0]
    h = hidden.clone().requires_grad_()
    logits = head(h.unsqueeze(0))[0]
    loss = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    loss.backward()
    ref_logits = hidden @ weight.double().T
    out["logits"] = [(logits - ref_logits).abs().max().item() if len(h) else 0.0, abs(loss - ref_loss).item(),
                     (h.grad - ref_hidden.grad).abs().max().item() if len(h) else 0.0]
    with torch.no_grad():  # evaluation: no gradient is computed, the same loss
        out["no_grad"] = [abs(head.loss_sum(hidden, targets, 4) - ref_loss).item()]
    json.dump(out, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Sequence parallelism without processes: what is refused (one line, naming a size that works) and
how a micro-batch is cut (labels shifted before the cut, positions kept, padding its own segment)."""

import pytest
import torch
from transformers import LlamaConfig

from swiftdist.config import parse_config
from swiftdist.data import IGNORE
from swiftdist.distributed import init_distributed
from swiftdist.errors import SwiftdistError
from swiftdist.loss import shifted_targets
from swiftdist.sequence_parallel import SequenceParallel, check
from swiftdist.trainer import Trainer


def config(heads: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads)


def test_refusals_name_the_largest_size_that_works():
    check(2, 4, config(4, 2), True)
    with pytest.raises(SwiftdistError, match="4 attention heads and 2 KV heads must both divide by it.*is 2$"):
        check(4, 4, config(4, 2), True)
    with pytest.raises(SwiftdistError, match="the 4 ranks must split into groups of 3; the largest size .* is 4$"):
        check(3, 4, config(8, 8), True)
    with pytest.raises(SwiftdistError, match="megatron splits sequences itself"):
        check(2, 2, config(4, 4), False)


def test_a_refusal_comes_before_the_model_loads(tmp_path, process_group):
    argv = ["--model", "tiny-llama", "--sequence-parallel", "2", "--output-dir", str(tmp_path)]
    with pytest.raises(SwiftdistError, match="the 1 ranks must split into groups of 2") as e:
        Trainer(parse_config(argv), init_distributed())
    assert "\n" not in str(e.value) and not (tmp_path / "config.yaml").exists()


def test_slices_carry_the_targets_shifted_before_the_cut():
    ids = torch.arange(1, 8).unsqueeze(0)  # 7 tokens: padded to 8, 4 per rank
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, 6, 7]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])  # two packed samples
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    parts = [SequenceParallel(2, r, packed=True).shard(dict(batch)) for r in range(2)]
    targets = torch.cat([p["shift_labels"] for p in parts], dim=1)
    # Rank 0's last token (position 3) predicts rank 1's first token (label 5): the shift crossed the cut.
    assert targets.tolist() == [[*shifted_targets(labels)[0].tolist(), IGNORE]]
    assert torch.cat([p["position_ids"] for p in parts], dim=1).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert parts[1]["input_ids"].tolist() == [[5, 6, 7, 0]] and "labels" not in parts[1]


def test_estimate_counts_a_ranks_share_of_the_activations(capsys):
    from swiftdist import estimate

    def rows(*argv):
        estimate.main(["--model", "tiny-llama", "--strategy", "ddp", "--precision", "fp32", *argv])
        return capsys.readouterr().out.splitlines()[-1]
    # A rank of an SP=2 group keeps the activations of half of each 256-token sequence.
    assert rows("--seq-len", "256", "--sequence-parallel", "2") == rows("--seq-len", "128")
    assert rows("--seq-len", "256", "--sequence-parallel", "2") != rows("--seq-len", "256")

"""The vocabulary-parallel LM head (swiftdist/vocab_parallel.py) against the whole head, and in
training: fsdp and zero3 LoRA on an untied model (tiny-qwen2) against DDP, where the head is split."""

import json
import sys

import pytest
import torch

from tests.helpers import REPO, free_port, losses, run_cmd
from tests.multiproc.test_sharded import run_group

DRIVER = str(REPO / "tests" / "multiproc" / "vocab_parallel_driver.py")


@pytest.mark.parametrize("nproc", [2, 3])
def test_loss_and_gradients_equal_the_whole_heads(tmp_path, nproc):
    run_cmd([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
             DRIVER, str(tmp_path)], cwd=str(REPO))
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # fp64 throughout: the split sums (max, exponentials, target logit, gradient over vocabulary
        # slices) differ from the whole head's only by round-off, ~1e-15 on losses of ~30; a wrong
        # row offset, a missed position or a gradient not scaled in backward is >= 1e-2.
        for name, differences in result.items():
            assert max(differences) < 1e-12, (rank, name, result)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", ["0", "16"])
def test_fsdp_and_zero3_lora_learn_as_ddp_with_the_head_split(tmp_path, chunk):
    runs = run_group(tmp_path, "lora", "fp32", 4, ["ddp", "fsdp", "zero3"], "--model", "tiny-qwen2",
                     "--loss-chunk-size", chunk)
    assert (runs["ddp"] / "head.txt").read_text() == "Linear"
    for name in ("fsdp", "zero3"):
        assert (runs[name] / "head.txt").read_text() == "VocabShardedHead", name
        # fp32 round-off only (as in test_sharded.py's parity test): the logsumexp and the hidden
        # states' gradient are summed over vocabulary slices instead of in one matmul.
        assert losses(runs[name]) == pytest.approx(losses(runs["ddp"]), rel=1e-6), name
        # The whole logits (the driver's probe batch, through the model's own forward): exchanged slices.
        torch.testing.assert_close(torch.load(runs[name] / "probe_logits.pt"), torch.load(runs["ddp"] / "probe_logits.pt"),
                                   rtol=1e-5, atol=1e-5)

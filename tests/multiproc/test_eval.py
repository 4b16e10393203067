"""`swiftdist eval` on a finished training run: --from-run rebuilds its validation split, and two
ranks under torchrun score exactly what one process scores."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import arithmetic_rows, free_port, metrics, run_cmd, sft, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = write_jsonl(tmp / "chat.jsonl", arithmetic_rows(12))
    out = tmp / "run"
    # fp32: the trainer's own eval_loss then uses the same arithmetic as `swiftdist eval`.
    sft(1, ["--model", "tiny-llama", "--dataset", str(data), "self-cognition#6", "--val-split", "0.4",
            "--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--precision", "fp32", "--output-dir", str(out)])
    return out


def evaluate(nproc: int, args: list[str]) -> dict:
    prefix = ([sys.executable, "-m", "swiftdist.evaluate"] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
               "-m", "swiftdist.evaluate"])
    run_cmd(prefix + args + ["--max-new-tokens", "6"])
    out = args[args.index("--output-dir") + 1]
    return json.loads((Path(out) / "eval.json").read_text())


def test_from_run_scores_the_held_out_split_as_the_trainer_did(run_dir, tmp_path):
    result = evaluate(1, ["--from-run", str(run_dir), "--output-dir", str(tmp_path / "one")])
    # 18 conversations, 40% held out -> 7 (int(7.2)); they are the trainer's: same loss on the same weights.
    assert result["after"]["all"]["samples"] == 7
    assert result["adapter"] == str(run_dir / "final")
    trainer_eval = [r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r][-1]
    # Same fp32 forward on the same samples; only batching (4 rows padded vs one at a time) differs.
    assert result["after"]["all"]["loss"] == pytest.approx(trainer_eval, rel=1e-5)


def test_two_ranks_score_what_one_scores(run_dir, tmp_path):
    # One conversation per generate call: a random model's near-uniform logits could let left-padding
    # noise flip a greedy token, and this test is about how the ranks share the work.
    args = ["--from-run", str(run_dir), "--baseline", "--batch-size", "1"]
    one = evaluate(1, args + ["--output-dir", str(tmp_path / "one")])
    two = evaluate(2, args + ["--output-dir", str(tmp_path / "two")])
    assert two["after"]["all"]["samples"] == 7 and two["before"]["all"]["samples"] == 7
    for side in ("before", "after"):
        assert [s[side]["answer"] for s in two["samples"]] == [s[side]["answer"] for s in one["samples"]]
        for group, summary in one[side].items():
            # Each sample is scored alone on either rank: the sums differ only in their order.
            assert two[side][group] == pytest.approx(summary, rel=1e-6), (side, group)
    assert one["after"]["all"]["loss"] < one["before"]["all"]["loss"]  # training at lr 1e-2 did something

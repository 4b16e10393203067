"""Resume exactness, on the same and on other world sizes, and across strategies.

What "equal" means here:
- same world size: the resumed run's losses and final adapter equal the uninterrupted run's bit for
  bit (CPU, fp32; LoRA dropout on, so the per-step RNG derivation is exercised too).
- another world size with the same global batch (2 ranks x 2 -> 1 rank x 2 x 2 accumulated): every
  step trains on the same samples with the same dropout masks (each micro-batch is seeded from its
  position in the global batch, not from the rank), and losses / weights agree to float rounding
  (the token sums are added in another order).
- another world size with another global batch (2 -> 3, 1 -> 2): the steps differ, so the claim is
  sample coverage: each sample of each epoch is trained on exactly once.

The uninterrupted reference runs are cached per session (`reference`) and reused by test_preempt.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftdist.strategies import names
from tests.helpers import arithmetic_rows, losses, run_cmd, sft, torchrun_cmd, write_jsonl
from tests.helpers import test_env as process_env

pytestmark = pytest.mark.slow

ROWS = 16
ALL_STRATEGIES = [s for s in ("ddp", "fsdp", "zero2", "zero3") if s in names()]


def train_args(data: Path, out: Path, *extra: str, strategy: str = "ddp", dropout: float = 0.05) -> list[str]:
    """2 epochs of 16 rows at batch 2: 8 steps on 2 ranks (epoch 1 starts at step 5), a checkpoint every 2."""
    return ["--model", "tiny-llama", "--dataset", str(data), "--output-dir", str(out), "--strategy", strategy,
            "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--precision", "fp32",
            "--lora-dropout", str(dropout), "--save-steps", "2", "--save-total-limit", "0",
            "--log-samples", *extra]


_references: dict[tuple, Path] = {}


def reference(tmp_path_factory, strategy: str = "ddp", dropout: float = 0.05) -> Path:
    """The uninterrupted 2-rank run (once per session and configuration); its output dir."""
    key = (strategy, dropout)
    if key not in _references:
        root = tmp_path_factory.mktemp(f"reference-{strategy}-{dropout}")
        sft(2, train_args(dataset(root), root / "out", strategy=strategy, dropout=dropout))
        _references[key] = root / "out"
    return _references[key]


def dataset(directory: Path) -> Path:
    return write_jsonl(directory / "data.jsonl", arithmetic_rows(ROWS))


def data_of(out: Path) -> Path:
    return out.parent / "data.jsonl"


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


def samples_by_step(out: Path) -> dict[int, tuple[int, list[int]]]:
    """step -> (epoch, sample ids of all ranks). A step recorded twice (re-run after a crash) keeps its last record."""
    per_rank = [{r["step"]: r for r in map(json.loads, f.read_text().splitlines())}
                for f in sorted(out.glob("samples-rank*.jsonl"))]
    steps = sorted(set().union(*per_rank))
    return {s: (per_rank[0][s]["epoch"], [i for rank in per_rank for ids in rank[s]["samples"] for i in ids])
            for s in steps}


def assert_each_sample_once_per_epoch(*parts: dict, epochs: int) -> None:
    seen = {e: Counter() for e in range(epochs)}
    for part in parts:
        for epoch, ids in part.values():
            seen[epoch].update(ids)
    for epoch, counts in seen.items():
        assert counts == Counter(range(ROWS)), f"epoch {epoch}: repeated {[i for i, c in counts.items() if c > 1]}, " \
                                               f"missing {sorted(set(range(ROWS)) - set(counts))}"


def assert_same_adapter(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    if atol == 0.0:
        assert all(torch.equal(a[k], b[k]) for k in a), "adapters differ"
    else:
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= atol, f"adapters differ by up to {worst:.3g} (> {atol})"


def resume(nproc: int, ref: Path, step: int, out: Path, *extra: str, strategy: str = "ddp", dropout: float = 0.05,
           batch_size: int = 2):
    ckpt = ref / "checkpoints" / f"step-{step:06d}"
    args = train_args(data_of(ref), out, "--resume", str(ckpt), *extra, strategy=strategy, dropout=dropout)
    args[args.index("--batch-size") + 1] = str(batch_size)
    return sft(nproc, args)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_resume_on_the_same_world_size_is_bit_exact(tmp_path_factory, tmp_path, strategy):
    ref = reference(tmp_path_factory, strategy)
    resume(2, ref, 2, tmp_path / "out", strategy=strategy)
    assert losses(tmp_path / "out") == losses(ref)[2:]
    assert_same_adapter(adapter(tmp_path / "out"), adapter(ref))
    expected = {s: v for s, v in samples_by_step(ref).items() if s > 2}
    assert samples_by_step(tmp_path / "out") == expected


def test_two_ranks_resume_on_one_with_the_same_global_batch(tmp_path_factory, tmp_path):
    """DDP only: FSDP reads the same DCP shards (test_resume_under_another_dcp_strategy, 2 -> 3 below).
    LoRA dropout is on: the masks follow the samples' positions, not the ranks."""
    ref = reference(tmp_path_factory, "ddp")
    resume(1, ref, 2, tmp_path / "out", "--grad-accum", "2")
    resumed, original = samples_by_step(tmp_path / "out"), samples_by_step(ref)
    assert {s: (e, sorted(ids)) for s, (e, ids) in resumed.items()} == \
           {s: (e, sorted(ids)) for s, (e, ids) in original.items() if s > 2}
    # fp32 sums of the same terms in another order (two micro-batches of one rank vs an all-reduce of
    # two ranks): differences of a few ulps, growing over 6 Adam steps to ~1e-7 on weights of ~1e-2.
    assert losses(tmp_path / "out") == pytest.approx(losses(ref)[2:], rel=1e-5)
    assert_same_adapter(adapter(tmp_path / "out"), adapter(ref), atol=1e-6)


# DeepSpeed checkpoints are converted to its universal format when the world size changes.
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_two_ranks_resume_on_three_and_cover_each_sample_once(tmp_path_factory, tmp_path, strategy):
    ref = reference(tmp_path_factory, strategy)
    resume(3, ref, 2, tmp_path / "out", strategy=strategy)
    before = {s: v for s, v in samples_by_step(ref).items() if s <= 2}
    after = samples_by_step(tmp_path / "out")
    # 8 samples by 2 ranks, then global batch 6: 8 left in epoch 0 (6 + a short step of 2, in which
    # rank 2 has no sample and joins with a padding row), 16 in epoch 1.
    assert [len(ids) for _, ids in after.values()] == [6, 2, 6, 6, 4]
    assert_each_sample_once_per_epoch(before, after, epochs=2)


def test_one_rank_resumes_on_two_and_covers_each_sample_once(tmp_path):
    data = dataset(tmp_path)
    first = train_args(data, tmp_path / "one", "--max-steps", "3", "--save-steps", "3")
    sft(1, first)
    # Dropping --max-steps on resume lengthens the run to the 2 epochs; 6 samples were consumed.
    sft(2, train_args(data, tmp_path / "two", "--resume", str(tmp_path / "one")))
    assert_each_sample_once_per_epoch(samples_by_step(tmp_path / "one"), samples_by_step(tmp_path / "two"), epochs=2)


@pytest.mark.skipif("fsdp" not in names(), reason="the fsdp strategy is not registered")
@pytest.mark.parametrize("saved_by, resumed_by", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_resume_under_another_dcp_strategy(tmp_path_factory, tmp_path, saved_by, resumed_by):
    """DCP keys are the plain model's (no DDP/FSDP prefixes), so either reads the other's checkpoint."""
    ref = reference(tmp_path_factory, saved_by)
    resume(2, ref, 2, tmp_path / "out", strategy=resumed_by)
    assert losses(tmp_path / "out") == pytest.approx(losses(ref)[2:], rel=1e-5)
    assert_same_adapter(adapter(tmp_path / "out"), adapter(ref), atol=1e-6)


@pytest.mark.skipif("zero3" not in names(), reason="the zero3 strategy is not registered")
def test_resume_refuses_a_checkpoint_the_strategy_cannot_read(tmp_path_factory, tmp_path):
    ref = reference(tmp_path_factory, "ddp")
    args = train_args(data_of(ref), tmp_path / "out", "--resume", str(ref), strategy="zero3")
    proc = run_cmd(torchrun_cmd(1, args), env=process_env(), check=False)
    assert proc.returncode == 2
    assert "--strategy ddp in dcp format, which --strategy zero3 (deepspeed-zero3 format) cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr

"""Losing no work: exact --max-steps, rollbacks, changed data on resume, damaged checkpoints, a full
disk, fsync before COMPLETE, time-based saves, and monitoring that continues across a resume.

In-process runs of the tiny model (one process, fp32): each takes a few seconds."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftdist import checkpoint, preemption
from swiftdist.checkpoint import TrainerState
from swiftdist.config import parse_config
from swiftdist.data import StepSampler
from swiftdist.distributed import init_distributed
from swiftdist.errors import SwiftdistError
from swiftdist.trainer import PREEMPTED_EXIT_CODE, Trainer
from tests.helpers import arithmetic_rows, metrics, write_jsonl


def args(data: Path, out: Path, *extra: str) -> list[str]:
    """10 rows at batch 4: an epoch is 3 steps (4, 4, 2)."""
    return ["--model", "tiny-llama", "--dataset", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--epochs", "3", "--lr", "1e-3", "--precision", "fp32", "--lora-rank", "4", *extra]


def run(argv: list[str], stop_after: int | None = None) -> tuple[int, Trainer]:
    """One in-process run; `stop_after` delivers a stop request (as SIGTERM would) after that step."""
    trainer = Trainer(parse_config(argv), init_distributed())
    if stop_after is not None:
        log_step = trainer._log_step

        def log_and_maybe_stop(*a, **kw):
            log_step(*a, **kw)
            if trainer.state.step == stop_after:
                preemption._record(signal.SIGTERM, None)
        trainer._log_step = log_and_maybe_stop
    return trainer.train(), trainer


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", arithmetic_rows(10))


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in metrics(out) if "loss" in r]


# ---- --max-steps ---------------------------------------------------------------------------------


def test_max_steps_runs_exactly_that_many_steps_across_an_epoch_boundary(data, tmp_path, process_group):
    # 10 rows, global batch 4: steps take 4, 4, 2 | 4, ... so 4 steps are 14 samples, not 16 (which took 5).
    assert StepSampler(10, 0, 4, 1, 0, 1).run_length(4, 1) == 14
    code, trainer = run(args(data, tmp_path / "out", "--max-steps", "4"))
    assert code == 0 and trainer.state.step == 4 and steps_logged(tmp_path / "out") == [1, 2, 3, 4]


# ---- rollback --------------------------------------------------------------------------------------


def test_rollback_then_interrupt_then_resume_auto_continues_the_new_line(data, tmp_path, process_group):
    out = tmp_path / "out"
    root = checkpoint.checkpoints_root(str(out))
    assert run(args(data, out, "--max-steps", "8", "--save-steps", "2", "--save-total-limit", "2"))[0] == 0
    assert [p.name for p in checkpoint.complete_checkpoints(str(out))] == ["step-000006", "step-000008"]
    shutil.copytree(root / "step-000006", tmp_path / "step-000006")  # for the reference below
    # The user rolls back to step 6 with a lower lr, keeping only 1 checkpoint, and is interrupted at step 7.
    code, _ = run(args(data, out, "--max-steps", "8", "--save-steps", "2", "--save-total-limit", "1", "--lr", "5e-4",
                       "--resume", str(root / "step-000006")), stop_after=7)
    assert code == PREEMPTED_EXIT_CODE
    # The abandoned step 8 was moved aside, not deleted; retention kept the checkpoint just written (7)
    # and the one resumed from (6), although the limit is 1.
    assert [p.name for p in checkpoint.complete_checkpoints(str(out))] == ["step-000006", "step-000007"]
    assert [p.name for p in (root / checkpoint.ABANDONED).glob("*/step-*")] == ["step-000008"]
    assert (root / "latest").resolve().name == "step-000007"
    code, trainer = run(args(data, out, "--max-steps", "8", "--save-steps", "2", "--lr", "5e-4", "--resume", "auto"))
    assert code == 0 and trainer.checkpointer.resumed_from.name == "step-000007"
    # The new line ends equal to a rollback that was never interrupted.
    ref = tmp_path / "ref"
    run(args(data, ref, "--max-steps", "8", "--lr", "5e-4", "--resume", str(tmp_path / "step-000006")))
    a, b = adapter(out), adapter(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- what a data position means ---------------------------------------------------------------------


def test_changed_data_is_refused_in_one_line_or_restarts_the_position_when_allowed(data, tmp_path, process_group):
    out = tmp_path / "out"
    run(args(data, out, "--max-steps", "2", "--save-steps", "2"))
    write_jsonl(data, arithmetic_rows(11))  # one more row: position 8 of the old order means other samples now
    with pytest.raises(SwiftdistError) as e:
        run(args(data, out, "--max-steps", "4", "--resume", "auto"))
    message = str(e.value)
    assert "\n" not in message and f"dataset {data} (10 rows -> 11, content differs)" in message
    assert "--ignore-data-changes" in message
    code, trainer = run(args(data, out, "--max-steps", "4", "--resume", "auto", "--ignore-data-changes"))
    assert code == 0 and trainer.checkpointer.resumed_from.name == "step-000002"
    # Weights and step continue; the data restarts at its beginning for a run of 4 more steps.
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]


def test_identity_names_a_changed_max_length():
    base = {"model": {"path": "m", "config": "a", "weights": "b"}, "datasets": [], "max_length": 512,
            "truncation": "truncate", "packing": False, "seed": 1, "train_samples": 3, "train_tokens": "x"}
    assert checkpoint.identity_changes(base, dict(base)) == []
    assert checkpoint.identity_changes(base, {**base, "max_length": 1024}) == ["--max-length 512 -> 1024"]
    assert checkpoint.identity_changes({}, base) == []  # older checkpoints carry no record


# ---- damaged checkpoints and full disks ---------------------------------------------------------------


def _largest_shard(ckpt: Path) -> Path:
    return max((p for p in (ckpt / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_truncated_newest_checkpoint_falls_back_with_auto_and_is_named_when_explicit(data, tmp_path, process_group,
                                                                                      caplog):
    out = tmp_path / "out"
    run(args(data, out, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"))
    newest = checkpoint.checkpoints_root(str(out)) / "step-000004"
    shard = _largest_shard(newest)
    subprocess.run(["truncate", "-s", str(shard.stat().st_size // 2), str(shard)], check=True)
    with pytest.raises(SwiftdistError) as e:
        run(args(data, out, "--max-steps", "4", "--resume", str(newest)))
    assert "\n" not in str(e.value) and str(shard) in str(e.value) and "damaged checkpoint" in str(e.value)
    (shard.parent / "gone").write_text("")
    shard.unlink()
    with caplog.at_level("WARNING", logger="swiftdist"):
        assert checkpoint.resolve_resume("auto", str(out)).name == "step-000002"
    assert f"skipping damaged checkpoint step-000004: {shard} is missing" in caplog.text


def test_files_are_fsynced_before_complete_is_written(tmp_path, monkeypatch):
    tmp = checkpoint.tmp_dir(str(tmp_path), 3)
    checkpoint.prepare(tmp)
    (tmp / "model").mkdir()
    (tmp / "model" / "shard.bin").write_bytes(b"x" * 100)
    synced_before_marker = set()
    real_fsync = checkpoint._fsync

    def record(path):
        if not (tmp / checkpoint.COMPLETE).exists():
            synced_before_marker.add(str(Path(path).relative_to(tmp)) if Path(path).is_relative_to(tmp) else "outside")
        real_fsync(path)
    monkeypatch.setattr(checkpoint, "_fsync", record)
    checkpoint.commit(tmp, TrainerState(step=3), keep=0)
    assert {"model/shard.bin", "model", checkpoint.MANIFEST, checkpoint.STATE_FILE, "."} <= synced_before_marker
    assert json.loads((tmp.with_name("step-000003") / checkpoint.MANIFEST).read_text())["model/shard.bin"] == 100


def _mount_small_disk(path: Path, size: str) -> None:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); CI runs as root and can")


def test_a_full_disk_stops_in_one_line_and_keeps_the_previous_checkpoint(data, tmp_path, process_group):
    # How big one checkpoint of this run is, measured on a normal disk.
    probe = tmp_path / "probe"
    run(args(data, probe, "--max-steps", "1", "--save-steps", "1"))
    size = sum(p.stat().st_size for p in (checkpoint.checkpoints_root(str(probe)) / "step-000001").rglob("*")
               if p.is_file())
    disk = tmp_path / "disk"
    # Room for the metrics and one checkpoint and a half: the second save fills the disk.
    _mount_small_disk(disk, f"{int(size * 1.5) // 1024 + 64}k")
    try:
        out = disk / "out"
        with pytest.raises(SwiftdistError) as e:
            run(args(data, out, "--max-steps", "4", "--save-steps", "1", "--save-total-limit", "0"))
        message = str(e.value)
        assert "\n" not in message and "No space left on device" in message
        assert "step-000001 is complete and resumable" in message
        assert [p.name for p in checkpoint.checkpoints_root(str(out)).iterdir() if p.name.startswith("step")] == \
               ["step-000001"]  # the partial save was removed, freeing its space
        resumable = checkpoint.resolve_resume("auto", str(out))
        assert resumable.name == "step-000001" and checkpoint.damage(resumable) is None
        moved = tmp_path / "moved"
        shutil.copytree(out, moved, symlinks=True)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    code, trainer = run(args(data, moved, "--max-steps", "4", "--resume", "auto"))
    assert code == 0 and trainer.checkpointer.resumed_from.name == "step-000001"


# ---- time-based saves and monitoring ------------------------------------------------------------------


def test_save_minutes_saves_on_rank_zeros_clock(data, tmp_path, process_group, monkeypatch):
    clock = iter(range(0, 10_000, 40))  # every call to the clock is 40 s later
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: next(clock))
    out = tmp_path / "out"
    run(args(data, out, "--max-steps", "3", "--save-minutes", "1", "--save-total-limit", "0"))
    # Reads of the clock: at start (0), then one per step (40, 80: due), a save resets it (120), 160 ...
    saved = [p.name for p in checkpoint.complete_checkpoints(str(out))]
    assert "step-000003" in saved and len(saved) >= 2, saved


def test_a_resumed_run_keeps_its_wandb_run_and_plots_the_whole_run(data, tmp_path, process_group, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    first = args(data, out, "--max-steps", "4", "--save-steps", "2", "--report-to", "jsonl", "wandb")
    code, trainer = run(first, stop_after=2)
    run_id = trainer.state.wandb_run_id
    assert code == PREEMPTED_EXIT_CODE and run_id
    time.sleep(0.01)
    code, trainer = run([*first, "--resume", "auto"])
    assert code == 0 and trainer.state.wandb_run_id == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both starts log into run `run_id`
    history = trainer.metrics.history
    assert [r["step"] for r in history if "loss" in r] == [3, 4]
    assert steps_logged(out) == [1, 2, 3, 4]  # loss.png is drawn from these, the first start's steps included

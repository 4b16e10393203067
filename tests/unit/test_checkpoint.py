"""Checkpoint layout without processes: atomic commit, `latest`, retention, partial saves, resume
discovery and refusals, and the export's shard writer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from swiftdist import checkpoint
from swiftdist.checkpoint import TrainerState
from swiftdist.errors import SwiftdistError
from swiftdist.export import _write_shards


def _save(out, step, keep=2):
    tmp = checkpoint.tmp_dir(str(out), step)
    checkpoint.prepare(tmp)
    (tmp / "model").mkdir()
    return checkpoint.commit(tmp, TrainerState(step=step), keep)


def test_commit_marks_complete_points_latest_and_prunes(tmp_path):
    for step in (2, 4, 6):
        final = _save(tmp_path, step)
    assert final.name == "step-000006" and (final / checkpoint.COMPLETE).exists()
    assert [p.name for p in checkpoint.complete_checkpoints(str(tmp_path))] == ["step-000004", "step-000006"]
    assert (checkpoint.checkpoints_root(str(tmp_path)) / "latest").resolve() == final
    assert TrainerState.from_file(final / checkpoint.STATE_FILE).step == 6


def test_partial_saves_are_never_loaded_and_are_cleaned(tmp_path):
    good = _save(tmp_path, 2)
    root = checkpoint.checkpoints_root(str(tmp_path))
    crashed = checkpoint.tmp_dir(str(tmp_path), 4)  # a save killed mid-write
    crashed.mkdir()
    (crashed / "model").mkdir()
    unmarked = root / "step-000006"  # a folder without COMPLETE, e.g. copied by hand
    unmarked.mkdir()
    assert checkpoint.resolve_resume("auto", str(tmp_path)) == good
    checkpoint.clean_partial(str(tmp_path))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]


@pytest.mark.parametrize("given", ["step", "checkpoints", "output"])
def test_resume_path_accepts_checkpoint_checkpoints_dir_or_output_dir(tmp_path, given):
    _save(tmp_path, 2)
    final = _save(tmp_path, 4)
    path = {"step": final, "checkpoints": final.parent, "output": tmp_path}[given]
    assert checkpoint.resolve_resume(str(path), "elsewhere") == final


def test_resume_auto_starts_fresh_and_a_bad_path_is_one_line(tmp_path):
    assert checkpoint.resolve_resume("auto", str(tmp_path)) is None
    assert checkpoint.resolve_resume(None, str(tmp_path)) is None
    (tmp_path / "nope").mkdir()  # a folder that is not a checkpoint
    with pytest.raises(SwiftdistError, match="no COMPLETE marker") as e:
        checkpoint.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(SwiftdistError, match="missing: no such file or directory$"):  # a typo in the path
        checkpoint.resolve_resume(str(tmp_path / "missing"), str(tmp_path))


def test_refusals_name_what_differs(tmp_path):
    saved = TrainerState(strategy="ddp", checkpoint_format="dcp", train_type="lora")
    checkpoint.check_resumable(saved, tmp_path, "lora", "fsdp", "dcp")  # fsdp reads ddp's DCP shards
    with pytest.raises(SwiftdistError, match="--strategy ddp in dcp format.*--strategy zero3 .deepspeed-zero3 format"):
        checkpoint.check_resumable(saved, tmp_path, "lora", "zero3", "deepspeed-zero3")
    zero2 = TrainerState(strategy="zero2-offload", checkpoint_format="deepspeed-zero2", train_type="lora")
    checkpoint.check_resumable(zero2, tmp_path, "lora", "zero2", "deepspeed-zero2")  # offload or not: same files
    with pytest.raises(SwiftdistError, match="--strategy zero2-offload in deepspeed-zero2 format, which --strategy "
                                             "zero3 .deepspeed-zero3 format. cannot read"):
        checkpoint.check_resumable(zero2, tmp_path, "lora", "zero3", "deepspeed-zero3")
    with pytest.raises(SwiftdistError, match="--train-type lora, now full"):
        checkpoint.check_resumable(saved, tmp_path, "full", "ddp", "dcp")


def test_state_file_ignores_unknown_keys_and_fills_new_ones(tmp_path):
    path = tmp_path / checkpoint.STATE_FILE
    path.write_text(json.dumps({"step": 3, "from_the_future": 1}))
    state = TrainerState.from_file(path)
    assert state.step == 3 and state.checkpoint_format == "" and state.total_samples == 0


def test_export_shards_stay_under_the_limit_and_index_every_tensor(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}  # 8 KiB each in bf16
    tensors["big.weight"] = torch.ones(256, 64)  # 32 KiB in bf16: bigger than a shard, so alone in one
    _write_shards(iter(tensors.items()), tmp_path / "out", torch.bfloat16, max_bytes=20 * 1024)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    # Sizes are counted after the dtype conversion: two layers per shard, then the rest.
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [k for k, f in index["weight_map"].items() if f == files[-1]] == ["big.weight"]
    loaded = {k: v for f in files for k, v in load_file(tmp_path / "out" / f).items()}
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k].float(), tensors[k]) for k in tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())

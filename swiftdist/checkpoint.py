"""Checkpoint layout, atomic commit, retention and resume discovery.

    out/checkpoints/step-000200/
        COMPLETE              written last; a folder without it is never loaded
        trainer_state.json    step, data position, world size, strategy, versions
        model/                the strategy's native sharded model + optimizer state
        adapter/ | hf/        peft adapter (LoRA) or full HF model, when gathered
    out/checkpoints/latest -> step-000200

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash mid-save leaves
the previous checkpoint intact and the partial one is cleaned up at the next start.
RNG needs no state: dropout randomness is seeded from (seed, step, rank) at every step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from swiftdist.errors import SwiftdistError

log = logging.getLogger("swiftdist")

STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    consumed_in_epoch: int = 0  # samples of the current epoch's permutation already trained on
    consumed_total: int = 0
    world_size: int = 1
    dp_size: int = 1
    strategy: str = "ddp"
    checkpoint_format: str = ""  # the strategy's native format ("dcp", ...); "" in checkpoints older than the field
    train_type: str = "lora"
    total_samples: int = 0  # the run's length, fixed at its first start (0: older checkpoint, recompute)
    max_steps: int = -1  # the --max-steps / --epochs that set total_samples: changing them on resume resizes the run
    epochs: int = 1
    model: str = ""
    base_dtype: str = "float32"  # what the base weights were loaded as (QLoRA quantises from it; export replays it)
    versions: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "TrainerState":
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoints_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step-{step:06d}"


def complete_checkpoints(output_dir: str) -> list[Path]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """`auto` -> newest complete checkpoint (or None: start fresh); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    return find_complete(resume, "--resume")


def find_complete(path: str, flag: str) -> Path:
    """The checkpoint itself, or the newest one of a checkpoints/ folder or an output dir (via `latest`)."""
    for candidate in (Path(path), Path(path) / "latest", Path(path) / "checkpoints" / "latest"):
        if (candidate / COMPLETE).exists():
            return candidate.resolve()
    raise SwiftdistError(f"{flag} {path}: not a complete checkpoint (no {COMPLETE} marker)")


def check_resumable(saved: TrainerState, path: Path, train_type: str, strategy: str, checkpoint_format: str) -> None:
    """Refuse, in one line, a checkpoint the current run cannot continue from."""
    if saved.train_type != train_type:
        raise SwiftdistError(f"--resume {path}: saved with --train-type {saved.train_type}, "
                             f"now {train_type}; they must match")
    if saved.checkpoint_format and saved.checkpoint_format != checkpoint_format:
        raise SwiftdistError(
            f"--resume {path}: written by --strategy {saved.strategy} in {saved.checkpoint_format} format, which "
            f"--strategy {strategy} ({checkpoint_format} format) cannot read; resume with a strategy that reads "
            f"{saved.checkpoint_format}, or export it (swiftdist export --checkpoint {path} --to DIR) and train from DIR")


def clean_partial(output_dir: str) -> None:
    """Remove leftovers of saves that crashed (rank 0 only)."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") or (STEP_DIR.match(p.name) and not (p / COMPLETE).exists()):
                log.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)


def tmp_dir(output_dir: str, step: int) -> Path:
    """Where a checkpoint is written before it is complete."""
    return checkpoints_root(output_dir) / f"step-{step:06d}.tmp"


def prepare(tmp: Path) -> None:
    """Rank 0: an empty temp folder (callers barrier after)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def commit(tmp: Path, state: TrainerState, keep: int) -> Path:
    """Rank 0, after every rank has finished writing: mark complete, rename, repoint, prune."""
    (tmp / STATE_FILE).write_text(state.to_json())
    marker = tmp / COMPLETE
    with open(marker, "w") as f:
        f.write(f"{state.step}\n")
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest = final.parent / "latest"
    link = final.parent / "latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(final.name)
    os.replace(link, latest)
    for old in complete_checkpoints(str(final.parent.parent))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final

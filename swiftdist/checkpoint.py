"""Checkpoints of one run: layout, atomic commit, integrity, lineage, retention and resume.

    out/checkpoints/step-000200/
        COMPLETE              written last, after every file is fsynced; a folder without it is never loaded
        MANIFEST.json         every file's size, so a truncated or missing shard is found before loading
        trainer_state.json    step, data position, what that position means (model, data), versions
        model/                the strategy's native sharded model + optimizer state
        adapter/ | hf/        peft adapter (LoRA) or full HF model, when gathered
    out/checkpoints/latest -> step-000200
    out/checkpoints/abandoned/step-000300/   a later line given up by resuming an older checkpoint

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash mid-save leaves
the previous checkpoint intact and the partial one is cleaned up at the next start.
RNG needs no state: dropout randomness is seeded from (seed, step, sample position) at every step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftdist.distributed import all_ranks_ok, barrier
from swiftdist.errors import SwiftdistError

log = logging.getLogger("swiftdist")

STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST = "MANIFEST.json"
ABANDONED = "abandoned"
# Seconds every save sleeps after writing its shards and before it is marked complete. Only tests set
# it: it stands for a slow save on a big model, to show the grace period covers one.
SAVE_DELAY_ENV = "SWIFTDIST_TEST_SAVE_DELAY_S"


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
    data_identity: dict = dataclasses.field(default_factory=dict)
    """What the data position means: the model, each dataset's rows, the tokenisation (see run_identity)."""
    wandb_run_id: str = ""  # a resumed run logs into the same wandb run
    versions: dict = dataclasses.field(default_factory=dict)

    def advance(self, n_samples: int, epoch_size: int) -> None:
        """One optimizer step that trained on `n_samples` more samples."""
        self.step, self.consumed_total, self.consumed_in_epoch = \
            self.step + 1, self.consumed_total + n_samples, self.consumed_in_epoch + n_samples
        if self.consumed_in_epoch >= epoch_size:
            self.epoch, self.consumed_in_epoch = self.epoch + 1, 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> "TrainerState":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SwiftdistError(f"{path}: unreadable trainer state ({e}); resume from another checkpoint") from None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- layout ------------------------------------------------------------------------------------


def checkpoints_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(output_dir: str) -> list[Path]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=step_of)


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


# ---- integrity ---------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk: COMPLETE must never reach the disk before them."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def write_manifest(root: Path) -> None:
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    (root / MANIFEST).write_text(json.dumps(sizes, indent=1))


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint marked complete (a missing or truncated file), or None.
    Checkpoints older than the manifest are trusted."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written"
    return None


def commit(tmp: Path, state: TrainerState, keep: int, protect: tuple[Path, ...] = ()) -> Path:
    """Rank 0, after every rank has written (and fsynced) its files: mark complete, rename, repoint, prune."""
    (tmp / STATE_FILE).write_text(state.to_json())
    write_manifest(tmp)
    fsync_tree(tmp)
    marker = tmp / COMPLETE
    with open(marker, "w") as f:
        f.write(f"{state.step}\n")
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    point_latest(final.parent)
    # By step number, which is the order of this line: older lines were moved aside when it began.
    kept = {final.resolve(), *(p.resolve() for p in protect)}
    for old in complete_checkpoints(str(final.parent.parent))[:-keep] if keep > 0 else []:
        if old.resolve() not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest(root: Path) -> None:
    """`latest` names the newest complete checkpoint (or is removed when there is none)."""
    found = complete_checkpoints(str(root.parent))
    latest, link = root / "latest", root / "latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    if not found:
        if latest.is_symlink():
            latest.unlink()
        return
    link.symlink_to(found[-1].name)
    os.replace(link, latest)


# ---- resume discovery --------------------------------------------------------------------------


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """`auto` -> newest undamaged complete checkpoint (or None: start fresh); a path -> that checkpoint."""
    if not resume:
        return None
    if resume != "auto":
        path = find_complete(resume, "--resume")
        problem = damage(path)
        if problem:
            raise SwiftdistError(f"--resume {resume}: damaged checkpoint: {problem}; resume from an older one")
        return path
    for path in reversed(complete_checkpoints(output_dir)):
        problem = damage(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s; trying the previous one", path.name, problem)
    return None


def find_complete(path: str, flag: str) -> Path:
    """The checkpoint itself, or the newest one of a checkpoints/ folder or an output dir (via `latest`)."""
    for candidate in (Path(path), Path(path) / "latest", Path(path) / "checkpoints" / "latest"):
        if (candidate / COMPLETE).exists():
            return candidate.resolve()
    if not Path(path).exists():
        raise SwiftdistError(f"{flag} {path}: no such file or directory")
    raise SwiftdistError(f"{flag} {path}: not a complete checkpoint (no {COMPLETE} marker)")


def abandon_newer(output_dir: str, resumed: Path) -> None:
    """Rank 0. Resuming an older checkpoint starts a new line: the later checkpoints of the old one would
    otherwise win `--resume auto` and retention. They are moved aside, not deleted."""
    later = [p for p in complete_checkpoints(output_dir) if step_of(p) > step_of(resumed)]
    if not later:
        return
    aside = checkpoints_root(output_dir) / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, aside / p.name)
    log.warning("resuming %s starts a new line: moved the later checkpoints %s aside to %s",
                resumed.name, ", ".join(p.name for p in later), aside)
    point_latest(checkpoints_root(output_dir))


def check_resumable(saved: TrainerState, path: Path, train_type: str, strategy: str, checkpoint_format: str) -> None:
    """Refuse, in one line, a checkpoint the current run cannot continue from."""
    if saved.train_type != train_type:
        raise SwiftdistError(f"--resume {path}: saved with --train-type {saved.train_type}, "
                             f"now {train_type}; they must match")
    # "deepspeed" (before the stage was recorded) could be either stage: DeepSpeed's loader decides.
    legacy = saved.checkpoint_format == "deepspeed" and checkpoint_format.startswith("deepspeed-")
    if saved.checkpoint_format and saved.checkpoint_format != checkpoint_format and not legacy:
        raise SwiftdistError(
            f"--resume {path}: written by --strategy {saved.strategy} in {saved.checkpoint_format} format, which "
            f"--strategy {strategy} ({checkpoint_format} format) cannot read; resume with a strategy that reads "
            f"{saved.checkpoint_format}, or export it (swiftdist export --checkpoint {path} --to DIR) and train from DIR")


# ---- what the data position means ----------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def model_identity(model_path: Path) -> dict:
    """The model by its config and its list of weight files (not their bytes: hashing 15 GB would take minutes)."""
    files = {p.name: p.stat().st_size for p in sorted(model_path.iterdir())
             if p.suffix in (".safetensors", ".bin", ".gguf") or p.name.endswith(".index.json")}
    config = model_path / "config.json"
    return {"path": str(model_path), "config": _file_digest(config) if config.exists() else "",
            "weights": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]}


def run_identity(model_path: Path, data_cfg, seed: int, sources: list[tuple[str, Path, int]], train) -> dict:
    """What a saved data position means. `sources` are (spec, file, rows) per --dataset; `train` the samples.
    World size and global batch are left out: a resume may change them."""
    tokens = hashlib.sha256()
    for s in train:
        tokens.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
        tokens.update(b"|")
    return {
        "model": model_identity(model_path),
        "datasets": [{"spec": spec, "rows": rows, "fingerprint": _file_digest(path)} for spec, path, rows in sources],
        "max_length": data_cfg.max_length, "truncation": data_cfg.truncation, "packing": data_cfg.packing,
        "seed": seed, "train_samples": len(train), "train_tokens": tokens.hexdigest()[:16],
    }


def identity_changes(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two run identities ([] when the position still means the same)."""
    if not saved:
        return []  # a checkpoint older than the record: nothing to compare
    changes = []
    if saved["model"] != now["model"]:
        what = [k for k in ("path", "config", "weights") if saved["model"].get(k) != now["model"].get(k)]
        changes.append(f"the model's {'/'.join(what)} ({saved['model']['path']} -> {now['model']['path']})")
    old = {d["spec"]: d for d in saved["datasets"]}
    new = {d["spec"]: d for d in now["datasets"]}
    for spec in old.keys() | new.keys():
        a, b = old.get(spec), new.get(spec)
        if a is None or b is None:
            changes.append(f"dataset {spec} was {'added' if a is None else 'removed'}")
        elif a != b:
            changes.append(f"dataset {spec} ({a['rows']} rows -> {b['rows']}" +
                           (", content differs)" if a["fingerprint"] != b["fingerprint"] else ")"))
    for key in ("max_length", "truncation", "packing", "seed"):
        if saved.get(key) != now.get(key):
            changes.append(f"--{key.replace('_', '-')} {saved.get(key)} -> {now.get(key)}")
    if not changes and (saved.get("train_samples"), saved.get("train_tokens")) != (now["train_samples"], now["train_tokens"]):
        changes.append(f"the tokenised training samples ({saved.get('train_samples')} -> {now['train_samples']}; "
                       "tokenizer or chat template)")
    return changes


# ---- the run's checkpointer --------------------------------------------------------------------


class Checkpointer:
    """Finds, restores, saves and exports the checkpoints of one run; the trainer only says when."""

    def __init__(self, cfg, dist, strategy, tokenizer):
        self.cfg, self.dist, self.strategy, self.tokenizer = cfg, dist, strategy, tokenizer
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.saved_step = -1
        self.resumed_from: Path | None = None
        self.last_save = time.monotonic()

    @property
    def adapter_only(self) -> bool:
        """LoRA/QLoRA: what is saved for users is the adapter; the frozen base comes from the model path."""
        return self.cfg.model.train_type != "full"

    def new_state(self, model_path: Path, base_dtype: str, identity: dict) -> TrainerState:
        import uuid

        return TrainerState(world_size=self.dist.world_size, dp_size=self.strategy.dp_size,
                            strategy=self.strategy.name, checkpoint_format=self.strategy.checkpoint_format,
                            train_type=self.cfg.model.train_type, model=str(model_path), base_dtype=base_dtype,
                            max_steps=self.cfg.train.max_steps, epochs=self.cfg.train.epochs,
                            data_identity=identity, wandb_run_id=uuid.uuid4().hex[:12], versions=_versions())

    # ---- resume -------------------------------------------------------------------------------

    def find(self) -> tuple[Path, TrainerState] | None:
        """The checkpoint to resume from, refused before any model loads if this run cannot continue it."""
        resume = self.cfg.checkpoint.resume
        if self.dist.is_main:
            clean_partial(str(self.output_dir))
        barrier()
        path = resolve_resume(resume, str(self.output_dir))
        if path is None:
            return None
        saved = TrainerState.from_file(path / STATE_FILE)
        check_resumable(saved, path, self.cfg.model.train_type, self.strategy.name, self.strategy.checkpoint_format)
        barrier()  # every rank has read it before rank 0 may move anything
        if self.dist.is_main and resume != "auto":
            abandon_newer(str(self.output_dir), path)
        barrier()
        return path, saved

    def check_data(self, path: Path, saved: TrainerState, identity: dict) -> bool:
        """True if the saved data position still means the same samples; refuses a change unless told to
        continue anyway (then the position restarts: returns False)."""
        changes = identity_changes(saved.data_identity, identity)
        if not changes:
            return True
        if not self.cfg.checkpoint.ignore_data_changes:
            raise SwiftdistError(f"--resume {path}: its data position no longer means the same samples: "
                                 f"{'; '.join(changes)}; pass --ignore-data-changes to keep the weights and "
                                 "optimizer and restart the data from its beginning")
        log.warning("data changed since %s (%s): weights and optimizer are kept, the data restarts from its beginning",
                    path.name, "; ".join(changes))
        return False

    def restore(self, path: Path, saved: TrainerState, state: TrainerState, keep_position: bool) -> None:
        t0 = time.perf_counter()
        self.strategy.load(str(path / "model"), saved)
        state.step = saved.step
        if keep_position:
            state.epoch, state.consumed_in_epoch, state.consumed_total = \
                saved.epoch, saved.consumed_in_epoch, saved.consumed_total
        if saved.wandb_run_id:
            state.wandb_run_id = saved.wandb_run_id
        self.saved_step, self.resumed_from = saved.step, path
        log.info("resumed from %s at step %d (epoch %d, sample %d; saved by %d ranks, now %d) in %.1fs",
                 path, saved.step, state.epoch, state.consumed_in_epoch, saved.world_size,
                 self.dist.world_size, time.perf_counter() - t0)

    # ---- saving -------------------------------------------------------------------------------

    def due_by_time(self) -> bool:
        """Rank 0's clock says the periodic save is due (the trainer makes every rank agree)."""
        minutes = self.cfg.checkpoint.save_minutes
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def save(self, state: TrainerState) -> Path | None:
        """Collective. A failed write (a full disk) stops the run in one line, the previous checkpoint intact."""
        t0 = time.perf_counter()
        tmp = tmp_dir(str(self.output_dir), state.step)
        final, error = None, None
        try:
            if self.dist.is_main:
                prepare(tmp)
            barrier()
            self.strategy.save(str(tmp / "model"))
            if self.adapter_only or self.cfg.checkpoint.save_full_model:
                self._save_hf(tmp / ("adapter" if self.adapter_only else "hf"))
            time.sleep(float(os.environ.get(SAVE_DELAY_ENV, "0")))
        except Exception as e:  # noqa: BLE001 - an I/O failure of any library; re-raised below unless it is one
            error = e
        if all_ranks_ok(error is None):  # every rank has written its part: none is still creating files
            try:
                fsync_tree(tmp)  # each rank, so that on a shared file system every node flushes what it wrote
            except OSError as e:
                error = e
        if all_ranks_ok(error is None) and self.dist.is_main:
            try:
                final = commit(tmp, state, self.cfg.checkpoint.save_total_limit,
                               protect=(self.resumed_from,) if self.resumed_from else ())
            except OSError as e:
                error = e
        if not all_ranks_ok(error is None):  # also hears of a commit that failed on rank 0
            _reraise_unless_write_failure(error)
            self._give_up(tmp, state.step, error)
        if final is not None:
            log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        self.saved_step, self.last_save = state.step, time.monotonic()
        return final

    def _give_up(self, tmp: Path, step: int, error: Exception | None) -> None:
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save would only hold the space
        previous = complete_checkpoints(str(self.output_dir))
        keeps = f"{previous[-1]} is complete and resumable" if previous else "no earlier checkpoint exists"
        cause = _one_line(error) if error is not None else "another rank failed to write its part"
        raise SwiftdistError(f"saving the checkpoint of step {step} to {tmp.parent} failed ({cause}); "
                             f"{keeps}; free space or change --output-dir, then resume with --resume auto")

    def _save_hf(self, out: Path) -> None:
        """The peft adapter (LoRA) or the whole HF model (full; gathered on rank 0), with the tokenizer."""
        state = self.strategy.full_state_dict(trainable_only=self.adapter_only)
        if self.dist.is_main:
            self.strategy.save_hf(out, state)
            self.tokenizer.save_pretrained(out)

    def export_final(self) -> None:
        """The result users load: output_dir/final, a peft adapter or a full HF model."""
        error = None
        try:
            self._save_hf(self.output_dir / "final")
        except Exception as e:  # noqa: BLE001 - see save()
            error = e
        if not all_ranks_ok(error is None):
            _reraise_unless_write_failure(error)
            raise SwiftdistError(f"writing {self.output_dir / 'final'} failed "
                                 f"({_one_line(error) if error else 'on another rank'}); the last checkpoint is "
                                 f"complete: free space, then `swiftdist export --checkpoint {self.output_dir}`")
        if self.dist.is_main:
            log.info("final %s saved to %s", "adapter" if self.adapter_only else "model", self.output_dir / "final")
        barrier()


# How libraries that wrap an OSError (DCP, safetensors) still say it was the disk.
WRITE_FAILURES = ("No space left", "Disk quota", "Read-only file system", "Input/output error")


def _reraise_unless_write_failure(error: Exception | None) -> None:
    """A failure that is not the disk's is a bug: it keeps its traceback."""
    if error is not None and not _is_io_error(error):
        raise error


def _is_io_error(error: Exception) -> bool:
    """A failure to write (full disk, quota, read-only), however the writing library wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return True
        text = str(error)
        if any(s in text for s in WRITE_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error).strip()
    for line in text.splitlines():
        if any(s in line for s in WRITE_FAILURES):
            return line.strip()
    return text.splitlines()[0] if text else type(error).__name__


def _versions() -> dict:
    import transformers

    import swiftdist

    versions = {"swiftdist": swiftdist.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions

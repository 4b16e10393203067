"""Interruptions lose no work: SIGTERM/SIGUSR1 save and exit (also when the step and save outlast
torchrun's default 30 s grace), a kill -9 of one worker restarts the elastic group from the last
complete checkpoint, and a crash in the middle of a save leaves the previous checkpoint usable.
Each interrupted run, continued, ends with the uninterrupted run's weights and losses bit for bit
(test_resume.reference: 2 ranks, 8 steps, LoRA dropout on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swiftdist import checkpoint
from tests.helpers import TIMEOUT, free_port, metrics, sft, torchrun_cmd
from tests.helpers import test_env as process_env
from tests.multiproc.test_resume import adapter, assert_same_adapter, data_of, reference, train_args

pytestmark = pytest.mark.slow

# Longer than torchrun's default grace (it SIGKILLs its workers 30 s after it forwards a stop).
SLOW_SAVE_S = 32


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=process_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_until(condition, proc: subprocess.Popen, log: Path, poll: float = 0.02) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended (or hung) before the condition held:\n{log.read_text()}")
        time.sleep(poll)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out:\n{log.read_text()}") from None
    return log.read_text()


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return max((r["step"] for r in metrics(out) if "loss" in r), default=0) if path.exists() else 0


def losses_by_step(out: Path) -> list[float]:
    """A step re-run after a crash appears twice in metrics.jsonl; the later record is the one that counts."""
    by_step = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def descendants(pid: int) -> list[int]:
    """pid's child processes, recursively (torchrun starts each worker in its own session)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue  # the process ended while we looked
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker(torchrun_pid: int, rank: int) -> int:
    for pid in descendants(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and any(b"swiftdist.sft" in a for a in
                                                      Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")):
            return pid
    raise AssertionError(f"no rank {rank} worker under torchrun {torchrun_pid}")


def test_sigterm_to_torchrun_saves_and_the_resumed_run_ends_equal(tmp_path_factory, tmp_path):
    ref, out, log = reference(tmp_path_factory), tmp_path / "out", tmp_path / "log"
    args = train_args(data_of(ref), out, "--save-steps", "0", "--resume", "auto")  # only the signal saves
    proc = start(torchrun_cmd(2, args), log)
    wait_until(lambda: steps_done(out) >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    text = finish(proc, log)
    assert "stop signal received: saving a checkpoint" in text
    # The workers exit 143; torchrun itself reports a SignalException and exits 1.
    assert proc.returncode != 0
    saved = checkpoint.complete_checkpoints(str(out))
    assert len(saved) == 1
    stopped_at = checkpoint.TrainerState.from_file(saved[0] / checkpoint.STATE_FILE).step
    assert stopped_at == steps_done(out) < 8
    sft(2, args)
    assert losses_by_step(out) == losses_by_step(ref)
    assert_same_adapter(adapter(out), adapter(ref))


def test_sigusr1_to_a_single_process_saves_and_exits_143(tmp_path_factory, tmp_path):
    ref, out, log = reference(tmp_path_factory), tmp_path / "out", tmp_path / "log"
    proc = start(torchrun_cmd(1, train_args(data_of(ref), out, "--save-steps", "0")), log)
    wait_until(lambda: steps_done(out) >= 2, proc, log)
    proc.send_signal(signal.SIGUSR1)
    finish(proc, log)
    assert proc.returncode == 143
    assert checkpoint.resolve_resume("auto", str(out)).name == f"step-{steps_done(out):06d}"


def test_a_step_and_save_longer_than_torchruns_default_grace_still_checkpoint(tmp_path_factory, tmp_path):
    """`swiftdist launch --grace-seconds` is torchrun's --shutdown-timeout. The stop is SIGUSR1, what the
    SLURM templates send (torchrun forwards it only because we ask), and the save takes SLOW_SAVE_S."""
    ref, out, log = reference(tmp_path_factory), tmp_path / "out", tmp_path / "log"
    args = train_args(data_of(ref), out, "--save-steps", "0", "--resume", "auto")
    launch = [sys.executable, "-m", "swiftdist.cli", "launch", "--nproc-per-node", "2", "--grace-seconds", "60"]
    proc = start([*launch, "--", *args], log, SWIFTDIST_TEST_SAVE_DELAY_S=SLOW_SAVE_S)  # every rank, in each save
    wait_until(lambda: steps_done(out) >= 2, proc, log)
    signalled = time.time()
    proc.send_signal(signal.SIGUSR1)  # swiftdist launch exec'd torchrun: this is torchrun
    text = finish(proc, log)
    stop_to_exit = time.time() - signalled
    (saved,) = checkpoint.complete_checkpoints(str(out))
    stop_to_complete = (saved / checkpoint.COMPLETE).stat().st_mtime - signalled
    assert stop_to_complete > 30, text  # past the point where torchrun's default grace SIGKILLs the workers
    assert checkpoint.TrainerState.from_file(saved / checkpoint.STATE_FILE).step == steps_done(out) < 8
    sft(2, args)
    assert losses_by_step(out) == losses_by_step(ref)
    assert_same_adapter(adapter(out), adapter(ref))
    print(f"\nwith a {SLOW_SAVE_S} s save and --grace-seconds 60: stop -> COMPLETE {stop_to_complete:.1f}s, "
          f"stop -> torchrun exits {stop_to_exit:.1f}s")


def test_kill9_of_one_worker_restarts_the_group_from_the_last_checkpoint(tmp_path_factory, tmp_path):
    ref, out, log = reference(tmp_path_factory), tmp_path / "out", tmp_path / "log"
    args = train_args(data_of(ref), out, "--resume", "auto")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=last_call_timeout=1",
           "-m", "swiftdist.sft", *args]
    # A restarted gloo group otherwise reuses the agent's stale TCP store and hangs (DESIGN.md §6).
    proc = start(cmd, log, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    wait_until(lambda: checkpoint.complete_checkpoints(str(out)), proc, log)
    os.kill(worker(proc.pid, rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: "] step " in log.read_text().partition("resumed from")[2], proc, log)
    print(f"kill -9 -> first step after the restart: {time.monotonic() - killed_at:.1f}s")
    text = finish(proc, log)
    assert proc.returncode == 0, text
    assert "resumed from" in text and "step-000002" in text.split("resumed from")[1].splitlines()[0]
    assert losses_by_step(out) == losses_by_step(ref)
    assert_same_adapter(adapter(out), adapter(ref))


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path_factory, tmp_path):
    ref, out, log = reference(tmp_path_factory), tmp_path / "out", tmp_path / "log"
    args = train_args(data_of(ref), out, "--save-steps", "1", "--resume", "auto")
    proc = start(torchrun_cmd(2, args), log)
    root = checkpoint.checkpoints_root(str(out))

    def partial() -> list[Path]:
        return list(root.glob("step-*.tmp")) if root.is_dir() else []

    # Freeze every process while a save is half written, then kill them all (a power cut).
    while True:
        wait_until(lambda: partial() and checkpoint.complete_checkpoints(str(out)), proc, log, poll=0.005)
        group = [proc.pid, *descendants(proc.pid)]
        for pid in group:
            os.kill(pid, signal.SIGSTOP)
        if partial():
            break
        for pid in group:  # the save finished in between: let it run to the next one
            os.kill(pid, signal.SIGCONT)
    for pid in group:
        os.kill(pid, signal.SIGKILL)
    finish(proc, log)
    crashed = partial()[0]
    last_good = checkpoint.resolve_resume("auto", str(out))
    assert last_good.name < crashed.name and (last_good / checkpoint.COMPLETE).exists()
    assert (root / "latest").resolve() == last_good

    text = sft(2, args).stderr
    assert f"removing incomplete checkpoint {crashed}" in text
    assert f"resumed from {last_good}" in text
    assert not partial()
    assert losses_by_step(out) == losses_by_step(ref)
    assert_same_adapter(adapter(out), adapter(ref))

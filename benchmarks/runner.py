"""One way to launch a contender and read back what it measured, shared by every suite and contender.

A contender is a module run as `python -m MODULE SPEC RUN_DIR [ARGS]`, or under torchrun for
several ranks; its ranks write rank{R}.json through benchmarks.probe. Each rank gets one OpenMP
thread (or BENCH_THREADS_PER_RANK), so contenders with the same number of ranks use the same cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Contender:
    name: str
    module: str
    nproc: int
    args: list[str] = field(default_factory=list)
    reference: str | None = None
    """Name of the contender its step-time ratio is taken against (None: it is a reference)."""
    layout: str = "ddp"
    """The swiftdist strategy whose memory layout it has (for `swiftdist estimate`): peers replicate like DDP."""
    python: str = sys.executable
    """The interpreter: a peer with dependencies of its own (ms-swift) runs from its own environment."""


@dataclass
class RunResult:
    ok: bool
    seconds: float
    ranks: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def step_s(self) -> list[float]:
        return self.ranks[0]["step_s"] if self.ranks else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    # One thread per rank: on a shared machine more OpenMP threads than free cores spin against each
    # other (a 1-process run with 2 threads measured 5x slower than with 1 under load here).
    env.update(OMP_NUM_THREADS=env.get("BENCH_THREADS_PER_RANK", "1"), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def command(c: Contender, spec_path: Path, run_dir: Path) -> list[str]:
    tail = ["-m", c.module, str(spec_path), str(run_dir), *c.args]
    if c.nproc == 1:
        return [c.python, *tail]
    return [c.python, "-m", "torch.distributed.run", f"--nproc-per-node={c.nproc}",
            f"--master-port={_free_port()}", *tail]


def launch(c: Contender, spec_path: Path, run_dir: Path, timeout: int, env: dict | None = None) -> RunResult:
    """Run one contender to completion; a failure is a result (its last log line), not an exception.
    `env`: variables to add for this run (several runs may go at once, each with its own)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob("rank*.json"):  # an earlier invocation's figures must not pass for this one's
        stale.unlink()
    log = run_dir / "log.txt"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(command(c, spec_path, run_dir), env={**_env(), **(env or {})}, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=Path(__file__).parent.parent)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    # What a run trained and saved is not a result (its figures are in rank*.json); a full
    # fine-tune's checkpoints are GBs per run and a suite has a dozen runs.
    shutil.rmtree(run_dir / "output", ignore_errors=True)
    files = sorted(run_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    ranks = [json.loads(p.read_text()) for p in files]
    if rc == 0 and len(ranks) == c.nproc:
        return RunResult(True, seconds, ranks)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    # torchrun ends a failure with its own summary; the cause is the first rank's exception line.
    raised = [ln for ln in lines if "Error: " in ln and "ChildFailedError" not in ln]
    cause = (raised or lines or ["no output"])[0 if raised else -1][:200]
    why = f"timed out after {timeout}s" if rc is None else f"exit {rc}"
    return RunResult(False, seconds, ranks, f"{why}: {cause} (log: {log})")


def median_after_warmup(step_s: list[float], warmup: int) -> float:
    """Median step time, leaving out the first `warmup` steps (allocator, JIT and cache warm-up);
    at least one step always counts."""
    kept = step_s[min(warmup, len(step_s) - 1):]
    return statistics.median(kept)

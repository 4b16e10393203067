"""Stop requests (SIGTERM, SIGUSR1) remembered from the moment a training process starts.

A scheduler may ask a job to stop while torch still imports or the model loads: SLURM sends its
time-limit warning (`--signal=B:USR1@S`) up to 30 s before the time it was asked for, and a
preemption comes whenever it comes. Left to the default action, the process would die with
nothing saved, and a job whose warning always lands in its startup would requeue forever without
progress. So `python -m swiftdist.sft` installs this first thing; the trainer asks `requested()` at
every step boundary, saves and exits.
"""

from __future__ import annotations

import signal
from typing import Optional

_received: Optional[int] = None


def _record(signum, _frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying; keeps a request that arrived before."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _record)


def requested() -> Optional[int]:
    """The signal that asked this process to stop, if any."""
    return _received


def clear() -> None:
    """The request was served (a checkpoint saved); a later run in this process starts clean."""
    global _received
    _received = None

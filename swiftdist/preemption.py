"""Stop requests (SIGTERM, SIGUSR1) remembered from the moment a process starts.

A scheduler may ask a job to stop while torch still imports, the nodes meet or the model loads:
SLURM sends its time-limit warning (`--signal=B:USR1@S`) up to 60 s before the time it was asked
for, and a preemption comes whenever it comes. Left to the default action, the process would die
with nothing saved, and a job whose warning always lands in its startup would requeue forever
without progress. So:
- `python -m swiftdist.sft` calls `install()` first thing; the trainer asks `requested()` at every
  step boundary, saves and exits.
- our torchrun command is `python -m swiftdist.preemption TORCHRUN-ARGS`: torchrun itself handles
  signals only once it starts its workers (after the rendezvous), so a stop that comes before is
  kept here and handed to the workers it starts, which then save after their first step.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

# A stop that reached torchrun before its workers existed (the signal number), for the workers.
EARLY_STOP_ENV = "SWIFTDIST_STOP_REQUESTED"

_received: Optional[int] = None


def _record(signum, _frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying; keeps a request that arrived before (also in torchrun)."""
    global _received
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _record)
    early = os.environ.pop(EARLY_STOP_ENV, None)  # read once: not for this process's own children
    if _received is None and early:
        _received = int(early)


def requested() -> Optional[int]:
    """The signal that asked this process to stop, if any."""
    return _received


def clear() -> None:
    """The request was served (a checkpoint saved); a later run in this process starts clean."""
    global _received
    _received = None


def _hand_to_workers(signum, _frame) -> None:
    os.environ[EARLY_STOP_ENV] = str(signum)  # the workers torchrun starts inherit it


def run_torchrun(argv: list[str]) -> None:
    """torchrun, with a stop that comes before it handles signals itself handed to its workers."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _hand_to_workers)
    from torch.distributed.run import main

    main(argv)


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])

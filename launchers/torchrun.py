"""The torchrun command line, built in one place for `swiftdist launch` and the SLURM templates.

    swiftdist launch --nproc-per-node 2 -- --model tiny-llama --dataset data.jsonl
    swiftdist launch --nnodes 2 --master-addr 10.0.0.1 --nproc-per-node 4 -- ...   (run on each machine)
    swiftdist launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 ... -- ...    (static ranks)

One machine uses torchrun's standalone rendezvous (a free local port). Several machines meet at
--master-addr through c10d, which assigns node ranks itself and lets a restarted group
(--max-restarts) meet again; --node-rank pins ranks instead (static rendezvous, no restarts of a
lost node). A stop signal (SIGTERM from a scheduler, or SIGUSR1, which srun passes on unchanged)
is forwarded to the workers, which checkpoint at their next step boundary; torchrun kills them
--grace-seconds later (its --shutdown-timeout, 30 s unless given), so that number must cover the
longest step plus a save. Raises SwiftdistError for impossible combinations (several nodes without
an address).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

from swiftdist.errors import SwiftdistError

DEFAULT_PORT = 29500

# Environment every torchrun of ours gets (setdefault: the user's own value wins).
# A restarted gloo group otherwise often fails on the previous group's stale shared TCP store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# torchrun's default set plus SIGUSR1: the stop signal our SLURM templates send, because srun
# forwards USR1 to its tasks as it is but answers TERM by SIGKILLing them.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds between a stop signal and torchrun's SIGKILL of the workers: a step plus a save must fit.
# Also the SLURM warning lead (--signal-seconds), the same number by design.
DEFAULT_GRACE_SECONDS = 120


class ShellVar(str):
    """Shell text the batch shell expands, such as "$SLURM_JOB_ID" (values only it knows): rendered inside
    double quotes. Built by our templates only, never from user input, which is always single-quoted."""


@dataclass(frozen=True)
class TorchrunSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    master_addr: Optional[str] = None
    """Rendezvous host; required for several nodes (a ShellVar inside SLURM templates)."""
    master_port: object = DEFAULT_PORT
    node_rank: Optional[int] = None
    """Pins this machine's rank (static rendezvous); None lets c10d assign ranks."""
    max_restarts: int = 0
    rdzv_id: object = "swiftdist"
    """Names one rendezvous among others on the same host (the SLURM job id in templates)."""
    grace_seconds: int = DEFAULT_GRACE_SECONDS
    """After a stop signal, how long the workers may take to finish the step and checkpoint before
    torchrun kills them (its --shutdown-timeout)."""

    def __post_init__(self):
        problems = []
        if self.nproc_per_node < 1:
            problems.append(f"--nproc-per-node {self.nproc_per_node}: must be at least 1")
        if self.nnodes < 1:
            problems.append(f"--nnodes {self.nnodes}: must be at least 1")
        if self.max_restarts < 0:
            problems.append(f"--max-restarts {self.max_restarts}: must be 0 or more")
        if self.grace_seconds < 0:
            problems.append(f"--grace-seconds {self.grace_seconds}: must be 0 or more")
        if self.nnodes > 1 and not self.master_addr:
            problems.append(f"--nnodes {self.nnodes} needs --master-addr (the host the nodes meet at)")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}")
        if problems:
            raise SwiftdistError("; ".join(problems))


def torchrun_args(spec: TorchrunSpec) -> list[str]:
    """The arguments of `python -m torch.distributed.run`, up to (not including) the script."""
    args = ["--nnodes", str(spec.nnodes), "--nproc-per-node", str(spec.nproc_per_node)]
    if spec.nnodes == 1 and spec.master_addr is None:
        args += ["--standalone"]
    elif spec.node_rank is not None:
        args += ["--node-rank", str(spec.node_rank), "--master-addr", spec.master_addr,
                 "--master-port", str(spec.master_port)]
    else:
        # last_call_timeout: once the expected nodes have joined, start at once instead of
        # waiting 30 s for late ones (matters on every restart).
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", _endpoint(spec.master_addr, spec.master_port),
                 "--rdzv-id", spec.rdzv_id, "--rdzv-conf", "last_call_timeout=1"]
    args += ["--max-restarts", str(spec.max_restarts),
             "--signals-to-handle", FORWARDED_SIGNALS, "--shutdown-timeout", str(spec.grace_seconds)]
    return args


def _endpoint(addr, port) -> str:
    endpoint = f"{addr}:{port}"
    # Inside a template the halves are batch-shell variables: the joined text must stay expandable.
    return ShellVar(endpoint) if isinstance(addr, ShellVar) or isinstance(port, ShellVar) else endpoint


def sft_command(python: str, spec: TorchrunSpec, train_args: list[str]) -> list[str]:
    """The whole torchrun command that fine-tunes with `train_args` (torchrun through swiftdist.preemption,
    which keeps a stop that comes before torchrun handles signals itself)."""
    return [python, "-m", "swiftdist.preemption", *torchrun_args(spec), "-m", "swiftdist.sft", *train_args]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swiftdist launch", description="torchrun swiftdist.sft on this machine "
                                "(run it on every machine for several); training args go after --")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) on this machine")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the run")
    p.add_argument("--node-rank", type=int, help="this machine's rank (static rendezvous); leave out for c10d")
    p.add_argument("--master-addr", help="host every machine can reach (the rendezvous)")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-restarts", type=int, default=0, help="restart the group this often after a failure")
    p.add_argument("--rdzv-id", default="swiftdist", help="unique per run when several share the rendezvous host")
    p.add_argument("--grace-seconds", type=int, default=DEFAULT_GRACE_SECONDS,
                   help="after SIGTERM/SIGUSR1, seconds the workers get to finish their step and checkpoint "
                        "before torchrun kills them (at least your longest step + save)")
    p.add_argument("--python", default=sys.executable, help="interpreter with swiftdist installed")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return p


def main(argv: list[str]) -> int:
    """`swiftdist launch [options] -- TRAINING ARGS`: replaces this process with torchrun."""
    own, train_args = split_double_dash(argv)
    ns = _parser().parse_args(own)
    spec = TorchrunSpec(nproc_per_node=ns.nproc_per_node, nnodes=ns.nnodes, master_addr=ns.master_addr,
                        master_port=ns.master_port, node_rank=ns.node_rank, max_restarts=ns.max_restarts,
                        rdzv_id=ns.rdzv_id, grace_seconds=ns.grace_seconds)
    from swiftdist.config import parse_config

    parse_config(train_args)  # a typo fails here, once, not in every worker
    cmd = sft_command(ns.python, spec, train_args)
    if ns.dry_run:
        print(shlex.join(cmd))
        return 0
    env = {**TORCHRUN_ENV, **os.environ}
    # exec: signals (SIGTERM from a scheduler, Ctrl-C) reach torchrun itself, which forwards them.
    os.execve(ns.python, cmd, env)


def split_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []

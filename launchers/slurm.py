"""SLURM: render the batch templates in slurm/, submit, status, cancel.

    swiftdist slurm render [options] -- TRAINING ARGS          print the batch script
    swiftdist slurm submit [options] [--dry-run] -- TRAINING ARGS
    swiftdist slurm status JOBID|OUTPUT_DIR
    swiftdist slurm cancel JOBID|OUTPUT_DIR

Training flags may also stand among the SLURM options (`submit --nodes 2 --config sft.yaml`);
everything after `--` is training args. One node renders slurm/single_node.sbatch (one torchrun);
several render slurm/multi_node.sbatch (one torchrun per node through srun, c10d rendezvous on
the first node's NodeAddr). Every value is shell-quoted. Jobs checkpoint and requeue themselves on
USR1 (`--signal-seconds` before the time limit, or `scancel --signal=USR1 --batch`) and resume with
`--resume auto`; --signal-seconds is also how long torchrun lets the workers finish a step and save
before it kills them. Jobs save every --save-minutes (default DEFAULT_SAVE_MINUTES) unless the
training args set a periodic save themselves, so a job killed without warning loses little; a job
with no periodic save at all gets a warning. The output dir records the job id (`slurm-job-id`), so
status/cancel take either.
Raises SwiftdistError for user mistakes (sbatch missing, bad counts, values SLURM cannot carry).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from swiftdist.errors import SwiftdistError
from swiftdist.launchers.torchrun import (DEFAULT_GRACE_SECONDS, TORCHRUN_ENV, ShellVar, TorchrunSpec,
                                          split_double_dash, sft_command)

if TYPE_CHECKING:
    from swiftdist.config import RunConfig

# The checkout's slurm/ (editable install), else the copy setup.py installs under <prefix>/share.
TEMPLATES = next((p for p in (Path(__file__).resolve().parent.parent / "slurm",
                              Path(sys.prefix) / "share" / "swiftdist" / "slurm") if p.is_dir()),
                 Path(__file__).resolve().parent.parent / "slurm")
JOB_ID_FILE = "slurm-job-id"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# sbatch reads #SBATCH lines itself: it understands quotes, but a newline ends the line and a
# backslash escapes even inside single quotes, so such values cannot be carried faithfully.
UNSAFE_IN_DIRECTIVE = re.compile(r"[\\\x00-\x1f\x7f]")
# Periodic saving for jobs whose args set none (README, "Launching" says why 30).
DEFAULT_SAVE_MINUTES = 30


@dataclass
class SlurmJob:
    """What the batch script asks SLURM for, and how it launches the training."""

    train_args: list[str]
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node (`--gpus-per-node`); torchrun runs one process per GPU unless --nproc-per-node says otherwise."""
    gres: Optional[str] = None
    """A generic resource spec instead of --gpus-per-node, e.g. gpu:a100:4 (the count is read from its end)."""
    nproc_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    """CPUs for each node's torchrun and its workers (default: one per process)."""
    mem: Optional[str] = None
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: str = "swiftdist"
    output: Optional[str] = None
    """The job's log (default OUTPUT_DIR/slurm-%j.out); appended to across requeues."""
    signal_seconds: int = DEFAULT_GRACE_SECONDS
    """USR1 this long before the time limit: the training checkpoints and the job requeues. Also the
    grace torchrun gives the workers after any stop (its --shutdown-timeout): at least the longest
    step plus a save."""
    max_restarts: int = 0
    master_port: Optional[int] = None
    """Rendezvous port on the first node (default derived from the job id)."""
    python: str = sys.executable
    """The interpreter the job runs (the one with swiftdist installed: this venv by default)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra exports, e.g. NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / NCCL_DEBUG."""
    workdir: str = field(default_factory=os.getcwd)

    def __post_init__(self):
        problems = []
        for name in ("nodes", "cpus_per_task", "nproc_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.gpus_per_node < 0:
            problems.append(f"--gpus-per-node {self.gpus_per_node}: must be 0 or more")
        if self.gpus_per_node and self.gres:
            problems.append("give either --gpus-per-node or --gres, not both")
        if self.signal_seconds < 0:
            problems.append(f"--signal-seconds {self.signal_seconds}: must be 0 or more")
        for key in self.env:
            if not ENV_NAME.fullmatch(key):
                problems.append(f"--env {key!r}: not a valid environment variable name")
        if problems:
            raise SwiftdistError("; ".join(problems))
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or _gres_count(self.gres) or 1
        if self.cpus_per_task is None:
            self.cpus_per_task = self.nproc_per_node

    def directives(self, output_dir: Path) -> list[tuple[str, str]]:
        opts = [("job-name", self.job_name), ("nodes", self.nodes), ("ntasks-per-node", 1),
                ("cpus-per-task", self.cpus_per_task)]
        if self.gpus_per_node:
            opts.append(("gpus-per-node", self.gpus_per_node))
        for name in ("gres", "mem", "partition", "account"):
            if getattr(self, name):
                opts.append((name, getattr(self, name)))
        # The log survives requeues (append), and the job runs where it was submitted, so relative
        # dataset paths mean the same inside it.
        opts += [("time", self.time), ("output", self.output or str(output_dir / "slurm-%j.out")),
                 ("open-mode", "append"), ("chdir", self.workdir), ("requeue", None),
                 ("signal", f"B:USR1@{self.signal_seconds}")]
        return opts


def _gres_count(gres: Optional[str]) -> Optional[int]:
    last = (gres or "").rsplit(":", 1)[-1]
    return int(last) if last.isdigit() else None


def quote(word) -> str:
    """A shell word: batch-shell expansions in double quotes, everything else single-quoted."""
    return f'"{word}"' if isinstance(word, ShellVar) else shlex.quote(str(word))


def _directive(name: str, value) -> str:
    if value is None:
        return f"#SBATCH --{name}"
    text = str(value)
    if UNSAFE_IN_DIRECTIVE.search(text):
        raise SwiftdistError(f"--{name} {text!r}: SLURM directives cannot carry backslashes or control characters")
    return f"#SBATCH --{name}={shlex.quote(text)}"


def training_args(train_args: list[str]) -> tuple[list[str], RunConfig]:
    """The validated training args a job runs, and their config: `--resume auto` (what a requeued job
    needs), and `--save-minutes DEFAULT_SAVE_MINUTES` unless the args set --save-steps or --save-minutes."""
    from swiftdist.config import explicitly_set, parse_config

    cfg = parse_config(train_args)
    resume = cfg.checkpoint.resume
    if resume not in (None, "auto"):
        raise SwiftdistError(f"--resume {resume}: a SLURM job resumes from its own output dir after every "
                             "requeue (--resume auto); copy the checkpoint into the output dir's checkpoints/ instead")
    args = train_args if resume == "auto" else [*train_args, "--resume", "auto"]
    if not explicitly_set(train_args) & {"checkpoint.save_steps", "checkpoint.save_minutes"}:
        args = [*args, "--save-minutes", str(DEFAULT_SAVE_MINUTES)]
    return args, parse_config(args)


def output_dir_of(cfg: RunConfig) -> Path:
    return Path(os.path.abspath(cfg.checkpoint.output_dir))


def unsaved_work_warning(cfg: RunConfig) -> Optional[str]:
    """A requeueing job that saves only when warned restarts from scratch after a kill without warning."""
    if cfg.checkpoint.save_steps or cfg.checkpoint.save_minutes:
        return None
    return ("swiftdist: warning: this job requeues, but --save-steps 0 and --save-minutes 0 turn periodic saving "
            "off: a node failure or OOM kill restarts it from its last checkpoint, or from scratch")


def render(job: SlurmJob) -> str:
    """The batch script for `job` (single_node.sbatch for one node, multi_node.sbatch for more)."""
    train_args, cfg = training_args(job.train_args)
    if job.nodes == 1:
        spec = TorchrunSpec(nproc_per_node=job.nproc_per_node, max_restarts=job.max_restarts,
                            grace_seconds=job.signal_seconds)
        template = "single_node.sbatch"
    else:
        spec = TorchrunSpec(nproc_per_node=job.nproc_per_node, nnodes=job.nodes, master_addr=ShellVar("$master_addr"),
                            master_port=ShellVar("$master_port"), rdzv_id=ShellVar("$SLURM_JOB_ID"),
                            max_restarts=job.max_restarts, grace_seconds=job.signal_seconds)
        template = "multi_node.sbatch"
    cmd = sft_command(job.python, spec, [])
    exports = {"OMP_NUM_THREADS": str(max(1, job.cpus_per_task // job.nproc_per_node)),
               "PYTHONUNBUFFERED": "1", **TORCHRUN_ENV, **job.env}
    # `set -e` would skip the requeue decision: the training's exit status is read, not fatal.
    preamble = ["set -uo pipefail"] + [f"export {k}={quote(v)}" for k, v in exports.items()]
    values = {
        "NNODES": str(job.nodes),
        "NPROC_PER_NODE": str(job.nproc_per_node),
        "SBATCH_DIRECTIVES": "\n".join(_directive(k, v) for k, v in job.directives(output_dir_of(cfg))),
        "PREAMBLE": "\n".join(preamble),
        "MASTER_PORT": quote(job.master_port) if job.master_port else "''",
        "TORCHRUN": " ".join(map(quote, cmd)) + "\n        " + " ".join(map(quote, train_args)),
        "RUN_AND_REQUEUE": (TEMPLATES / "preemption.bash").read_text().rstrip("\n"),
    }
    text = (TEMPLATES / template).read_text()
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], text)


def submit(job: SlurmJob) -> str:
    """sbatch the rendered script; returns the job id, also written to OUTPUT_DIR/slurm-job-id."""
    script = render(job)
    output_dir = output_dir_of(training_args(job.train_args)[1])
    output_dir.mkdir(parents=True, exist_ok=True)  # the job log goes there from the job's first second
    path = output_dir / "slurm-job.sbatch"
    path.write_text(script)
    out = _slurm(["sbatch", "--parsable", str(path)])
    job_id = out.strip().split(";")[0]  # --parsable prints "ID" or "ID;CLUSTER"
    (output_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return job_id


def resolve_job(target: str) -> str:
    """A job id, or an output dir whose slurm-job-id names one."""
    if re.fullmatch(r"\d+", target):
        return target
    path = Path(target) / JOB_ID_FILE
    if not path.is_file():
        raise SwiftdistError(f"{target}: neither a job id nor an output dir with a {JOB_ID_FILE} file")
    return path.read_text().strip()


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, RestartCnt, NodeList, Reason, RunTime, ...)."""
    out = _slurm(["scontrol", "show", "job", "--oneliner", job_id]).strip()
    # The job name may hold spaces and '='; scontrol always prints UserId right after it.
    name = re.search(r"JobName=(.*?) UserId=", out)
    rest = out[:name.start()] + out[name.end(1):]
    info = dict(tok.split("=", 1) for tok in rest.split() if "=" in tok)
    return {**info, "JobName": name.group(1)}


def _slurm(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SwiftdistError(f"{cmd[0]} not found: run this where the SLURM client tools are installed "
                             "(a login node; locally: eval \"$(scripts/slurm_cluster.sh start)\")")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SwiftdistError(f"{cmd[0]} failed: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout


# ---- CLI -------------------------------------------------------------------------------------


def _job_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description="SLURM options; training args after -- (or mixed in)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--gres", help="instead of --gpus-per-node, e.g. gpu:a100:4")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: GPUs per node, else 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node's torchrun (default: one per process)")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--time", default="01:00:00", help="time limit (SLURM syntax: minutes, HH:MM:SS, D-HH)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="swiftdist")
    p.add_argument("--output", help="job log (default OUTPUT_DIR/slurm-%%j.out)")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_GRACE_SECONDS,
                   help="USR1 this long before the time limit: checkpoint, requeue, resume; also the time "
                        "the training gets to finish a step and save after any stop (>= longest step + save)")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a worker failure")
    p.add_argument("--master-port", type=int, help="rendezvous port (default derived from the job id)")
    p.add_argument("--python", default=sys.executable, help="interpreter the job runs (default: this one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job (repeatable)")
    if prog.endswith("submit"):
        p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    return p


def _job_from_argv(prog: str, argv: list[str]) -> tuple[SlurmJob, argparse.Namespace]:
    own, after = split_double_dash(argv)
    ns, mixed_in = _job_parser(prog).parse_known_args(own)
    env = {}
    for item in ns.env:
        key, eq, value = item.partition("=")
        if not eq:
            raise SwiftdistError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    job = SlurmJob(train_args=[*mixed_in, *after], nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, gres=ns.gres,
                   nproc_per_node=ns.nproc_per_node, cpus_per_task=ns.cpus_per_task, mem=ns.mem, time=ns.time,
                   partition=ns.partition, account=ns.account, job_name=ns.job_name, output=ns.output,
                   signal_seconds=ns.signal_seconds, max_restarts=ns.max_restarts, master_port=ns.master_port,
                   python=ns.python, env=env)
    return job, ns


def main(argv: list[str]) -> int:
    """`swiftdist slurm render|submit|status|cancel ...`"""
    actions = ("render", "submit", "status", "cancel")
    if not argv or argv[0] not in actions:
        raise SwiftdistError(f"usage: swiftdist slurm {{{','.join(actions)}}} ... (see the action's --help)")
    action, rest = argv[0], argv[1:]
    if action in ("render", "submit"):
        job, ns = _job_from_argv(f"swiftdist slurm {action}", rest)
        warning = unsaved_work_warning(training_args(job.train_args)[1])
        if warning:
            print(warning, file=sys.stderr)
        if action == "render" or ns.dry_run:
            print(render(job), end="")
        else:
            job_id = submit(job)
            print(f"submitted job {job_id}")
        return 0
    if len(rest) != 1 or rest[0].startswith("-"):
        raise SwiftdistError(f"usage: swiftdist slurm {action} JOBID|OUTPUT_DIR")
    job_id = resolve_job(rest[0])
    if action == "cancel":
        _slurm(["scancel", job_id])
        print(f"cancelled job {job_id}")
        return 0
    info = job_info(job_id)
    print(f"job {job_id} ({info.get('JobName', '?')}): {info.get('JobState', '?')}, restarts {info.get('Restarts', '0')}, "
          f"run time {info.get('RunTime', '?')}, nodes {info.get('NodeList', '?')}, reason {info.get('Reason', '?')}")
    return 0

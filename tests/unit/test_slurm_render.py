"""SLURM batch scripts and torchrun command lines, rendered and run without a cluster.

The rendered scripts are executed for real by bash, with stand-ins for `scontrol`, `srun` and the
python interpreter that record what they were given: node list parsing, the rendezvous host, the
per-node torchrun line and the training args are checked as the batch shell actually expands them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from swiftdist.errors import SwiftdistError
from swiftdist.launchers.slurm import SlurmJob, main as slurm_main, render
from swiftdist.launchers.torchrun import TorchrunSpec, main as launch_main, torchrun_args

HOSTILE_NAME = 'x"; rm -rf ~; "'
# Each would run a command if it reached the shell unquoted (or inside double quotes).
HOSTILE_ARG = "it's \"; touch PWNED; \" $(touch PWNED2) `touch PWNED3` $HOME\nnext line"

# scontrol: `show hostnames` expands "pre[a-b]" lists; `show node N` gives a NodeAddr that is not
# the node's name (as on the local test cluster, where names do not resolve).
FAKE_SCONTROL = r'''#!/usr/bin/env python3
import re, sys
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args[2]):
        m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", part)
        if m:
            width = len(m.group(2))
            for i in range(int(m.group(2)), int(m.group(3)) + 1):
                print(f"{m.group(1)}{i:0{width}d}")
        else:
            print(part)
elif args[:2] == ["show", "node"]:
    print(f"NodeName={args[2]} Arch=x86_64 CoresPerSocket=8\n   NodeAddr=10.1.0.{int(args[2][-2:])} NodeHostName={args[2]}")
'''
# srun: one task per node, as SLURM would start them (SLURM_NODEID differs, the command does not).
FAKE_SRUN = r'''#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_LOG.srun"; shift; done
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
'''
FAKE_PYTHON = r'''#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                        "omp": os.environ.get("OMP_NUM_THREADS"), "nccl": os.environ.get("NCCL_DEBUG")}) + "\n")
'''


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_cluster(tmp_path):
    """A bin dir with scontrol/srun stand-ins and a fake python; returns (python path, env, log path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "srun", FAKE_SRUN)
    python = _executable(bin_dir / "python-with-swiftdist", FAKE_PYTHON)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "16"}
    return python, env, log


def train_args(out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-llama", "--dataset", "data.jsonl", "--output-dir", str(out), *extra]


def run_script(script: str, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, "rendered script is not valid bash"
    proc = subprocess.run(["bash", str(path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_multi_node_two_by_four_gpus(tmp_path, fake_cluster):
    python, env, log = fake_cluster
    job = SlurmJob(train_args(tmp_path / "out"), nodes=2, gpus_per_node=4, cpus_per_task=16, time="2:00:00",
                   partition="gpu", env={"NCCL_DEBUG": "INFO"}, python=str(python), workdir=str(tmp_path))
    script = render(job)
    assert directives(script) == [
        "--job-name=swiftdist", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--gpus-per-node=4",
        "--partition=gpu", "--time=2:00:00", f"--output={tmp_path}/out/slurm-%j.out", "--open-mode=append",
        f"--chdir={tmp_path}", "--requeue", "--signal=B:USR1@120"]

    proc = run_script(script, tmp_path, env)
    # One torchrun per node, identical: c10d assigns the ranks, so no per-node value is needed.
    per_node = calls(log)
    assert [c["node"] for c in per_node] == ["0", "1"]
    assert per_node[0]["argv"] == per_node[1]["argv"]
    argv = per_node[0]["argv"]
    torchrun = argv[:argv.index("swiftdist.sft") + 1]
    port = 20000 + 4242 % 20000
    assert torchrun == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"10.1.0.7:{port}", "--rdzv-id", "4242",
                        "--rdzv-conf", "last_call_timeout=1", "--max-restarts", "0", "-m", "swiftdist.sft"]
    assert argv[len(torchrun):] == train_args(tmp_path / "out", "--resume", "auto")
    assert per_node[0]["omp"] == "4" and per_node[0]["nccl"] == "INFO"  # 16 CPUs over 4 processes
    assert (tmp_path / "calls.jsonl.srun").read_text().split() == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
    assert f"rendezvous at 10.1.0.7:{port}" in proc.stdout
    assert "requeue" not in proc.stdout.split("training exited with 0")[1]  # a finished job stays finished


def test_single_node_runs_one_standalone_torchrun(tmp_path, fake_cluster):
    python, env, log = fake_cluster
    job = SlurmJob(train_args(tmp_path / "out"), nproc_per_node=2, python=str(python), workdir=str(tmp_path))
    script = render(job)
    assert "--cpus-per-task=2" in directives(script) and not any("gpus" in d or "gres" in d for d in directives(script))
    run_script(script, tmp_path, env)
    (call,) = calls(log)
    assert call["argv"][:7] == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--standalone"]


def test_hostile_values_stay_strings(tmp_path, fake_cluster):
    python, env, log = fake_cluster
    args = train_args(tmp_path / "out", "--system", HOSTILE_ARG)
    job = SlurmJob(args, job_name=HOSTILE_NAME, nodes=2, env={"GLOO_SOCKET_IFNAME": HOSTILE_ARG},
                   python=str(python), workdir=str(tmp_path))
    script = render(job)
    # sbatch reads directive lines itself and strips one level of shell-style quotes.
    (name,) = [d for d in directives(script) if d.startswith("--job-name=")]
    assert shlex.split(name) == [f"--job-name={HOSTILE_NAME}"]
    run_script(script, tmp_path, env)
    for c in calls(log):
        assert c["argv"][-4:] == ["--system", HOSTILE_ARG, "--resume", "auto"]
    assert not list(tmp_path.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "--nodes 0: must be at least 1"),
    ({"gpus_per_node": 4, "gres": "gpu:4"}, "either --gpus-per-node or --gres"),
    ({"env": {"A B": "1"}}, "not a valid environment variable name"),
    ({"job_name": "a\\b"}, "cannot carry backslashes"),
    ({"job_name": "two\nlines"}, "control characters"),
])
def test_refusals(tmp_path, kwargs, message):
    with pytest.raises(SwiftdistError, match=message):
        render(SlurmJob(train_args(tmp_path / "out"), **kwargs))


def test_gres_count_sets_processes_and_resume_path_is_refused(tmp_path):
    assert "--nproc-per-node 4" in render(SlurmJob(train_args(tmp_path), gres="gpu:a100:4"))
    with pytest.raises(SwiftdistError, match="resumes from its own output dir"):
        render(SlurmJob(train_args(tmp_path, "--resume", str(tmp_path / "ckpt"))))


def test_cli_render_mixes_training_flags_and_submit_needs_sbatch(tmp_path, capsys, monkeypatch):
    assert slurm_main(["render", "--nodes", "2", "--model", "tiny-llama", "--output-dir", str(tmp_path),
                       "--", "--dataset", "data.jsonl"]) == 0
    script = capsys.readouterr().out
    assert "--rdzv-backend c10d" in script and "--model tiny-llama" in script and "--dataset data.jsonl" in script
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SwiftdistError, match="sbatch not found"):
        slurm_main(["submit", "--output-dir", str(tmp_path)])


def test_torchrun_command_lines():
    assert torchrun_args(TorchrunSpec(nproc_per_node=2)) == [
        "--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0"]
    assert torchrun_args(TorchrunSpec(nproc_per_node=4, nnodes=2, master_addr="10.0.0.1", max_restarts=3)) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500",
        "--rdzv-id", "swiftdist", "--rdzv-conf", "last_call_timeout=1", "--max-restarts", "3"]
    assert torchrun_args(TorchrunSpec(nnodes=2, node_rank=1, master_addr="h0", master_port=1234)) == [
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "1", "--master-addr", "h0", "--master-port", "1234",
        "--max-restarts", "0"]
    with pytest.raises(SwiftdistError, match="--nnodes 2 needs --master-addr"):
        TorchrunSpec(nnodes=2)
    with pytest.raises(SwiftdistError, match="--node-rank 2: must be in 0..1"):
        TorchrunSpec(nnodes=2, node_rank=2, master_addr="h0")


def test_launch_dry_run(capsys):
    assert launch_main(["--nproc-per-node", "2", "--nnodes", "2", "--master-addr", "10.0.0.1", "--dry-run",
                        "--", "--model", "tiny-llama", "--system", "a b"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "10.0.0.1:29500"
    assert cmd[-6:] == ["-m", "swiftdist.sft", "--model", "tiny-llama", "--system", "a b"]

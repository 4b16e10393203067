"""SLURM batch scripts and torchrun command lines, rendered and run without a cluster.

The rendered scripts are executed for real by bash, with stand-ins for `scontrol`, `srun` and the
python interpreter that record what they were given: node list parsing, the rendezvous host, the
per-node torchrun line and the training args are checked as the batch shell actually expands them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swiftdist.errors import SwiftdistError
from swiftdist.launchers.slurm import DEFAULT_SAVE_MINUTES, SlurmJob, main as slurm_main, render
from swiftdist.launchers.torchrun import TorchrunSpec, main as launch_main, torchrun_args

HOSTILE_NAME = 'x"; rm -rf ~; "'
# Each would run a command if it reached the shell unquoted (or inside double quotes).
HOSTILE_ARG = "it's \"; touch PWNED; \" $(touch PWNED2) `touch PWNED3` $HOME\nnext line"

# scontrol: `show hostnames` expands "pre[a-b]" lists; `show node N` gives a NodeAddr that is not
# the node's name (as on the local test cluster, where names do not resolve).
FAKE_SCONTROL = r'''#!/usr/bin/env python3
import os, re, sys
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
elif args[0] == "requeue":
    with open(os.environ["FAKE_LOG"] + ".requeue", "a") as f:
        f.write(args[1] + "\n")
'''
# srun: one task per node, as SLURM would start them (SLURM_NODEID differs, the command does not).
# Signals as srun 22.05 handles them: USR1 passed on to the tasks as it is, TERM answered with
# SIGKILL ("forcing job termination"). Exits with the first failing task's status.
FAKE_SRUN = r'''#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_LOG.srun"; shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}"' USR1
trap 'kill -KILL "${pids[@]}"' TERM
rc=0
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
    wait "$pid" || { status=$?; ((rc)) || rc=$status; }
done
exit "$rc"
'''
FAKE_PYTHON = r'''#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                        "omp": os.environ.get("OMP_NUM_THREADS"), "nccl": os.environ.get("NCCL_DEBUG")}) + "\n")
'''
# A torchrun whose training stops as ours does: it records every signal, says when it is ready, and
# after the first USR1/TERM takes a while to "save" before it exits 143; SIGKILL leaves no record.
FAKE_TRAINING = r'''#!/usr/bin/env python3
import json, os, signal, sys, time
node, got = os.environ.get("SLURM_NODEID", "0"), []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, _: got.append(signal.Signals(s).name))
open(f"{os.environ['FAKE_LOG']}.ready{node}", "w").close()
while not got:
    time.sleep(0.01)
time.sleep(1.0)  # the save; the test's second signal arrives meanwhile
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"node": node, "signals": got, "saved": True}) + "\n")
sys.exit(143)
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
    _executable(bin_dir / "python-training", FAKE_TRAINING)
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
    per_node = sorted(calls(log), key=lambda c: c["node"])
    assert [c["node"] for c in per_node] == ["0", "1"]
    assert per_node[0]["argv"] == per_node[1]["argv"]
    argv = per_node[0]["argv"]
    torchrun = argv[:argv.index("swiftdist.sft") + 1]
    port = 20000 + 4242 % 20000
    assert torchrun == ["-m", "swiftdist.preemption", "--nnodes", "2", "--nproc-per-node", "4",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"10.1.0.7:{port}", "--rdzv-id", "4242",
                        "--rdzv-conf", "last_call_timeout=1", "--max-restarts", "0",
                        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "120",
                        "-m", "swiftdist.sft"]
    assert argv[len(torchrun):] == train_args(tmp_path / "out", "--resume", "auto",
                                              "--save-minutes", str(DEFAULT_SAVE_MINUTES))
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
    assert call["argv"][:7] == ["-m", "swiftdist.preemption", "--nnodes", "1", "--nproc-per-node", "2", "--standalone"]


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
        assert c["argv"][-6:-2] == ["--system", HOSTILE_ARG, "--resume", "auto"]
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
    stop = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout"]
    assert torchrun_args(TorchrunSpec(nproc_per_node=2)) == [
        "--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0", *stop, "120"]
    assert torchrun_args(TorchrunSpec(nproc_per_node=4, nnodes=2, master_addr="10.0.0.1", max_restarts=3)) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500",
        "--rdzv-id", "swiftdist", "--rdzv-conf", "last_call_timeout=1", "--max-restarts", "3", *stop, "120"]
    assert torchrun_args(TorchrunSpec(nnodes=2, node_rank=1, master_addr="h0", master_port=1234, grace_seconds=600)) == [
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "1", "--master-addr", "h0", "--master-port", "1234",
        "--max-restarts", "0", *stop, "600"]
    with pytest.raises(SwiftdistError, match="--nnodes 2 needs --master-addr"):
        TorchrunSpec(nnodes=2)
    with pytest.raises(SwiftdistError, match="--node-rank 2: must be in 0..1"):
        TorchrunSpec(nnodes=2, node_rank=2, master_addr="h0")


def test_launch_dry_run(capsys):
    assert launch_main(["--nproc-per-node", "2", "--nnodes", "2", "--master-addr", "10.0.0.1", "--grace-seconds", "300",
                        "--dry-run", "--", "--model", "tiny-llama", "--system", "a b"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[:3] == [sys.executable, "-m", "swiftdist.preemption"]
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "10.0.0.1:29500"
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "300"
    assert cmd[-6:] == ["-m", "swiftdist.sft", "--model", "tiny-llama", "--system", "a b"]


def test_torchrun_signal_flags_exist_in_this_torch():
    """The flags we pass are torchrun's own (torch >= 2.10), with the meaning we rely on."""
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args(torchrun_args(TorchrunSpec(grace_seconds=75)) + ["-m", "swiftdist.sft"])
    assert ns.signals_to_handle.split(",")[-1] == "SIGUSR1" and ns.shutdown_timeout == 75


def test_a_stop_before_torchrun_handles_signals_reaches_the_workers(tmp_path):
    """torchrun installs its signal handlers only when it starts the workers: a stop during its import of
    torch (or a long rendezvous) used to kill it. Through swiftdist.preemption the workers get the stop."""
    worker = tmp_path / "worker.py"
    worker.write_text("from swiftdist import preemption\npreemption.install()\nprint('stop', preemption.requested())\n")
    cmd = [sys.executable, "-m", "swiftdist.preemption", *torchrun_args(TorchrunSpec(grace_seconds=5)), str(worker)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    usr1_caught = 1 << (signal.SIGUSR1 - 1)
    deadline = time.monotonic() + 30
    while not int(Path(f"/proc/{proc.pid}/status").read_text().split("SigCgt:")[1].split()[0], 16) & usr1_caught:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)  # swiftdist.preemption caught it; torch is still importing
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"stop {int(signal.SIGUSR1)}" in out, out


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("scenario", ["usr1", "usr1, then the kill", "the kill"])
def test_usr1_reaches_the_training_once_and_requeues_the_job_even_when_the_kill_follows(tmp_path, fake_cluster,
                                                                                        nodes, scenario):
    """USR1 goes to the batch shell alone, which passes it on once. The scheduler's kill is TERM to every
    process of the job (here: to the script's process group): the shell adds no signal of its own to it
    (torchrun would give up its wait on a second one), and it does not undo the requeue of a USR1."""
    python, env, log = fake_cluster
    job = SlurmJob(train_args(tmp_path / "out"), nodes=nodes, python=str(python.parent / "python-training"),
                   workdir=str(tmp_path))
    path = tmp_path / "job.sbatch"
    path.write_text(render(job))
    shell = subprocess.Popen(["bash", str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("calls.jsonl.ready*"))) < nodes:
        assert shell.poll() is None and time.monotonic() < deadline, shell.communicate()[0]
        time.sleep(0.02)
    if "usr1" in scenario:
        shell.send_signal(signal.SIGUSR1)
        time.sleep(0.2)  # the trap has run (the training "saves" for 1 s)
    if "kill" in scenario:
        os.killpg(shell.pid, signal.SIGTERM)
    out, _ = shell.communicate(timeout=30)
    requeue = tmp_path / "calls.jsonl.requeue"
    assert (requeue.read_text() == "4242\n" if "usr1" in scenario else not requeue.exists()), out
    if nodes == 2 and "kill" in scenario:
        assert shell.returncode == 128 + signal.SIGKILL, out  # srun answered TERM by SIGKILLing its tasks
        return
    expected = {"usr1": ["SIGUSR1"], "usr1, then the kill": ["SIGUSR1", "SIGTERM"], "the kill": ["SIGTERM"]}
    assert shell.returncode == 143, out
    assert sorted(c["node"] for c in calls(log)) == [str(n) for n in range(nodes)], out
    assert all(c["signals"] == expected[scenario] and c["saved"] for c in calls(log)), out


def test_periodic_saving_is_on_unless_the_args_choose(tmp_path, capsys):
    def job_args(*extra: str) -> list[str]:
        script = render(SlurmJob(train_args(tmp_path / "out", *extra)))
        line = script.split("-m swiftdist.sft", 1)[1].split("\n", 2)[1]  # the training args follow torchrun's line
        return shlex.split(line.removesuffix(")"))  # `launch=(...)` ends there on one node

    assert job_args()[-2:] == ["--save-minutes", str(DEFAULT_SAVE_MINUTES)]
    assert "--save-minutes" not in job_args("--save-steps", "50")
    preset = tmp_path / "preset.yaml"
    preset.write_text("checkpoint:\n  save_minutes: 10\n")
    assert "--save-minutes" not in job_args("--config", str(preset))

    # Periodic saving turned off on purpose: rendered as asked, with one line of warning.
    for off in (["--save-steps", "0"], ["--save-steps", "0", "checkpoint.save_minutes=0"]):
        assert slurm_main(["render", "--output-dir", str(tmp_path), *off]) == 0
        captured = capsys.readouterr()
        assert "--save-minutes" not in captured.out
        (line,) = captured.err.splitlines()
        assert line.startswith("swiftdist: warning: this job requeues, but --save-steps 0 and --save-minutes 0")
    assert slurm_main(["render", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""

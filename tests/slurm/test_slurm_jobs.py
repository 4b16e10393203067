"""Real jobs on the local two-node SLURM cluster: finish, preempt + requeue + resume (on one node and
on two), time limit, two nodes.

Each job fine-tunes tiny-llama with 2 gloo processes (fp32, no LoRA dropout, so an interrupted run
can be compared with an uninterrupted one bit for bit). Each reference run and its preempted run are
submitted together and run side by side. Timings are printed (`pytest -s`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftdist.launchers.slurm import SlurmJob, job_info, main as slurm_main, submit
from tests import helpers
from tests.helpers import arithmetic_rows, losses, metrics, run_cmd, write_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HOSTILE_NAME = 'x"; rm -rf ~; "'
STEPS = 30
TWO_NODE_STEPS = 12
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def train_args(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["--model", "tiny-llama", "--dataset", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", str(steps), "--lr", "1e-3", "--precision", "fp32", "--lora-dropout", "0",
            "--save-total-limit", "0"]


def job_log(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(out.glob("slurm-*.out")))


def wait_for(condition, out: Path, what: str, timeout: float = 240):
    """Poll `condition()` until it returns something truthy; on timeout the job log goes into the failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n--- job log\n{job_log(out)}")


def wait_done(job_id: str, out: Path, timeout: float = 240) -> dict:
    return wait_for(lambda: (info := job_info(job_id))["JobState"] in DONE and info, out,
                    f"job {job_id} to end", timeout)


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in metrics(out) if "loss" in r] if path.exists() else []


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


def submit_job(out: Path, data: Path, steps: int = STEPS, **slurm) -> str:
    job = SlurmJob(train_args(data, out, steps), nproc_per_node=slurm.pop("nproc_per_node", 2), env=JOB_ENV, **slurm)
    return submit(job)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("slurm-data") / "chat.jsonl", arithmetic_rows(32))


@pytest.fixture(scope="module")
def reference(slurm_cluster, data, tmp_path_factory) -> tuple[str, Path]:
    """The uninterrupted job, submitted through the CLI with a hostile job name (not waited for here)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    cmd = [sys.executable, "-m", "swiftdist.cli", "slurm", "submit", "--nproc-per-node", "2", "--time", "10",
           "--job-name", HOSTILE_NAME, *(f"--env={k}={v}" for k, v in JOB_ENV.items()), "--", *train_args(data, out)]
    proc = run_cmd(cmd, env=helpers.test_env(), timeout=120)
    job_id = re.fullmatch(r"submitted job (\d+)\n", proc.stdout).group(1)
    assert (out / "slurm-job-id").read_text().strip() == job_id
    return job_id, out


@pytest.fixture(scope="module")
def two_node_reference(slurm_cluster, data, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted job on n1 and n2, one process each (not waited for here)."""
    out = tmp_path_factory.mktemp("two-node-reference") / "out"
    return submit_job(out, data, steps=TWO_NODE_STEPS, nodes=2, nproc_per_node=1, time="10"), out


def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(reference, data, tmp_path):
    out = tmp_path / "out"
    job_id = submit_job(out, data, time="10")
    wait_for(lambda: len(steps_logged(out)) >= 5, out, "step 5")

    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    (ckpt,) = wait_for(lambda: complete_checkpoints(out), out, "the preemption checkpoint", timeout=120)
    t_checkpoint = (ckpt / "COMPLETE").stat().st_mtime
    saved_step = int(ckpt.name.removeprefix("step-"))
    requeued = wait_for(lambda: re.search(r"swiftdist: ([\d.]+) requeueing job", job_log(out)), out, "the requeue")
    wait_for(lambda: saved_step + 1 in steps_logged(out), out, f"the first resumed step ({saved_step + 1})")
    t_resumed = time.time()

    info = wait_done(job_id, out)
    log = job_log(out)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1" and "SLURM_RESTART_COUNT=1" in log
    assert re.search(rf"resumed from \S+step-0*{saved_step} at step {saved_step} ", log), log
    assert steps_logged(out) == list(range(1, STEPS + 1))  # each step once: none lost, none repeated

    ref_id, ref_out = reference
    assert wait_done(ref_id, ref_out)["JobState"] == "COMPLETED", job_log(ref_out)
    assert losses(out) == losses(ref_out)
    a, b = adapter(out), adapter(ref_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final adapters differ"
    print(f"\npreemption: signal -> checkpoint step {saved_step} on disk {t_checkpoint - t_signal:.1f}s; "
          f"requeue -> first resumed step {t_resumed - float(requeued.group(1)):.1f}s")


def test_job_finishes_with_adapter_and_metrics(reference):
    job_id, out = reference
    info = wait_done(job_id, out)
    log = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert steps_logged(out) == list(range(1, STEPS + 1))
    assert "SLURM_RESTART_COUNT=0" in log and "requeue" not in log
    # sbatch parsed the quoted directive back into the exact hostile string.
    name = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%j"], capture_output=True, text=True)
    assert name.stdout.rstrip("\n") == HOSTILE_NAME and info["JobName"] == HOSTILE_NAME
    slurm_main(["status", str(out)])  # reads the job id the output dir recorded


def test_time_limit_checkpoints_before_the_kill_and_continues_after_requeue(slurm_cluster, data, tmp_path):
    """A 1-minute job warned 30 s ahead: SLURM sends the warning at its next 30 s check, often while the
    job is still starting. Far more steps than fit in a minute, so only the warning ends each run."""
    out = tmp_path / "out"
    job_id = submit_job(out, data, steps=100_000, time="1", signal_seconds=30)
    resumed = wait_for(lambda: re.search(r"resumed from \S+ at step (\d+)", job_log(out)), out,
                       "a run resumed after the time-limit requeue", timeout=200)
    step = int(resumed.group(1))
    assert step >= 1 and "SLURM_RESTART_COUNT=1" in job_log(out)
    wait_for(lambda: step + 1 in steps_logged(out), out, f"a step after the resumed one ({step + 1})", timeout=120)
    first_run = job_log(out).split("SLURM_RESTART_COUNT=1")[0]
    assert "SIGUSR1" in first_run and "stop signal received" in first_run and "requeueing job" in first_run
    assert "TIMEOUT" not in job_info(job_id)["JobState"]

    # A cancelled job checkpoints too (TERM), but stays cancelled: only USR1 requeues.
    slurm_main(["cancel", str(out)])
    info = wait_done(job_id, out, timeout=60)
    time.sleep(3)
    assert info["JobState"] == "CANCELLED" and job_info(job_id)["JobState"] == "CANCELLED", job_log(out)


def test_two_node_job_preempted_then_terminated_checkpoints_requeues_and_matches(two_node_reference, data, tmp_path):
    """The stop crosses srun as USR1 (srun answers TERM by SIGKILLing its tasks) and torchrun forwards it.
    A TERM to the batch shell behind the warning, while the training still stops, keeps the requeue."""
    out = tmp_path / "out"
    job_id = submit_job(out, data, steps=TWO_NODE_STEPS, nodes=2, nproc_per_node=1, time="10")
    wait_for(lambda: len(steps_logged(out)) >= 3, out, "step 3")

    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    # Two scancels in a row may reach the shell in either order: the kill follows the warning.
    wait_for(lambda: "SIGUSR1: asking the training" in job_log(out), out, "the warning to reach the shell")
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], check=True)
    (ckpt,) = wait_for(lambda: complete_checkpoints(out), out, "the preemption checkpoint", timeout=120)
    t_checkpoint = (ckpt / "COMPLETE").stat().st_mtime
    saved_step = int(ckpt.name.removeprefix("step-"))
    info = wait_done(job_id, out)
    log = job_log(out)
    first_run = log.split("SLURM_RESTART_COUNT=1")[0]
    assert re.search(r"SIGTERM: .*the job will requeue\n(.*\n)*.*training exited", first_run), log
    assert "forcing job termination" not in log and "Killed" not in log, log
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert re.search(rf"resumed from \S+step-0*{saved_step} at step {saved_step} ", log), log
    assert steps_logged(out) == list(range(1, TWO_NODE_STEPS + 1))

    ref_id, ref_out = two_node_reference
    assert wait_done(ref_id, ref_out)["JobState"] == "COMPLETED", job_log(ref_out)
    assert losses(out) == losses(ref_out)
    a, b = adapter(out), adapter(ref_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final adapters differ"
    print(f"\ntwo nodes: preemption signal -> checkpoint step {saved_step} complete on disk "
          f"{t_checkpoint - t_signal:.1f}s")


def test_two_node_job_meets_on_the_first_node_and_finishes(two_node_reference):
    job_id, out = two_node_reference
    info = wait_done(job_id, out)
    log = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log
    assert re.search(r"rendezvous at 127\.0\.0\.2:\d+", log), log  # n1's NodeAddr, not its name
    assert re.search(r"\(lora, fp32, \w+ attention, strategy ddp, 2 ranks\)", log), log
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert steps_logged(out) == list(range(1, TWO_NODE_STEPS + 1))

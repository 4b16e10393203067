"""Shared test helpers: run swiftdist in real processes (torchrun or plain python) and read results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = int(os.environ.get("SWIFTDIST_TEST_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(cmd: list[str], env: dict | None = None, timeout: int = TIMEOUT, check: bool = True,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure (or timeout) the whole log goes into the assertion message."""
    try:
        proc = subprocess.run(cmd, env=env or test_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}\n{err}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] | None = None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "swiftdist.sft", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", *(extra or []), "-m", "swiftdist.sft", *args]


def sft(nproc: int, args: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m swiftdist.sft` for 1 process, else `torchrun --nproc-per-node N -m swiftdist.sft`."""
    return run_cmd(torchrun_cmd(nproc, args), env=env, check=check, **kw)


def metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(output_dir) if "loss" in r]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int) -> list[dict]:
    """A small learnable chat set: the answer is a deterministic function of the question."""
    return [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(n)
    ]


def train_in_process(argv: list[str]):
    """Run a whole single-process training inside the test process; returns the finished Trainer.

    The caller owns the process group (see the `process_group` fixture)."""
    from swiftdist.config import parse_config
    from swiftdist.distributed import init_distributed
    from swiftdist.trainer import Trainer

    trainer = Trainer(parse_config(argv), init_distributed())
    assert trainer.train() == 0
    return trainer


def random_lora_adapter(model_path: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random A and B (peft initialises B to zero, which would change nothing), so
    the adapted model answers differently from its base, and adapters of different seeds from each other."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(out)
    return out

"""What a run leaves behind: metrics.jsonl with every promised field, eval losses, loss.png,
the resolved config, an offline wandb run, and the lr schedule's shape."""

import json

import pytest
from omegaconf import OmegaConf

from swiftdist.config import TrainConfig
from swiftdist.schedule import lr_at
from tests.helpers import train_in_process


def test_run_outputs(tiny_llama, chat_file, tmp_path, process_group, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    train_in_process(["--model", str(tiny_llama), "--dataset", str(chat_file), "--val-split", "0.25",
                      "--eval-steps", "2", "--max-steps", "4", "--batch-size", "4", "--output-dir", str(out),
                      "--report-to", "jsonl", "wandb", "--lora-rank", "4"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert {"step", "epoch", "loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_gib"} <= steps[0].keys()
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps; the end (step 4) is not evaluated twice
    assert all(r["eval_loss"] > 0 for r in evals)
    assert (out / "loss.png").stat().st_size > 1000
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.lora_rank == 4 and saved.data.val_split == 0.25
    assert list((out / "wandb").glob("offline-run-*")), "wandb should have written an offline run"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1, scheduler="cosine")
    assert lr_at(0.05, cfg) == pytest.approx(0.5)
    assert lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(0.55, cfg) == pytest.approx(0.55)
    assert lr_at(1.0, cfg) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, warmup_ratio=0.0, scheduler="linear")
    assert lr_at(0.25, linear) == pytest.approx(0.75)

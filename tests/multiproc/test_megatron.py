"""Megatron TP / PP / TP x PP (torchrun, gloo) against DDP on the same model and global batch.

Tolerance: the models compute the same function in fp32 with sums in another order (fused QKV,
vocab-parallel softmax, TP all-reduces, per-stage grad accumulation), i.e. ~1e-7 relative
round-off per step that Adam amplifies a little over a few steps; rel 1e-5 on the losses holds
with a margin of ~10x (measured: max relative difference ~1e-6 over 4 steps).

LoRA is compared with megatron on one process, not with DDP: mcore fuses q/k/v (and gate/up) into
one layer with one adapter, a different parameterisation from peft's three adapters on the HF
model. Both start as the base model (lora_B = 0), so step 1 equals DDP's (full fine-tuning's, too); the seeded,
layout-independent LoRA init makes every TP x PP layout train the same adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import losses, metrics, sft

pytestmark = pytest.mark.slow

STEPS = 4


def args(model, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--precision", "fp32",
            "--lora-dropout", "0", *extra]


@pytest.fixture(scope="module")
def ddp_full(tiny_llama, tmp_path_factory):
    """One-process DDP reference (data-parallel size 1, as in every megatron layout below)."""
    root = tmp_path_factory.mktemp("ddp")
    data = _data(root)
    sft(1, args(tiny_llama, data, root / "out", "--train-type", "full"))
    return data, losses(root / "out")


def _data(root: Path) -> Path:
    from tests.helpers import arithmetic_rows, write_jsonl

    return write_jsonl(root / "data.jsonl", arithmetic_rows(32))


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2"), ("--tp", "2", "--pp", "2")],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_full_finetune_matches_ddp(layout, ddp_full, tiny_llama, tmp_path):
    # tiny-llama has tied embeddings: at PP=2 the head's copy lives on the last stage and its
    # gradient is summed with the embedding's, which this parity checks.
    data, reference = ddp_full
    nproc = 4 if len(layout) == 4 else 2
    sft(nproc, args(tiny_llama, data, tmp_path / "out", "--train-type", "full", "--strategy", "megatron", *layout))
    ours = losses(tmp_path / "out")
    assert len(ours) == STEPS and ours[-1] < ours[0]
    assert ours == pytest.approx(reference, rel=1e-5)


def test_lora_tp2_matches_one_process_and_ddp_first_step(ddp_full, tiny_llama, tmp_path):
    data, full_reference = ddp_full
    lora = ["--train-type", "lora", "--lr", "1e-2"]
    sft(1, args(tiny_llama, data, tmp_path / "one", *lora, "--strategy", "megatron"))
    sft(2, args(tiny_llama, data, tmp_path / "tp2", *lora, "--strategy", "megatron", "--tp", "2"))
    one, tp2 = losses(tmp_path / "one"), losses(tmp_path / "tp2")
    assert tp2 == pytest.approx(one, rel=1e-5)
    # Before the first update a LoRA model is its base model: the same first loss as DDP's.
    assert tp2[0] == pytest.approx(full_reference[0], rel=1e-6)
    assert tp2[-1] < tp2[0]


def test_save_resume_on_other_layout_and_export(tiny_qwen2, tmp_path):
    """Train at TP=2 with checkpoints; resume at step 2 under PP=2 (mcore dist-ckpt keyed by HF names
    reshards); the continued losses equal the uninterrupted run's. Then the exported HF model
    (final/, and the checkpoint read by load_tensors) gives the eval loss the mcore model logged."""
    from safetensors.torch import load_file

    from swiftdist.strategies.megatron.strategy import MegatronStrategy

    data = _data(tmp_path)
    full = ["--train-type", "full", "--strategy", "megatron", "--val-split", "0.25", "--save-steps", "2",
            "--save-total-limit", "0"]
    sft(2, args(tiny_qwen2, data, tmp_path / "run", *full, "--tp", "2"))
    step2 = tmp_path / "run" / "checkpoints" / "step-000002"
    sft(2, args(tiny_qwen2, data, tmp_path / "resumed", *full, "--pp", "2", "--resume", str(step2)))
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "run")[2:], rel=1e-5)

    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    from_checkpoint = MegatronStrategy.load_tensors(str(tmp_path / "run" / "checkpoints" / "step-000004" / "model"),
                                                    list(final))
    for name, tensor in final.items():
        assert torch.equal(from_checkpoint[name], tensor), name

    logged = [r["eval_loss"] for r in metrics(tmp_path / "run") if "eval_loss" in r][-1]
    assert _hf_eval_loss(tmp_path / "run" / "final", data) == pytest.approx(logged, rel=1e-5)


def _hf_eval_loss(model_dir: Path, data: Path) -> float:
    """Token-mean loss of the HF model over the run's validation split (same split, same collate)."""
    from transformers import AutoModelForCausalLM

    from swiftdist.config import parse_config
    from swiftdist.data import IGNORE, build_datasets, collate
    from swiftdist.model import load_tokenizer

    cfg = parse_config(["--dataset", str(data), "--val-split", "0.25"])
    tok = load_tokenizer(model_dir)
    val = build_datasets(tok, cfg.data, cfg.train.seed).val
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    batch = collate(val, tok.pad_token_id, False)
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    with torch.no_grad():
        return model(**batch, num_items_in_batch=n).loss.item()

"""The embedded SmolLM2-135M-Instruct, for real: a short LoRA run on self-cognition lowers the loss."""

import pytest

from tests.helpers import losses, sft

pytestmark = pytest.mark.slow


def test_short_lora_run_lowers_loss_on_self_cognition(smollm2, tmp_path):
    out = tmp_path / "out"
    sft(1, ["--model", "smollm2", "--dataset", "self-cognition#24", "--model-name", "Tidewater",
            "--model-author", "Tidewater Labs", "--train-type", "lora", "--batch-size", "4", "--epochs", "2",
            "--lr", "1e-3", "--warmup-ratio", "0", "--output-dir", str(out)])
    history = losses(out)
    assert len(history) == 12
    # The base model has never heard of "Tidewater": the first steps' loss is high (~2-3 nats), and
    # 12 LoRA steps at lr 1e-3 bring it well down (measured ~0.5); halving it is a safe bar.
    first, last = sum(history[:2]) / 2, sum(history[-2:]) / 2
    assert last < 0.5 * first, history
    assert (out / "final" / "adapter_model.safetensors").exists()

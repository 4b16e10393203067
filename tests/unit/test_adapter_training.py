"""LoRA and QLoRA in one process on the tiny model: the loss falls, only adapter weights move, and
the saved peft adapter reloads onto a fresh base model with the same logits."""

import pytest
import torch

from swiftdist.model import load_tokenizer
from tests.helpers import train_in_process


@torch.no_grad()
def _frozen_and_adapter(model):
    """Frozen weights as the function they compute, and the adapter tensors.

    bitsandbytes repacks 4-bit weights into a CPU-friendly layout at the first forward, so a 4-bit
    layer is compared by what it computes (its output on the identity matrix = its dequantised
    weight), not by its storage bytes."""
    import bitsandbytes as bnb

    frozen = {}
    for name, module in model.named_modules():
        if type(module) is bnb.nn.Linear4bit:
            frozen[name] = module(torch.eye(module.in_features, dtype=torch.float32)).clone()
    for name, p in model.named_parameters():
        if not p.requires_grad and not isinstance(p, bnb.nn.Params4bit):
            frozen[name] = p.detach().clone()
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, adapter


@pytest.mark.parametrize("train_type", ["lora", "qlora"])
def test_adapter_learns_alone_and_reloads_with_equal_logits(train_type, tiny_llama, chat_file, tmp_path, process_group,
                                                            monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swiftdist.strategies.ddp import DDPStrategy

    snapshots = {}
    real_wrap = DDPStrategy.wrap

    def recording_wrap(self, model):
        real_wrap(self, model)
        snapshots["before"] = _frozen_and_adapter(self.unwrapped())

    # Observe the model exactly as the trainer wrapped it, before any step (bitsandbytes repacks
    # 4-bit weights when the model is moved, which changes the kernel and its rounding).
    monkeypatch.setattr(DDPStrategy, "wrap", recording_wrap)
    out = tmp_path / "out"
    trainer = train_in_process([
        "--model", str(tiny_llama), "--dataset", str(chat_file), "--train-type", train_type,
        "--batch-size", "4", "--epochs", "3", "--lr", "5e-3", "--lora-dropout", "0", "--precision", "fp32",
        "--output-dir", str(out),
    ])
    history = trainer.metrics.history
    first, last = history[0]["loss"], [r["loss"] for r in history if "loss" in r][-1]
    # A random 10.8-nat model moves slowly under LoRA; 0.2 nats in 24 steps is several times the step-to-step noise (~0.05).
    assert last < first - 0.2, f"loss did not fall: {first} -> {last}"

    model = trainer.strategy.unwrapped()
    frozen_before, adapter_before = snapshots["before"]
    frozen_after, adapter_after = _frozen_and_adapter(model)
    assert frozen_before.keys() == frozen_after.keys()
    changed = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    assert not changed, f"frozen weights changed: {changed[:3]}"
    assert all("lora_" in n for n in adapter_after)
    assert sum(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_after) == len(adapter_after)

    tok = load_tokenizer(tiny_llama)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
        # QLoRA: quantisation is deterministic, so a fresh 4-bit base + the adapter is the trained model.
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, **_base_kwargs(train_type))
        reloaded = PeftModel.from_pretrained(base, out / "final").eval()
        for module in reloaded.modules():  # the same fp32 4-bit kernel as in training (see model.py)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        again = reloaded(**inputs).logits
    # Same weights, same fp32 math on the same CPU: identical up to summation order.
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


def _base_kwargs(train_type):
    if train_type != "qlora":
        return {}
    from swiftdist.model import qlora_config

    return {"quantization_config": qlora_config(torch.float32), "dtype": torch.float32}

"""`swiftdist export` turns a 2-rank checkpoint into a plain HF directory whose logits are the trained
model's, for full fine-tuning (read from the strategy's sharded state), LoRA and QLoRA (merged).

"The trained model" is what the trainer itself hands out: out/final (full) or base + out/final
adapter through peft (LoRA, QLoRA). Everything runs in fp32, so the only differences left are the
order of float additions (W x + B A x vs (W + B A) x): the tolerance is 1e-5 on logits of size ~1.
QLoRA's reference runs the training-time forward (bitsandbytes dequantises NF4 to fp32 and uses
a plain matmul); in eval mode on CPU bitsandbytes switches to a bf16 kernel, which would compare
the export against bf16 rounding instead.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from swiftdist.strategies import names
from tests.helpers import run_cmd, sft

pytestmark = pytest.mark.slow

# Full fine-tunes read each strategy's own shards; a LoRA/QLoRA export reads the peft adapter every
# strategy writes (checked once per gather path: ddp, zero3), so fsdp is covered by its full case.
CASES = [(s, t) for s, t in [("ddp", "full"), ("ddp", "lora"), ("ddp", "qlora"), ("fsdp", "full"),
                             ("zero3", "lora"), ("zero3", "full")]
         if s in names()]
PROMPTS = ["What is 3 plus 3?", "What is 12 plus 12?"]


def trained_model(out, train_type: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swiftdist.model import qlora_config, resolve_model_path

    if train_type == "full":
        return AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    quant = {"quantization_config": qlora_config(torch.float32)} if train_type == "qlora" else {}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama"), dtype=torch.float32, **quant)
    model = PeftModel.from_pretrained(base, out / "final")
    if train_type == "qlora":
        model.train()  # the training-time 4-bit path (see the module docstring); dropout off below
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
    else:
        model.eval()
    return model


def logits(model, tokenizer) -> torch.Tensor:
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                          padding=True)
    with torch.no_grad():
        return model(**batch).logits * batch["attention_mask"][..., None]


@pytest.mark.parametrize("strategy, train_type", CASES)
def test_export_loads_in_plain_transformers_with_the_trained_logits(tmp_path, chat_file, strategy, train_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftdist.model import resolve_model_path

    out, exported = tmp_path / "out", tmp_path / "exported"
    # A high lr for 2 steps, so that the adapter / the new weights move the logits measurably.
    sft(2, ["--model", "tiny-llama", "--dataset", str(chat_file), "--output-dir", str(out), "--strategy", strategy,
            "--train-type", train_type, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--precision", "fp32"])
    merge = [] if train_type == "full" else ["--merge-lora"]
    run_cmd([sys.executable, "-m", "swiftdist.cli", "export", "--checkpoint", str(out), "--to", str(exported),
             *merge, "--dtype", "fp32", "--max-shard-mb", "1"])

    # Written in shards of at most 1 MB: the 12.6 MB embedding alone in one file, the layers (0.3 MB) in another.
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(exported, padding_side="left")
    got, want = logits(model, tokenizer), logits(trained_model(out, train_type), tokenizer)
    assert (got - want).abs().max().item() <= 1e-5
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-llama")).eval()
    assert (got - logits(initial, tokenizer)).abs().max().item() > 1e-3  # training (and the merge) changed it

    if strategy == "ddp":
        answer = run_cmd([sys.executable, "-m", "swiftdist.cli", "infer", "--model", str(exported),
                          "--prompt", PROMPTS[0], "--max-new-tokens", "4"])
        assert f"Q: {PROMPTS[0]}\nA:" in answer.stdout

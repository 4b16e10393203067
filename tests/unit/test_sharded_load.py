"""swiftdist/sharded_load.py without a process group: peft's LoRA init replayed on an empty (meta)
model equals peft's own on a loaded one, and a model whose files cannot be read shard by shard is
refused with the reason (strategies/fsdp.py then loads it whole). The sliced load itself, on 2
ranks against the eager load: tests/multiproc/test_fsdp_load.py."""

import json
import shutil

import pytest
import torch

from swiftdist.sharded_load import CannotSlice, empty_model, plan_initial_values, replay_lora_init


def lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init, bias", [(True, True), ("gaussian", False)])  # peft allows a LoRA bias with True only
def test_replayed_lora_init_equals_peft_on_the_loaded_model(tiny_qwen2, dtype, init, bias):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    eager = lora(AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=dtype), init_lora_weights=init, lora_bias=bias)
    eager_rng = torch.get_rng_state()
    torch.manual_seed(3)
    start = torch.get_rng_state()
    empty = lora(empty_model(tiny_qwen2, dtype=dtype), init_lora_weights=init, lora_bias=bias)
    assert torch.equal(torch.get_rng_state(), eager_rng)  # peft drew as many numbers on meta
    replayed = replay_lora_init(empty, start)
    assert torch.equal(torch.get_rng_state(), eager_rng)  # and the replay leaves the generator there
    want = {n.removeprefix("base_model.model."): p for n, p in eager.named_parameters() if "lora_" in n}
    assert replayed.keys() == want.keys() and len(want) == 2 * 3 * (3 if bias else 2)  # 2 layers x 3 targets x (A, B[, B's bias])
    for name, value in replayed.items():
        # Exactly: the same draws, and the same rounding through the base dtype (bf16 adapters are
        # upcast to fp32 by peft after being moved to the base layer's dtype).
        assert torch.equal(value.to(want[name].dtype), want[name]), name
    assert any(v.abs().sum() > 0 for n, v in replayed.items() if "lora_A" in n)


def test_the_plan_reads_every_base_tensor_from_the_files_and_follows_tied_names(tiny_llama):
    torch.manual_seed(0)
    start = torch.get_rng_state()
    model = lora(empty_model(tiny_llama))
    plan = plan_initial_values(model, tiny_llama, start)
    base = {n for n, _ in model.get_base_model().named_parameters() if "lora_" not in n}
    assert plan.in_files.keys() == base and plan.replayed.keys().isdisjoint(base)
    assert plan.in_files["model.layers.0.self_attn.q_proj.base_layer.weight"][1] == "model.layers.0.self_attn.q_proj.weight"
    assert model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight
    assert "lm_head.weight" not in plan.in_files  # one tensor with two names, read once


def copy_model(src, dst, **change):
    """`src`'s config and safetensors in `dst`, with tensors renamed or reshaped: change = {name: new name or tensor}."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    for name, new in change.items():
        value = tensors.pop(name)
        if isinstance(new, str):
            tensors[new] = value
        else:
            tensors[name] = new
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_model_whose_files_do_not_match_is_refused_with_the_reason(tiny_llama, tmp_path):
    start = torch.get_rng_state()
    renamed = copy_model(tiny_llama, tmp_path / "renamed", **{"model.norm.weight": "model.final_norm.weight"})
    with pytest.raises(CannotSlice, match="no tensor model.norm.weight in"):
        plan_initial_values(empty_model(renamed), renamed, start)
    reshaped = copy_model(tiny_llama, tmp_path / "reshaped", **{"model.norm.weight": torch.ones(32)})
    with pytest.raises(CannotSlice, match=r"model.norm.weight is \[32\] in the files, \[64\] in the model"):
        plan_initial_values(empty_model(reshaped), reshaped, start)
    no_safetensors = tmp_path / "bin"
    no_safetensors.mkdir()
    shutil.copy(tiny_llama / "config.json", no_safetensors)
    with pytest.raises(CannotSlice, match="has no model.safetensors"):
        plan_initial_values(empty_model(no_safetensors), no_safetensors, start)
    with pytest.raises(CannotSlice, match="only plain LoRA on nn.Linear layers is replayed"):
        plan_initial_values(lora(empty_model(tiny_llama), use_dora=True), tiny_llama, start)


def test_a_sharded_checkpoint_is_read_through_its_index(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    plan = plan_initial_values(empty_model(tmp_path), tmp_path, torch.get_rng_state())
    assert {name: file.name for name, (file, _) in plan.in_files.items()} == index

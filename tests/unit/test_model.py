import pytest
import torch

from swiftdist.config import ModelConfig
from swiftdist.errors import SwiftdistError
from swiftdist.model import CPU_EAGER_MAX_ROW, load_model, lora_target_modules, resolve_attn_impl, resolve_model_path, weight_dtype


def test_all_linear_targets_every_projection_but_the_lm_head(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    targets = lora_target_modules(model, ["all-linear"])
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(SwiftdistError, match="--target-modules: qkv_proj not found"):
        lora_target_modules(model, ["qkv_proj"])


def test_lora_model_trains_only_adapters(tiny_llama):
    model = load_model(ModelConfig(model="tiny-llama", train_type="lora"), tiny_llama, "fp32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lm_head" in n or "embed_tokens" in n for n, _ in model.named_parameters())
    assert not any("lm_head" in n for n in trainable)


def test_qlora_quantizes_linear_layers_to_nf4(tiny_llama):
    model = load_model(ModelConfig(model="tiny-llama", train_type="qlora"), tiny_llama, "bf16")
    import bitsandbytes as bnb

    quantized = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    assert len(quantized) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    assert quantized[0].weight.dtype == torch.bfloat16  # quant_storage: shardable like any bf16 tensor


def test_flash_attention_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU fallback is what is tested here")
    assert resolve_attn_impl("auto") == "sdpa"
    # CPU: eager for short rows, where it measured faster than sdpa's CPU kernels; sdpa for long ones.
    assert resolve_attn_impl("auto", longest_row=CPU_EAGER_MAX_ROW) == "eager"
    assert resolve_attn_impl("auto", longest_row=CPU_EAGER_MAX_ROW + 1) == "sdpa"
    assert resolve_attn_impl("sdpa", longest_row=10) == "sdpa"  # an explicit choice stays
    with pytest.raises(SwiftdistError, match="flash_attention_2 needs CUDA and the flash-attn package"):
        resolve_attn_impl("flash_attention_2")


def test_weight_dtype_keeps_trained_weights_fp32():
    assert weight_dtype(ModelConfig(train_type="full"), "bf16") == torch.float32
    assert weight_dtype(ModelConfig(train_type="lora"), "bf16") == torch.bfloat16
    assert weight_dtype(ModelConfig(train_type="lora"), "fp32") == torch.float32
    assert weight_dtype(ModelConfig(train_type="lora", torch_dtype="float32"), "bf16") == torch.float32


def test_bad_model_path_is_one_line(tmp_path):
    with pytest.raises(SwiftdistError, match="not a local Hugging Face model directory"):
        resolve_model_path(str(tmp_path))


def test_a_truncated_or_missing_weight_file_is_named_in_one_line(tiny_llama, tmp_path):
    """An interrupted download: every strategy's loader would fail deep in safetensors or transformers."""
    import shutil

    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="2MB")
    shutil.copy(tiny_llama / "config.json", sharded / "config.json")
    assert resolve_model_path(str(sharded)) == sharded  # whole: accepted
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    with pytest.raises(SwiftdistError, match=rf"^--model {sharded}: {last.name} is damaged \(.*\); download it again$"):
        resolve_model_path(str(sharded))
    last.unlink()
    with pytest.raises(SwiftdistError, match=f"{last.name}, listed in model.safetensors.index.json, is missing"):
        resolve_model_path(str(sharded))
    single = tmp_path / "single"
    shutil.copytree(tiny_llama, single)
    with open(single / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SwiftdistError, match="model.safetensors is damaged"):
        resolve_model_path(str(single))

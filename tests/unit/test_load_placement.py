"""Where each strategy has transformers put the weights (issue 13): a strategy that keeps the whole
model on every rank loads it straight onto the rank's GPU; one that shards never lets a whole model
land on a GPU before it is partitioned. Faked CUDA ranks: only the choice is checked here, the GPU
check (scripts/gpu_check.sh) runs them on a card."""

import pytest
import torch

from swiftdist.config import RunConfig
from swiftdist.distributed import DistInfo
from swiftdist.model import load_model, qlora_config
from swiftdist.strategies import get_strategy_class

GPU_RANK_1 = DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cuda", 1))


def _load_device(name: str, train_type: str):
    cfg = RunConfig()
    cfg.model.train_type = train_type
    return get_strategy_class(name)(cfg, GPU_RANK_1, "bf16").load_device()


@pytest.mark.parametrize("train_type", ["full", "lora", "qlora"])
def test_replicating_strategies_load_onto_the_ranks_gpu_and_fsdp_on_the_host(train_type):
    assert _load_device("ddp", train_type) == torch.device("cuda", 1)
    assert _load_device("zero2", train_type) == torch.device("cuda", 1)
    assert _load_device("zero2-offload", train_type) == torch.device("cuda", 1)
    assert _load_device("fsdp", train_type) == torch.device("cpu")
    assert _load_device("fsdp-offload", train_type) == torch.device("cpu")


@pytest.mark.parametrize("name", ["zero3", "zero3-offload"])
def test_zero3_leaves_placement_to_zero_init_and_quantizes_on_the_host(name):
    # Full and LoRA: built empty and filled per partition, or (files it cannot slice) under zero.Init.
    assert _load_device(name, "full") is None and _load_device(name, "lora") is None
    # QLoRA: never under zero.Init (transformers skips it for 4-bit models); wrap() partitions it
    # one parameter at a time, so no GPU holds the whole 4-bit model.
    assert _load_device(name, "qlora") == torch.device("cpu")


@pytest.mark.parametrize("train_type, zero_init", [("lora", True), ("full", True), ("qlora", False)])
def test_zero3_turns_on_transformers_zero3_only_where_zero_init_places_the_weights(train_type, zero_init):
    # With it on, from_pretrained refuses the device_map that puts a 4-bit model on the host.
    from transformers.integrations import is_deepspeed_zero3_enabled

    cfg = RunConfig()
    cfg.model.train_type = train_type
    with get_strategy_class("zero3")(cfg, GPU_RANK_1, "bf16").model_init_context():
        assert is_deepspeed_zero3_enabled() == zero_init
    assert not is_deepspeed_zero3_enabled()


def test_zero3_places_the_4bit_quantization_state_with_the_buffers(tiny_llama):
    """bitsandbytes' quant state (absmax, codes: no parameters, so DeepSpeed moves none of them) goes to
    the rank's device with the buffers when Zero3Strategy._partition has partitioned the weights. (No GPU
    here: the meta device stands in for the rank's.)"""
    from swiftdist.config import ModelConfig
    from swiftdist.strategies.deepspeed import place_non_parameters

    model = load_model(ModelConfig(model="tiny-llama", train_type="qlora"), tiny_llama, "bf16", device="cpu")
    place_non_parameters(model, "meta")
    linear4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    states = [m.weight.quant_state for m in linear4bit]
    assert states and all(s.absmax.is_meta and s.code.is_meta and s.state2.absmax.is_meta for s in states)
    assert all(b.is_meta for b in model.buffers())
    assert not any(p.is_meta for p in model.parameters())  # parameters are DeepSpeed's to move


def test_without_a_device_map_bitsandbytes_puts_the_whole_4bit_model_on_the_current_gpu(monkeypatch):
    # Why load_model always names a device: transformers' default for a 4-bit model is the current
    # CUDA device, whole, on every rank.
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert Bnb4BitHfQuantizer(qlora_config(torch.bfloat16)).update_device_map(None) == {"": 3}


def test_qlora_loaded_on_the_host_is_quantized_there(tiny_llama):
    from swiftdist.config import ModelConfig

    model = load_model(ModelConfig(model="tiny-llama", train_type="qlora"), tiny_llama, "bf16", device="cpu")
    linear4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4bit and all(m.weight.device.type == "cpu" and m.weight.quant_state.absmax.device.type == "cpu"
                              for m in linear4bit)
    assert all(m.weight.bnb_quantized for m in linear4bit)

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


def test_zero3_leaves_placement_to_zero_init():
    assert _load_device("zero3", "lora") is None


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

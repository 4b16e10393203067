"""ZeRO-3's partition of a tensor read from the files (swiftdist/sharded_load.py `_zero_partition`):
rank r of N holds elements [r*P, (r+1)*P) of the flattened tensor, P = ceil(numel / N), as DeepSpeed's
`_partition_param` cuts it. Every rank's part, read from whole rows of a tensor or of a safetensors
slice, must put the tensor back together exactly, and leave the padding alone. (The real partitions
on 2 ranks, against from_pretrained: tests/multiproc/test_zero3_load.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swiftdist.sharded_load import _local_part


def zero_param(shape, rank: int, ranks: int):
    """What a parameter carries once DeepSpeed has partitioned it (only the attributes the reader uses)."""
    numel = math.prod(shape)
    part = torch.full((-(-numel // ranks),), float("nan"))
    return SimpleNamespace(ds_tensor=part, ds_shape=torch.Size(shape), ds_numel=numel, ds_zero_partition_rank=rank)


@pytest.mark.parametrize("ranks", [2, 3, 8])
@pytest.mark.parametrize("shape", [(5, 7), (11,), (), (2, 3, 4), (3, 1)])
def test_each_ranks_flat_range_is_read_from_the_rows_that_cover_it(tmp_path, shape, ranks):
    whole = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 1
    save_file({"w": whole}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        for source in (whole, f.get_slice("w")):
            params = [zero_param(shape, r, ranks) for r in range(ranks)]
            for p in params:
                local, read = _local_part(p)
                local.copy_(read(source))
            flat = torch.cat([p.ds_tensor for p in params])
            assert torch.equal(flat[:whole.numel()], whole.flatten())
            assert flat[whole.numel():].isnan().all()  # padding: not written


def test_one_rank_partitions_hold_the_loaded_weights_and_linear_regathers_for_backward(tiny_llama, process_group,
                                                                                        monkeypatch):
    """Zero3Strategy._partition on one rank: every partition is the whole tensor, so each must equal
    from_pretrained's (and LoRA's init) exactly. And F.linear must be DeepSpeed's, as zero.Init leaves
    it: torch's saves a view of the gathered weight for backward, which kept every layer gathered
    until backward (measured: +0.26 GiB per rank at the first step on a 256M Llama, LoRA bf16)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    from swiftdist.config import parse_config
    from swiftdist.distributed import init_distributed
    from swiftdist.model import load_model
    from swiftdist.strategies import get_strategy_class

    # Torch's own, whatever an earlier zero.Init in this process left (the patch is process-wide; restored after).
    monkeypatch.setattr(torch.nn.functional, "linear", getattr(ZeroInit, "linear_bk", torch.nn.functional.linear))
    cfg = parse_config(["--strategy", "zero3", "--train-type", "lora", "--model", str(tiny_llama)])
    strategy = get_strategy_class("zero3")(cfg, init_distributed(), "bf16")
    torch.manual_seed(0)
    model = strategy.build_model(tiny_llama)
    strategy._partition(model)
    torch.manual_seed(0)
    want = dict(load_model(cfg.model, tiny_llama, "bf16").named_parameters())
    got = dict(model.named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert p.ds_tensor.dtype == want[name].dtype and torch.equal(p.ds_tensor, want[name].flatten()), name
    assert torch.nn.functional.linear is zero3_linear_wrap


@pytest.mark.parametrize("user, reason", [
    ({}, None),
    ({"bf16": {"enabled": True}}, "bf16 mode"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"},
                            "offload_optimizer": {"device": "cpu"}}}, "NVMe"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "hpZ"),
])
def test_deepspeed_settings_that_derive_more_from_a_partition_load_under_zero_init(tmp_path, user, reason):
    import json

    from swiftdist.config import parse_config
    from swiftdist.distributed import DistInfo
    from swiftdist.strategies import get_strategy_class
    from swiftdist.strategies.deepspeed import _cannot_fill_partitions

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    name = "zero3-offload" if "offload_param" in user.get("zero_optimization", {}) else "zero3"
    cfg = parse_config(["--strategy", name, "--deepspeed-config", str(path)])
    rank = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    why = _cannot_fill_partitions(get_strategy_class(name)(cfg, rank, "bf16").ds_config)
    assert why is None if reason is None else reason in why

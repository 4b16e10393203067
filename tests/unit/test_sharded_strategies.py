"""Sharded strategies without processes: the support matrix, refusals, the DeepSpeed config we
generate and the checks on a user's, the memory estimator and `auto`'s choice."""

import json
import pytest
import torch

from swiftdist.config import ModelConfig, RunConfig, parse_config
from swiftdist.distributed import DistInfo
from swiftdist.errors import SwiftdistError
from swiftdist.strategies import choose, get_strategy_class, names, support_matrix
from tests.helpers import REPO

SHARDED = ["fsdp", "fsdp-offload", "zero2", "zero2-offload", "zero3", "zero3-offload"]
TWO_RANKS = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))


def test_readme_shows_the_generated_support_matrix():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- support-matrix:start -->\n")[1].split("<!-- support-matrix:end -->")[0]
    assert block == support_matrix(), "README's matrix is stale: paste the output of `swiftdist strategies`"


@pytest.mark.parametrize("strategy", SHARDED + ["ddp"])
def test_every_train_type_and_precision_is_supported(strategy):
    # What this claims is shown to run by tests/multiproc/test_sharded.py (and was run in full,
    # all 7 x 3 x 2 combinations, on this CPU machine).
    for train_type in ("full", "lora", "qlora"):
        for precision in ("bf16", "fp32"):
            cfg = RunConfig()
            cfg.model.train_type = train_type
            assert get_strategy_class(strategy).refusal(cfg, precision) is None


@pytest.mark.parametrize("argv, strategy, message", [
    (["--tp", "2"], "fsdp", "--tp/--pp split the model with megatron-core; use --strategy megatron"),
    (["--pp", "2"], "zero3", "--tp/--pp split the model with megatron-core; use --strategy megatron"),
    (["--deepspeed-config", "ds.json"], "fsdp", "--deepspeed-config configures DeepSpeed; use it with a zero2/zero3"),
    (["--deepspeed-config", "ds.json"], "ddp", "--deepspeed-config configures DeepSpeed; use it with a zero2/zero3"),
])
def test_flags_another_backend_reads_are_refused(argv, strategy, message):
    cfg = parse_config(["--strategy", strategy, *argv])
    assert get_strategy_class(strategy).refusal(cfg, "bf16").startswith(message)


def test_the_deepspeed_config_follows_our_flags():
    cfg = parse_config(["--batch-size", "3", "--grad-accum", "4", "--max-grad-norm", "0.5"])
    ds = get_strategy_class("zero3-offload")(cfg, TWO_RANKS, "bf16").ds_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
    assert ds["gradient_clipping"] == 0.5
    # bf16 is torch autocast over fp32 weights, as under ddp/fsdp, with fp32 gradient reductions
    # (no module marked lower-precision-safe); not DeepSpeed's bf16 mode, which casts the module.
    assert ds["bf16"] == {"enabled": False}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    # Offload: optimizer state and (ZeRO-3) parameters in host memory, unpinned without an accelerator.
    assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    zero2 = get_strategy_class("zero2")(cfg, TWO_RANKS, "fp32").ds_config
    assert zero2["zero_optimization"]["stage"] == 2 and zero2["torch_autocast"]["enabled"] is False
    assert "offload_optimizer" not in zero2["zero_optimization"]
    assert "offload_param" not in get_strategy_class("zero2-offload")(cfg, TWO_RANKS, "bf16").ds_config["zero_optimization"]


def test_a_user_deepspeed_config_fills_auto_and_keeps_its_own_settings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 12345},
    }))
    cfg = parse_config(["--strategy", "zero3", "--deepspeed-config", str(path), "--batch-size", "2"])
    assert get_strategy_class("zero3").refusal(cfg, "bf16") is None
    ds = get_strategy_class("zero3")(cfg, TWO_RANKS, "bf16").ds_config
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is True  # "auto": our autocast
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 12345


def test_zero3_keeps_a_gathered_parameter_only_until_its_next_use_within_a_prefetch_bucket(tmp_path):
    # DeepSpeed's default (1e9) kept a 1.07B model almost whole in every rank from step 2 on.
    zero3 = get_strategy_class("zero3")(parse_config(["--strategy", "zero3"]), TWO_RANKS, "fp32")
    zero3._fill_model_sizes(hidden_size=100)
    zero = zero3.ds_config["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == zero["stage3_prefetch_bucket_size"] == 9000
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 1e9}}))
    user = get_strategy_class("zero3")(parse_config(["--strategy", "zero3", "--deepspeed-config", str(path)]),
                                       TWO_RANKS, "fp32")
    user._fill_model_sizes(hidden_size=100)
    assert user.ds_config["zero_optimization"]["stage3_max_reuse_distance"] == 1e9  # the user's own value


def test_zero3_on_a_cpu_host_returns_freed_large_blocks_to_the_os():
    # In a child process (the setting is process-wide). Freeing a 24 MiB block raises glibc's dynamic
    # mmap threshold above 8 MiB, so a freed 8 MiB block would stay in the heap; with the fixed
    # threshold it is unmapped, and the heap's free bytes do not grow by it.
    code = """
import ctypes, sys
from swiftdist.host_memory import return_large_blocks_to_the_os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
def freed_into_heap(size):
    before = libc.mallinfo2().fordblks
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return libc.mallinfo2().fordblks - before
libc.free(libc.malloc(24 << 20))
kept = freed_into_heap(8 << 20)
return_large_blocks_to_the_os()
print(kept > 6 << 20, freed_into_heap(8 << 20) < 1 << 20)
"""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")})
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


@pytest.mark.parametrize("content, strategy, message", [
    ({"zero_optimization": {"stage": 2}}, "zero3",
     "it asks for ZeRO stage 2 without offload, which is --strategy zero2, not zero3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "zero3",
     "which is --strategy zero3-offload, not zero3"),
    ({"train_micro_batch_size_per_gpu": 8}, "zero2", "train_micro_batch_size_per_gpu is 8 but --batch-size gives 4"),
    ({"gradient_clipping": 2.0}, "zero2", "gradient_clipping is 2.0 but --max-grad-norm gives 1.0"),
    ({"fp16": {"enabled": True}}, "zero2", "fp16 is not supported"),
    ({"bf16": {"enabled": False}}, "zero2", "bf16.enabled is False but --precision is bf16"),
    ({"scheduler": {"type": "WarmupLR"}}, "zero2", "remove the 'scheduler' section"),
    ("[1, 2]", "zero2", "expected a JSON object"),
    ('{\n  "a": 1,\n  oops\n}', "zero2", ":3: not valid JSON"),
])
def test_a_user_deepspeed_config_that_disagrees_is_a_one_line_error(tmp_path, content, strategy, message):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    cfg = parse_config(["--strategy", strategy, "--deepspeed-config", str(path)])
    with pytest.raises(SwiftdistError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        get_strategy_class(strategy)(cfg, TWO_RANKS, "bf16")
    assert "\n" not in str(err.value)


def test_a_user_deepspeed_config_that_enables_bf16_keeps_deepspeeds_bf16_mode(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    cfg = parse_config(["--strategy", "zero2", "--deepspeed-config", str(path)])
    ds = get_strategy_class("zero2")(cfg, TWO_RANKS, "bf16").ds_config
    assert ds["bf16"]["enabled"] is True and "torch_autocast" not in ds


@pytest.mark.parametrize("train_type, precision, init_dtype", [
    ("full", "bf16", "fp32"),  # fully trained weights stay fp32 (autocast computes in bf16)
    ("lora", "bf16", "bf16"),  # the frozen base loads in bf16 and must stay so, partitioned
    ("qlora", "bf16", "bf16"),
    ("lora", "fp32", "fp32"),
])
def test_zero_init_builds_the_weights_in_the_dtype_they_load_in(train_type, precision, init_dtype):
    # zero.Init casts every weight it builds to the dtype its config's bf16/fp16 flags name.
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    cfg = parse_config(["--strategy", "zero3", "--train-type", train_type])
    one_rank = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # as DeepSpeedConfig sees here
    strategy = get_strategy_class("zero3")(cfg, one_rank, precision)
    init = InsertPostInitMethodToModuleSubClasses(ds_config=DeepSpeedConfig(strategy._init_config()))
    assert init.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[init_dtype]


def test_zero3_counts_and_groups_its_placeholder_parameters_by_their_real_shape(tiny_llama, process_group, tmp_path):
    """ZeRO-3 loading whole (files it cannot read a slice at a time) builds the model under zero.Init:
    each parameter here is an empty placeholder. The strategy's param_shape gives the parameter counts
    and weight-decay groups of the model loaded whole. (Otherwise it builds on the meta device, where
    shapes are real.)"""
    from swiftdist.distributed import init_distributed
    from swiftdist.model import count_params, load_model
    from swiftdist.strategies.base import param_groups
    from tests.multiproc.test_fsdp_load import renamed_model

    cfg = parse_config(["--strategy", "zero3", "--train-type", "full", "--model", str(tiny_llama)])
    strategy = get_strategy_class("zero3")(cfg, init_distributed(), "fp32")
    partitioned = strategy.build_model(renamed_model(tiny_llama, tmp_path / "renamed"))
    whole = load_model(cfg.model, tiny_llama, "fp32")
    assert all(p.is_meta for p in strategy.build_model(tiny_llama).parameters())

    def group_sizes(groups):
        return [len(g["params"]) for g in groups]

    assert count_params(partitioned) == (0, 0)  # what the placeholders' own shapes say
    assert count_params(partitioned, strategy.param_shape) == count_params(whole)
    assert group_sizes(param_groups(partitioned, cfg, strategy.param_shape)) == group_sizes(param_groups(whole, cfg))


def test_a_missing_deepspeed_config_is_a_one_line_error(tmp_path):
    cfg = parse_config(["--strategy", "zero2", "--deepspeed-config", str(tmp_path / "nope.json")])
    with pytest.raises(SwiftdistError, match="nope.json: cannot read it"):
        get_strategy_class("zero2")(cfg, TWO_RANKS, "bf16")


# ---- the estimator ------------------------------------------------------------------------------


def _stats(model, train_type, precision="bf16", seq_len=64, micro_batch=2, **model_flags):
    from swiftdist.memory import model_stats

    cfg = RunConfig()
    cfg.model.train_type = train_type
    for key, value in model_flags.items():
        setattr(cfg.model, key, value)
    return model_stats(str(model), cfg.model, precision, seq_len, micro_batch)


@pytest.mark.parametrize("train_type", ["full", "lora", "qlora"])
def test_estimated_counts_equal_the_loaded_model(tiny_llama, train_type):
    """The fake-tensor counts (1 and 2 layers, extrapolated) equal the real model's."""
    from swiftdist.model import count_params, load_model

    stats = _stats(tiny_llama, train_type)
    from transformers import AutoModelForCausalLM

    trainable, total = count_params(load_model(ModelConfig(train_type=train_type), tiny_llama, "bf16"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert stats.n_trainable == trainable
    # Logical weights: a loaded 4-bit model packs several into one stored element.
    assert stats.n_params == (total if train_type != "qlora" else plain.num_parameters() + trainable)
    head = plain.get_output_embeddings()  # bitsandbytes stores every linear layer but the head in 4 bits
    assert stats.n_quantized == (0 if train_type != "qlora" else sum(
        m.weight.numel() for m in plain.modules() if isinstance(m, torch.nn.Linear) and m is not head))


def test_estimated_activations_equal_what_autograd_saves(tiny_llama):
    """Same count on real tensors: what a real forward of the loaded model saves for backward."""
    from swiftdist.loss import output_head, token_loss_sum
    from swiftdist.model import load_model

    model = load_model(ModelConfig(train_type="lora"), tiny_llama, "bf16").train()
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, output_head(model), {"input_ids": ids, "labels": ids}, 0)  # the training loss
    assert _stats(tiny_llama, "lora").activations == pytest.approx(sum(saved.values()), rel=0.01)


def test_a_7b_config_alone_is_enough():
    stats = _stats(REPO / "configs/models/qwen2.5-7b.json", "qlora", seq_len=2048, micro_batch=1,
                   gradient_checkpointing=True)
    assert stats.n_params - stats.n_trainable == 7_615_616_512  # Qwen2.5-7B's published size
    llama = _stats(REPO / "configs/models/llama3-8b.json", "full", seq_len=16, micro_batch=1)
    assert llama.n_params == 8_030_261_248  # Llama-3-8B's
    from swiftdist.memory import estimate

    one_gpu = estimate(stats, "ddp", 1)
    # 4-bit weights (~3.8 GiB with the bf16 embeddings and head) plus checkpointed activations:
    # the class of figure peers report for 7-8B QLoRA at 2048 tokens (ms-swift 9.2 GB, torchtune 7.4 GiB).
    assert 5 * 2**30 < one_gpu["total"] < 9 * 2**30


def test_estimate_prints_every_strategy_and_what_fits(capsys):
    from swiftdist.estimate import main

    main(["--model", str(REPO / "configs/models/qwen2.5-7b.json"), "--train-type", "full", "--gpus", "8",
          "--seq-len", "512", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"ddp", "zero2", "fsdp", "zero3", "zero2-offload", "fsdp-offload", "zero3-offload"}
    assert rows["ddp"].endswith("no") and rows["zero3"].endswith("yes")  # 7B full: ~114 GiB vs ~20 GiB on 8 GPUs


def test_sharding_divides_the_state_and_offload_moves_it_to_the_host(tiny_llama):
    from swiftdist.memory import estimate

    stats = _stats(tiny_llama, "full")
    ddp, fsdp, zero3 = (estimate(stats, s, 2) for s in ("ddp", "fsdp", "zero3"))
    assert fsdp["params"] == ddp["params"] / 2 and fsdp["optimizer"] == ddp["optimizer"] / 2
    assert zero3["params"] == ddp["params"] / 2  # fp32 partitions: the weights stay fp32 under autocast
    for name in ("fsdp-offload", "zero3-offload"):
        parts = estimate(stats, name, 2)
        assert parts["params"] == parts["grads"] == parts["optimizer"] == 0 and parts["host"] > 0


def test_fsdp_counts_its_largest_unit_the_mlp_not_the_whole_layer(tiny_llama):
    import json

    from swiftdist.memory import estimate

    cfg = json.loads((tiny_llama / "config.json").read_text())
    stats = _stats(tiny_llama, "full", precision="fp32")
    assert stats.unit_params == stats.unit_trainable == 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    assert estimate(stats, "fsdp", 2)["buffers"] == 3 * stats.unit_params * 4


# ---- auto ---------------------------------------------------------------------------------------


def _auto(tiny_llama, gpu_memory_gib):
    cfg = parse_config(["--model", str(tiny_llama), "--train-type", "full", "--strategy", "auto",
                        "--max-length", "64", "--batch-size", "2", "--gpu-memory", str(gpu_memory_gib)])
    return choose(cfg, "bf16", TWO_RANKS)


def test_choose_looks_up_the_strategy_and_refuses_what_it_cannot_run():
    assert choose(parse_config(["--strategy", "fsdp"]), "bf16", TWO_RANKS) is get_strategy_class("fsdp")
    with pytest.raises(SwiftdistError, match=r"^--strategy megatron --train-type qlora --precision bf16: megatron-core "
                                             r"has no 4-bit linear layers"):
        choose(parse_config(["--strategy", "megatron", "--train-type", "qlora"]), "bf16", TWO_RANKS)


def test_auto_takes_the_first_strategy_that_fits(tiny_llama):
    from swiftdist.memory import GIB, estimate
    from swiftdist.strategies.auto import HEADROOM

    stats = _stats(tiny_llama, "full")
    need = {s: estimate(stats, s, 2)["total"] for s in ("ddp", "zero2", "fsdp")}
    assert need["ddp"] > need["zero2"] > need["fsdp"]
    assert _auto(tiny_llama, need["ddp"] / HEADROOM / GIB * 1.01).name == "ddp"
    # Too small for ddp and zero2, enough for fsdp (the next in line).
    assert _auto(tiny_llama, (need["zero2"] + need["fsdp"]) / 2 / HEADROOM / GIB).name == "fsdp"


def test_auto_says_what_to_do_when_nothing_fits(tiny_llama):
    with pytest.raises(SwiftdistError, match="no strategy fits .* use --gradient-checkpointing"):
        _auto(tiny_llama, 0.001)


def test_every_registered_strategy_estimates_memory():
    from swiftdist.strategies.auto import PREFERENCE

    # auto may pick any of them but megatron, which needs a --tp/--pp layout chosen by the user.
    assert set(PREFERENCE) == set(names()) - {"auto", "megatron"}

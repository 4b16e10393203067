"""HF <-> megatron-core bridge in one process (TP = PP = 1): exact weight round trip, equal logits.

Sharded layouts (TP=2, PP=2, both) are covered end to end by tests/multiproc/test_megatron.py.
"""

import pytest
import torch

from swiftdist.config import parse_config
from swiftdist.distributed import init_distributed
from swiftdist.errors import SwiftdistError


@pytest.fixture
def strategy_for():
    """A MegatronStrategy (TP = PP = 1) on a one-process group; closed after (parallel state, CPU patches)."""
    made = []

    def make(model_dir, *flags):
        from swiftdist.strategies.megatron.strategy import MegatronStrategy

        cfg = parse_config(["--strategy", "megatron", "--precision", "fp32", "--model", str(model_dir), *flags])
        strategy = MegatronStrategy(cfg, init_distributed(), "fp32")
        made.append(strategy)
        strategy.wrap(strategy.build_model(model_dir))
        return strategy

    yield make
    for strategy in reversed(made):
        strategy.close()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_round_trip_is_exact_and_logits_match(name, strategy_for, request):
    model_dir = request.getfixturevalue(name)
    strategy = strategy_for(model_dir, "--train-type", "full")
    hf = _hf(model_dir)

    exported = strategy.full_state_dict(trainable_only=False)
    expected = {k: v for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key  # pure reshuffling: bit-exact

    # Two rows: one padded (a separate "sample" of padding after position 0 restarts), one packed
    # with two samples; the block-causal mask must reproduce HF's per-sample attention.
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 16))
    positions = torch.stack([torch.cat([torch.arange(12), torch.arange(4)]), torch.cat([torch.arange(7), torch.arange(9)])])
    batch = strategy._mcore_batch({"input_ids": ids, "position_ids": positions, "labels": ids})
    with torch.no_grad():
        ours = strategy.chunks[0](batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        theirs = torch.cat([hf(ids[:1, :12]).logits, hf(ids[:1, 12:]).logits], dim=1), \
            torch.cat([hf(ids[1:, :7]).logits, hf(ids[1:, 7:]).logits], dim=1)
    # fp32, same math in another order (fused QKV, mcore's attention): ~1e-6 absolute on logits of ~1
    torch.testing.assert_close(ours[0:1], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1:2], theirs[1], atol=1e-5, rtol=1e-5)


def test_lora_adapter_names_and_fused_layers(tiny_qwen2, strategy_for):
    strategy = strategy_for(tiny_qwen2, "--train-type", "lora", "--target-modules", "q_proj", "down_proj")
    adapter = strategy.full_state_dict(trainable_only=True)
    # q_proj targets the fused linear_qkv, so k_proj and v_proj are adapted too, sharing lora_A.
    prefix = "base_model.model.model.layers.0."
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
        assert f"{prefix}{module}.lora_A.default.weight" in adapter
    assert torch.equal(adapter[f"{prefix}self_attn.q_proj.lora_A.default.weight"],
                       adapter[f"{prefix}self_attn.v_proj.lora_A.default.weight"])
    assert not any("gate_proj" in k or "o_proj" in k for k in adapter)
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)  # starts as the base model
    assert strategy.lora_targets == ["down_proj", "k_proj", "q_proj", "v_proj"]


def test_refusals(tiny_llama):
    from swiftdist.strategies.megatron.strategy import MegatronStrategy

    cfg = parse_config(["--strategy", "megatron", "--train-type", "qlora"])
    assert "no 4-bit linear layers" in MegatronStrategy.refusal(cfg, "bf16")
    cfg = parse_config(["--strategy", "megatron", "--tp", "2", "--pp", "2"])
    with pytest.raises(SwiftdistError, match=r"--tp 2 x --pp 2 = 4 must divide the world size 1"):
        MegatronStrategy(cfg, init_distributed(), "fp32")


def _patchable() -> dict:
    """What cpu_compat patches, as found now (a class's own attribute where it patches a class)."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import layers, random

    linear = (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication)
    return {"Tensor.cuda": torch.Tensor.cuda, "cuda.current_device": torch.cuda.current_device,
            "cuda.synchronize": torch.cuda.synchronize, "schedules.torch": schedules.torch,
            "rng tracker": random._CUDA_RNG_STATE_TRACKER,
            **{f"{fn.__name__}.{verb}": vars(fn)[verb] for fn in linear for verb in ("forward", "backward")}}


def test_cpu_patches_last_only_as_long_as_the_megatron_run(tiny_llama, strategy_for):
    from megatron.core import parallel_state

    from swiftdist.strategies.megatron import cpu_compat

    originals = _patchable()
    with cpu_compat.patched():
        inside = _patchable()
    after_block = _patchable()
    strategy = strategy_for(tiny_llama, "--train-type", "lora")
    during_run = _patchable()
    strategy.close()
    after_run = _patchable()

    on_cpu = not torch.cuda.is_available()  # with CUDA nothing is patched at all
    assert all((inside[k] is not v) == on_cpu and (during_run[k] is not v) == on_cpu for k, v in originals.items())
    for seen in (after_block, after_run):
        assert all(seen[k] is v for k, v in originals.items()), [k for k, v in originals.items() if seen[k] is not v]
    assert "cuda" not in vars(torch.Tensor)  # the inherited TensorBase.cuda, not a copy left behind
    assert not parallel_state.model_parallel_is_initialized()

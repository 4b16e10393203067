"""Gradient checkpointing (full, selective) and --activation-offload: exact gradients, and the
recompute each mode does, counted at the dispatcher on tiny Llama."""

import dataclasses
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swiftdist.config import DataConfig, ModelConfig
from swiftdist.data import Conversation, build_samples, collate
from swiftdist.loss import output_head, token_loss_sum
from swiftdist.model import load_model, load_tokenizer


class CountOps(TorchDispatchMode):
    """How many times each aten op runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def batch(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "t:1")
             for q, a in [("hi", "hello there"), ("what is two plus two?", "four"), ("a colour?", "deep green")]]
    return collate(build_samples(tok, convs, DataConfig()), tok.pad_token_id, False)


def train_step(tiny_llama, batch, train_type: str, **checkpointing):
    """One forward and backward in fp32 (dropout on: the recompute must replay it); the gradients
    and the ops that ran."""
    cfg = ModelConfig(model="tiny-llama", train_type=train_type, attn_impl="eager", lora_dropout=0.1, **checkpointing)
    torch.manual_seed(0)  # the same LoRA initialisation for every mode
    model = load_model(cfg, tiny_llama, "fp32")
    model.train()
    torch.manual_seed(1)  # the same dropout masks
    with CountOps() as ops:
        token_loss_sum(model, output_head(model), batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ops.counts


@pytest.fixture(scope="module")
def steps(tiny_llama, batch):
    modes = {"off": {}, "full": dict(gradient_checkpointing=True),
             "selective": dict(gradient_checkpointing=True, checkpointing_mode="selective")}
    return {(t, m): train_step(tiny_llama, batch, t, **kw) for t in ("lora", "full") for m, kw in modes.items()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(steps, train_type, mode):
    reference, _ = steps[train_type, "off"]
    grads, _ = steps[train_type, mode]
    assert grads.keys() == reference.keys() and len(grads) > 4
    # The recompute runs the same kernels on the same inputs (dropout replays its RNG state), so
    # fp32 gradients are equal to the bit.
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_what_each_mode_recomputes(steps, train_type):
    off, full, selective = (steps[train_type, m][1] for m in ("off", "full", "selective"))
    # Full: each of tiny Llama's 2 decoder layers runs its forward again, its two RMSNorms (one rsqrt
    # each) and its attention's two batched matmuls (eager) included; the final norm, outside the
    # layers, does not. Selective: the first of the two layers only (every second layer).
    assert (full["rsqrt"] - off["rsqrt"], selective["rsqrt"] - off["rsqrt"]) == (2 * 2, 2)
    assert (full["bmm"] - off["bmm"], selective["bmm"] - off["bmm"]) == (2 * 2, 2)
    assert full["mm"] > selective["mm"] > off["mm"]  # (the recompute stops after the last tensor backward needs)


def test_activation_offload_on_cpu_says_it_is_a_no_op_and_keeps_gradients(tiny_llama, batch, steps, caplog):
    with caplog.at_level(logging.INFO, logger="swiftdist"):
        grads, _ = train_step(tiny_llama, batch, "lora", gradient_checkpointing=True, activation_offload=True)
    assert "--activation-offload: no CUDA device" in caplog.text
    reference, _ = steps["lora", "off"]
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name


@pytest.fixture(scope="module")
def five_layers(tiny_llama, tmp_path_factory):
    """tiny Llama with 5 random decoder layers: more than the estimator's 1-3-layer copies."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = 5
    out = tmp_path_factory.mktemp("five-layers")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def saved_by_training(model_dir, cfg: ModelConfig, in_checkpointed_layers: bool = False) -> int:
    """Bytes of the distinct storages a real fp32 forward of swiftdist's loss saves for backward (all
    of them, or only those saved while a checkpointed layer runs: what offload moves)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = load_model(cfg, model_dir, "fp32").train()
    saved, inside = {}, []
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
            layer.register_forward_pre_hook(lambda *_: inside.append(layer))
            layer.register_forward_hook(lambda *_: inside.clear())  # (returns None: keeps the output)

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            if inside or not in_checkpointed_layers:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, output_head(model), {"input_ids": ids, "labels": ids}, 0)  # the run's default
    return sum(saved.values())


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_estimate_counts_what_checkpointed_training_saves(five_layers, mode):
    """The estimator's fake-tensor count, extrapolated from 1-3 layers, against a real 5-layer
    forward: checkpointed layers keep their inputs only, the others everything."""
    from swiftdist.memory import model_stats

    cfg = ModelConfig(train_type="lora", gradient_checkpointing=True, checkpointing_mode=mode)
    plain = model_stats(str(five_layers), ModelConfig(train_type="lora"), "fp32", 64, 2)
    stats = model_stats(str(five_layers), cfg, "fp32", 64, 2)
    # The whole loss, as runs have it by default: the peak the estimator counts is everything saved.
    assert stats.activations == pytest.approx(saved_by_training(five_layers, cfg), rel=0.01)
    assert stats.activations < plain.activations
    offloaded = model_stats(str(five_layers), dataclasses.replace(cfg, activation_offload=True), "fp32", 64, 2)
    assert offloaded.offloaded == pytest.approx(saved_by_training(five_layers, cfg, in_checkpointed_layers=True),
                                                rel=0.01)
    assert offloaded.activations + offloaded.offloaded == stats.activations

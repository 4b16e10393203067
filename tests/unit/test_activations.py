"""Gradient checkpointing (full, selective) and --activation-offload: exact gradients, and the
recompute each mode does, counted at the dispatcher on tiny Llama."""

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
    # The recompute runs the same kernels on the same inputs (dropout replays its RNG state), and
    # selective checkpointing keeps outputs the forward computed: fp32 gradients equal to the bit.
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_what_each_mode_recomputes(steps, train_type):
    off, full, selective = (steps[train_type, m][1] for m in ("off", "full", "selective"))
    # Full: each decoder layer's forward runs again, its two RMSNorms (one rsqrt each) included; the
    # final norm, outside the layers, does not.
    assert full["mm"] > off["mm"] and full["rsqrt"] == off["rsqrt"] + 2 * 2  # tiny Llama: 2 layers
    # Selective: matmul outputs are kept (every second plain mm excepted), so fewer matmuls run again
    # than under full; the cheap ops (norms) run again as under full.
    assert off["mm"] < selective["mm"] < full["mm"]
    assert off["bmm"] == selective["bmm"] < full["bmm"]
    assert selective["rsqrt"] == full["rsqrt"]


def test_activation_offload_on_cpu_says_it_is_a_no_op_and_keeps_gradients(tiny_llama, batch, steps, caplog):
    with caplog.at_level(logging.INFO, logger="swiftdist"):
        grads, _ = train_step(tiny_llama, batch, "lora", gradient_checkpointing=True, activation_offload=True)
    assert "--activation-offload: no CUDA device" in caplog.text
    reference, _ = steps["lora", "off"]
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name

"""How --strategy fsdp cuts a model into fully_shard units (strategies/fsdp.py), on one in-process rank:
each decoder layer's attention and MLP are units (its norms stay in the root), an untied embedding
and LM head are units of their own, tied ones stay in the root, and the head stays gathered from
its forward to its backward under both forms of the training loss.
(Losses and grad norms against DDP on 2 ranks: tests/multiproc/test_fsdp_units.py.)"""

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from swiftdist.config import parse_config
from swiftdist.loss import output_head, token_loss_sum
from swiftdist.strategies import get_strategy_class
from swiftdist.strategies.fsdp import decoder_layers


def wrapped(path, train_type: str):
    from swiftdist.distributed import init_distributed

    cfg = parse_config(["--strategy", "fsdp", "--train-type", train_type, "--model", str(path)])
    strategy = get_strategy_class("fsdp")(cfg, init_distributed(), "fp32")
    model = strategy.build_model(path)
    strategy.wrap(model)
    return model


def gathered(module: torch.nn.Module) -> bool:
    """FSDP2 swaps a unit's sharded DTensor parameters for plain unsharded tensors while it is gathered."""
    return not any(isinstance(p, DTensor) for p in module.parameters())


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_each_layers_attention_and_mlp_are_units_and_its_norms_stay_in_the_root(tiny_qwen2, process_group, train_type):
    model = wrapped(tiny_qwen2, train_type)
    layers = decoder_layers(model)
    assert layers and all(isinstance(layer.self_attn, FSDPModule) and isinstance(layer.mlp, FSDPModule)
                          and not isinstance(layer, FSDPModule) for layer in layers)
    in_units = {id(p) for m in model.modules() if isinstance(m, FSDPModule) and m is not model for p in m.parameters()}
    norms = [p for layer in layers for name in ("input_layernorm", "post_attention_layernorm")
             for p in getattr(layer, name).parameters()]
    assert norms and not any(id(p) in in_units for p in norms)
    assert isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in norms)  # sharded by the root


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_an_untied_embedding_and_head_are_units_of_their_own(tiny_qwen2, process_group, train_type):
    model = wrapped(tiny_qwen2, train_type)
    embedding, head = model.get_input_embeddings(), output_head(model)
    assert isinstance(embedding, FSDPModule) and isinstance(head, FSDPModule)
    assert not gathered(embedding) and not gathered(head)


def test_tied_embeddings_stay_in_the_root_and_stay_tied(tiny_llama, process_group):
    model = wrapped(tiny_llama, "full")
    embedding, head = model.get_input_embeddings(), output_head(model)
    assert not isinstance(embedding, FSDPModule) and not isinstance(head, FSDPModule)
    assert head.weight is embedding.weight and isinstance(head.weight, DTensor)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_the_head_is_gathered_once_from_its_forward_to_its_backward(tiny_qwen2, process_group, chunk_size):
    model = wrapped(tiny_qwen2, "full")
    embedding, head = model.get_input_embeddings(), output_head(model)
    layer = model.model.layers[-1]
    ids = torch.randint(0, 1000, (2, 12))
    loss = token_loss_sum(model, head, {"input_ids": ids, "labels": ids}, chunk_size)
    # Between forward and backward: the head still gathered (its backward needs no second
    # all-gather), the embedding and the layers sharded again.
    assert gathered(head) and not gathered(embedding) and not gathered(layer)
    loss.backward()
    assert not gathered(head) and isinstance(head.weight.grad, DTensor)
    assert all(p.grad is not None for p in (head.weight, embedding.weight))

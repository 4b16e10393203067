"""Load a model under FSDP2 with each rank reading only the part of the weights it keeps.

The model is built with its parameters on the meta device (`empty_model`: nothing allocated, no
weight read), given its LoRA adapters, and sharded by `fully_shard`. Then `InitialValues.load_into`
allocates this rank's shards and fills them: base weights from the rows of each tensor this rank
keeps, read from the model's safetensors files (`get_slice` reads those bytes only), LoRA weights
from a replay of peft's random initialisation. A rank holds its shards plus one slice in flight,
instead of the whole model that `from_pretrained` puts in every rank's host memory.

`plan_initial_values` checks up front that every tensor has a source (a tensor of the same name and
shape in the files, or an adapter init it can replay) and raises `CannotSlice` when one has not:
transformers' own key renames and fused weights, pytorch_model.bin checkpoints, adapters other
than plain LoRA on nn.Linear (DoRA). The caller then loads the whole model as before
(`load_empty` does both and says why).

ZeRO-3 (strategies/deepspeed.py) uses the same plan: it partitions the empty model itself, then
`InitialValues.fill` writes each parameter's partition (a flat range of the flattened tensor, see
`_zero_partition`) from the rows of the file's tensor that cover it.

torch's `HuggingFaceStorageReader` (DCP) reads slices the same way, but it takes every
*.safetensors in the directory as part of the checkpoint (some repositories ship a consolidated
copy beside the shards), where the index's weight_map names the one file that holds each tensor.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

log = logging.getLogger("swiftdist")


class CannotSlice(Exception):
    """This model cannot be loaded shard by shard; the message says why."""


def empty_model(path: Path, **kwargs) -> torch.nn.Module:
    """The model `AutoModelForCausalLM.from_pretrained(path, **kwargs)` would build, with its
    parameters on the meta device and no weight read. Buffers stay real: the ones a model computes
    instead of loading (rotary frequency tables) are computed here, as from_pretrained does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # accelerate re-wraps every parameter it moves to meta, which unties tied embeddings: tie them again.
    model.tie_weights()
    return model.eval()  # the mode from_pretrained returns


def load_empty(cfg, path: Path, precision: str, attn_impl: str | None, strategy: str):
    """(model, InitialValues): the model of `cfg` (a ModelConfig) built empty, with its LoRA adapters,
    and where each of its tensors gets its first value; or None when its files cannot be read a slice
    at a time, logged with the reason, and the CPU generator back where it was, so that the caller's
    whole load draws LoRA's initial weights from the same state. QLoRA is always None: bitsandbytes
    quantizes whole tensors inside from_pretrained."""
    from swiftdist.model import load_model

    if cfg.train_type == "qlora":
        return None
    rng = torch.get_rng_state()  # LoRA's initial weights are replayed from here
    model = load_model(cfg, path, precision, empty=True, attn_impl=attn_impl)
    try:
        return model, plan_initial_values(model, path, rng)
    except CannotSlice as why:
        log.warning("--strategy %s: %s; every rank loads the whole model instead", strategy, why)
        torch.set_rng_state(rng)
        return None


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a peft wrapper (names relative to it are the files' names, give or take `.base_layer`)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def replay_lora_init(model: torch.nn.Module, rng_state: torch.Tensor) -> dict[str, torch.Tensor]:
    """The initial LoRA weights peft drew when it wrapped `model`, drawn again from `rng_state` (the CPU
    generator's state just before get_peft_model) and keyed by name relative to the HF model.

    On a meta base peft draws the same numbers as on a loaded one, then moves them to meta, where they
    are lost. Its `update_layer` draws, layer after layer in module order: `nn.Linear(in, r)` and
    `nn.Linear(r, out)` (default init, then overwritten), then `reset_lora_parameters`. This replays
    those draws in that order and keeps the values, cast through the base weights' dtype as peft's move
    to the base layer's dtype does. tests/unit/test_sharded_load.py checks equality with peft's eager
    build; the generator is left as peft left it.
    """
    from peft.tuners.lora import Linear, LoraLayer

    after = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    values = {}
    try:
        for name, layer in hf_model(model).named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if type(layer) is not Linear or layer.lora_variant or layer.lora_embedding_A:
                raise CannotSlice(f"{name}: only plain LoRA on nn.Linear layers is replayed, not {type(layer).__name__}")
            for adapter in layer.lora_A:
                values.update(_replayed_layer(layer, name, adapter, model.peft_config[adapter].init_lora_weights))
    finally:
        torch.set_rng_state(after)
    return values


def _replayed_layer(layer, name: str, adapter: str, init) -> dict[str, torch.Tensor]:
    a = torch.nn.Linear(layer.in_features, layer.r[adapter], bias=False, device="cpu")
    b = torch.nn.Linear(layer.r[adapter], layer.out_features, bias=layer.lora_bias[adapter], device="cpu")
    # peft's own reset_lora_parameters, on real stand-ins for its meta modules, so its formulas apply.
    meta_a, meta_b = layer.lora_A[adapter], layer.lora_B[adapter]
    layer.lora_A[adapter], layer.lora_B[adapter] = a, b
    try:
        layer.reset_lora_parameters(adapter, init)
    finally:
        layer.lora_A[adapter], layer.lora_B[adapter] = meta_a, meta_b
    base_dtype = layer.get_base_layer().weight.dtype
    return {f"{name}.lora_{ab}.{adapter}.{key}": t.detach().to(base_dtype)
            for ab, module in (("A", a), ("B", b)) for key, t in module.state_dict().items()}


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CannotSlice(f"{path} has no model.safetensors(.index.json)")


def _file_shapes(files: set[Path]) -> dict[str, list[int]]:
    shapes = {}
    for file in files:  # headers only
        with safe_open(file, framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


@dataclass
class InitialValues:
    """Where each tensor of an empty model gets its first value, by name relative to the HF model."""

    in_files: dict[str, tuple[Path, str]]
    """name -> (safetensors file, the tensor's name in it)"""
    replayed: dict[str, torch.Tensor]
    """name -> the whole initial tensor (LoRA weights)"""

    def load_into(self, model: torch.nn.Module, device: torch.device) -> None:
        """Allocate `model`'s parameters (each rank's shards, once fully_shard has run) on `device`
        and fill them. Buffers keep the values and devices they had."""
        hf = hf_model(model)
        buffers = [(module, name, b) for module in hf.modules() for name, b in module.named_buffers(recurse=False)]
        model.to_empty(device=device)
        for module, name, b in buffers:  # to_empty replaced them with uninitialised memory
            setattr(module, name, b)
        self.fill(model)

    def take_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, read from its file, which no longer fills it (a tensor
        that left the model's parameters: swiftdist.vocab_parallel.shard_head)."""
        file, key = self.in_files.pop(name)
        with safe_open(file, framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def fill(self, model: torch.nn.Module) -> None:
        """Write every tensor's initial value into the part of it this rank holds (allocated already:
        a DTensor's local shard, a ZeRO-3 partition, or the whole tensor)."""
        hf = hf_model(model)
        targets = {**dict(hf.named_parameters()), **dict(hf.named_buffers())}
        with torch.no_grad():
            for name, value in self.replayed.items():
                local, read = _local_part(targets[name])
                local.copy_(read(value))
            by_file: dict[Path, list[str]] = {}
            for name, (file, _) in self.in_files.items():
                by_file.setdefault(file, []).append(name)
            for file, names in by_file.items():  # one file open at a time: its mapped pages leave with it
                with safe_open(file, framework="pt") as f:
                    for name in names:
                        local, read = _local_part(targets[name])
                        local.copy_(read(f.get_slice(self.in_files[name][1])))


Reader = Callable[[torch.Tensor], torch.Tensor]
"""Reads a rank's part from the whole tensor: a tensor, or a safetensors slice (which reads only the
rows it is indexed with)."""


def _local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, Reader]:
    """The tensor this rank holds of `tensor` (a DTensor's local shard, a ZeRO-3 partition, or the
    whole) and how to read its values from the whole tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if hasattr(tensor, "ds_tensor"):
        return _zero_partition(tensor)
    if not isinstance(tensor, DTensor):
        return tensor, lambda whole: whole[...]
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    rows = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return tensor.to_local(), lambda whole: whole[rows]


def _zero_partition(param: torch.nn.Parameter) -> tuple[torch.Tensor, Reader]:
    """A ZeRO-3 parameter's partition (`ds_tensor`): rank r of N holds elements [r*P, (r+1)*P) of the
    flattened tensor, P = ceil(numel / N); the last ranks' ends are padding past numel, left as they
    are (DeepSpeed leaves them uninitialised too). Read from the whole rows that cover the range."""
    size = param.ds_tensor.numel()
    start = min(size * param.ds_zero_partition_rank, param.ds_numel)
    stop = min(start + size, param.ds_numel)
    row = math.prod(param.ds_shape[1:])  # elements per row (1 for a vector)

    def read(whole):
        if not param.ds_shape:  # a 0-d tensor has no rows
            return whole[...].reshape(1)[start:stop]
        first = start // row
        return whole[first:-(-stop // row)].reshape(-1)[start - first * row:stop - first * row]

    return param.ds_tensor.view(-1)[:stop - start], read


def plan_initial_values(model: torch.nn.Module, path: Path, rng_state: torch.Tensor) -> InitialValues:
    """A source for every parameter and persistent buffer of the empty `model` (built from the HF dir
    `path`, then LoRA-wrapped with the CPU generator at `rng_state`), or CannotSlice."""
    hf = hf_model(model)
    if getattr(hf, "_keep_in_fp32_modules_strict", None) and hf.dtype != torch.float32:
        raise CannotSlice(f"{type(hf).__name__} keeps some modules in fp32, which only from_pretrained applies")
    replayed = replay_lora_init(model, rng_state) if hasattr(model, "peft_config") else {}
    aliases: dict[int, list[str]] = {}  # one parameter, every name it has (tied embeddings have two)
    for name, p in hf.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    tensors = dict(hf.named_parameters())
    persistent = hf.state_dict(keep_vars=True).keys() - {n for names in aliases.values() for n in names}
    tensors.update({n: b for n, b in hf.named_buffers() if n in persistent})
    weight_map = _weight_map(path)
    shapes = _file_shapes(set(weight_map.values()))
    in_files = {}
    for name, tensor in tensors.items():
        if name in replayed:
            continue
        # peft keeps the wrapped layer's own weights under `.base_layer`; the files name them without.
        candidates = [n.replace(".base_layer.", ".") for n in aliases.get(id(tensor), [name])]
        found = next((n for n in candidates if n in weight_map), None)
        if found is None:
            raise CannotSlice(f"no tensor {candidates[0]} in {path}'s safetensors files")
        if list(shapes[found]) != list(tensor.shape):
            raise CannotSlice(f"{found} is {list(shapes[found])} in the files, {list(tensor.shape)} in the model")
        in_files[name] = (weight_map[found], found)
    return InitialValues(in_files, replayed)

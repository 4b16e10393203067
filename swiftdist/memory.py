"""The memory model: bytes per device that a strategy needs for a training setup, before launching
anything (`swiftdist estimate` prints it, `--strategy auto` chooses by it).

Works from a model config alone (a model dir, a config.json, or an alias): no weights are read and
no memory is allocated. Parameter counts and activation sizes are *measured* on the real HF
architecture (with the LoRA adapters applied) under FakeTensorMode, which runs the forward pass
with shapes and dtypes but no data, through the training loss (swiftdist.loss, chunked as
configured); the peak of the tensors autograd holds for backward is counted. Only copies with 1, 2
(and, for selective checkpointing, 3) layers are run, and the layer count is extrapolated (decoder
layers are identical), so a 70B config takes seconds. Every token counts as labelled, so the LM
head's share is an upper bound: training computes logits only at labelled positions.

What each strategy keeps per device, from these counts, is each strategy's `memory_estimate`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftdist.config import ModelConfig
from swiftdist.errors import SwiftdistError

GIB = 2**30
# NF4 with double quantisation: 4 bits per weight, one 8-bit absmax per 64 weights, and one fp32
# scale per 256 absmax blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class ModelStats:
    """What the strategies' memory formulas need to know about one training setup."""

    n_params: int
    """All parameters, adapters included."""
    n_trainable: int
    n_quantized: int
    """Weights stored in 4 bits (QLoRA: every linear layer but the output head)."""
    n_layers: int
    layer_params: int
    """Parameters of one decoder layer: what ZeRO-3 gathers at a time."""
    layer_trainable: int
    unit_params: int
    """Parameters of the largest FSDP unit (a decoder layer's attention or MLP): what FSDP gathers at a time."""
    unit_trainable: int
    hidden_size: int
    weight_bytes: int
    """Bytes per frozen (non-quantized) weight as loaded: 2 for bf16, 4 for fp32."""
    trainable_bytes: int
    """Bytes per trainable weight as loaded (LoRA adapters and fully trained weights stay fp32 by default)."""
    compute_bytes: int
    """2 when computing in bf16, else 4: the dtype FSDP gathers layers in."""
    activations: int
    """Peak bytes autograd holds for backward in one micro-batch, on the device."""
    offloaded: int = 0
    """Bytes that --activation-offload keeps in host memory instead (what checkpointing saves)."""

    @property
    def frozen_bytes(self) -> float:
        plain = self.n_params - self.n_trainable - self.n_quantized
        return plain * self.weight_bytes + self.n_quantized * NF4_BYTES

    @property
    def loaded_bytes(self) -> float:
        """The whole model as the trainer loads it."""
        return self.frozen_bytes + self.n_trainable * self.trainable_bytes


def _hf_config(model: str):
    """The HF config of a model dir, an alias, or a bare config.json file."""
    import json

    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise SwiftdistError(f"--model {path}: not a usable HF model config ({type(e).__name__}: {e})") from None
    from swiftdist.model import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))


def _with_layers(hf_config, n: int):
    cfg = copy.deepcopy(hf_config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n]
    return cfg


def _measure(hf_config, model_cfg: ModelConfig, dtype: torch.dtype, seq_len: int, micro_batch: int,
             loss_chunk_size: int) -> dict:
    """Parameter counts and activation bytes of `hf_config` under FakeTensorMode: the peak of what
    autograd holds for backward (a loss chunk's logits are freed before the next), and of that what
    the checkpointed layers save (what --activation-offload moves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from swiftdist.activations import enable_checkpointing
    from swiftdist.loss import labelled_loss_sum, labelled_positions, output_head
    from swiftdist.model import lora_target_modules

    held: dict[int, list[int]] = {}  # storage -> [bytes, saved tensors holding it]
    totals = {"now": 0, "peak": 0, "offloadable": 0, "in_checkpoint": 0}

    def release(key):
        held[key][1] -= 1
        if not held[key][1]:
            totals["now"] -= held.pop(key)[0]

    def pack(t):
        # Parameters (and views of them) are counted as parameters, not activations.
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            storage = t.untyped_storage()
            entry = held.setdefault(storage._cdata, [storage.nbytes(), 0])
            if not entry[1]:
                totals["now"] += entry[0]
                totals["peak"] = max(totals["peak"], totals["now"])
                totals["offloadable"] += entry[0] if totals["in_checkpoint"] else 0
            entry[1] += 1
            weakref.finalize(t, release, storage._cdata)
        return t

    def entering(*_):
        totals["in_checkpoint"] += 1

    def leaving(*_):
        totals["in_checkpoint"] -= 1

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        output = model.get_output_embeddings()
        n_quantized = 0
        if model_cfg.train_type == "qlora":  # bitsandbytes quantizes every linear layer but the head
            n_quantized = sum(m.weight.numel() for m in model.modules()
                              if isinstance(m, torch.nn.Linear) and m is not output)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(model, dataclasses.replace(model_cfg, activation_offload=False))
            for layer in model.modules():  # what these layers save is what offload moves
                if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                    layer.register_forward_pre_hook(entering)
                    layer.register_forward_hook(leaving)
        if model_cfg.train_type != "full":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                target_modules=lora_target_modules(model, list(model_cfg.target_modules)), task_type="CAUSAL_LM"))
        model.train()
    counts = {  # before to_empty(), which would untie tied embeddings
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "quantized": n_quantized,
        **_largest_fsdp_unit(model),
    }
    # Fake CPU tensors rather than bare meta ones: transformers skips its data-dependent mask checks
    # for them, and attention dispatches to the fused kernel (no seq x seq matrix), as on a GPU.
    # The trainer's forward runs under bf16 autocast, which decides what dtype saved tensors have.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
    positions = labelled_positions({"labels": ids})  # real tensors: which positions count depends on values
    with FakeTensorMode(allow_non_fake_inputs=True), autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.to_empty(device="cpu")
        loss = labelled_loss_sum(model, output_head(model), {"input_ids": ids}, *positions, loss_chunk_size)
    del loss
    return {**counts, "activations": totals["peak"], "offloadable": totals["offloadable"]}


def _largest_fsdp_unit(model: torch.nn.Module) -> dict[str, int]:
    from swiftdist.model import count_params
    from swiftdist.strategies.fsdp import decoder_layers, layer_units

    try:
        units = [unit for layer in decoder_layers(model) for unit in layer_units(layer)]
    except SwiftdistError:  # no decoder layer class named: FSDP refuses such a model
        return {"unit_params": 0, "unit_trainable": 0}
    trainable, params = max((count_params(unit) for unit in units), key=lambda counts: (counts[1], counts[0]))
    return {"unit_params": params, "unit_trainable": trainable}


def model_stats(model: str, model_cfg: ModelConfig, precision: str, seq_len: int, micro_batch: int,
                loss_chunk_size: int = 0) -> ModelStats:
    """Counts for the whole model from copies with 1 to k + 1 layers, where every k-th layer is
    checkpointed (k = 1 without checkpointing): each kind of layer is measured once."""
    from swiftdist.activations import EVERY_N_LAYERS
    from swiftdist.model import weight_dtype

    hf_config = _hf_config(model)
    n_layers = hf_config.num_hidden_layers
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    k = EVERY_N_LAYERS[model_cfg.checkpointing_mode] if model_cfg.gradient_checkpointing else 1
    runs = [_measure(_with_layers(hf_config, n), model_cfg, compute, seq_len, micro_batch, loss_chunk_size)
            for n in range(1, k + 2)]
    # Layer j (0-based) is the one added going from j to j + 1 layers; layers j and j + k are alike.
    whole = {key: runs[0][key] + sum(runs[(j - 1) % k + 1][key] - runs[(j - 1) % k][key] for j in range(1, n_layers))
             for key in ("params", "trainable", "quantized", "activations", "offloadable")}
    one, two = runs[0], runs[1]
    weight = weight_dtype(model_cfg, precision).itemsize
    offloaded = whole["offloadable"] if model_cfg.activation_offload else 0
    return ModelStats(
        n_params=whole["params"], n_trainable=whole["trainable"], n_quantized=whole["quantized"],
        n_layers=n_layers, layer_params=two["params"] - one["params"],
        layer_trainable=two["trainable"] - one["trainable"], unit_params=one["unit_params"],
        unit_trainable=one["unit_trainable"], hidden_size=hf_config.hidden_size,
        weight_bytes=weight, trainable_bytes=4 if model_cfg.train_type != "full" else weight,
        compute_bytes=compute.itemsize, activations=whole["activations"] - offloaded, offloaded=offloaded,
    )


def estimate(stats: ModelStats, strategy: str, world_size: int) -> dict[str, float]:
    """Bytes per device: params, buffers, grads, optimizer, activations, total, host (offloaded)."""
    from swiftdist.strategies import get_strategy_class

    parts = dict(get_strategy_class(strategy).memory_estimate(stats, world_size))
    parts["activations"] = stats.activations
    parts["host"] += stats.offloaded
    parts["total"] = sum(parts[k] for k in ("params", "buffers", "grads", "optimizer", "activations"))
    return parts


def device_memory_bytes(device: torch.device) -> int:
    """Memory of one device; on a CPU host, the host's memory shared by the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

"""HF Llama / Qwen2 <-> megatron-core GPTModel: config, weight layout, tensor-parallel shards.

Every parameter of a (TP, PP)-sharded mcore model is a set of *pieces* of HF tensors: the fused
`linear_qkv` rows of this rank's query groups are slices of `q_proj`, `k_proj` and `v_proj`;
`linear_fc1` is `[gate_proj; up_proj]`; row-parallel layers hold columns of theirs; norms are
whole. A piece says which HF tensor it belongs to and along which HF axis the TP ranks hold
consecutive chunks of it (None: every TP rank holds all of it). The same description serves
four jobs: loading HF safetensors (each rank reads only its slices), gathering HF tensors for
export, LoRA adapters (lora_B of a column-parallel layer splits like its weight rows, lora_A is
shared) and the distributed checkpoint, whose keys are HF names so it reshards to any TP x PP.

Why not mbridge: on CPU it needs eight overrides (layer spec, norm names, rope_theta, causal mask,
CUDA no-ops, fusions), its export broadcasts every tensor across pipeline stages, it cannot name
peft-wrapped (LoRA) parameters, and tied Llama embeddings at PP > 1 look for a missing lm_head.
The mapping for two dense families is the ~150 lines below.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftdist.errors import SwiftdistError

SUPPORTED = ("llama", "qwen2")
LORA_PREFIX = "base_model.model."  # peft names adapter tensors base_model.model.<HF module>.lora_A.default.weight


# ---- config and model ---------------------------------------------------------------------------


def check_layout(hf_cfg, tp: int, pp: int, vpp: int | None) -> None:
    """Refuse what this bridge or the layout cannot do, naming the flag and the numbers."""
    if hf_cfg.model_type not in SUPPORTED:
        raise SwiftdistError(f"--strategy megatron supports {', '.join(SUPPORTED)} models, not "
                             f"{hf_cfg.model_type}; use --strategy fsdp or ddp for this model")
    rope_type = _rope_parameters(hf_cfg).get("rope_type", "default")
    if rope_type != "default":
        raise SwiftdistError(f"--strategy megatron: rope scaling '{rope_type}' is not supported by the "
                             "megatron bridge; use --strategy fsdp for this model")
    chunks = pp * (vpp or 1)
    divisible = {
        "attention heads": (hf_cfg.num_attention_heads, tp),
        "key/value heads": (hf_cfg.num_key_value_heads, tp),
        "intermediate size": (hf_cfg.intermediate_size, tp),
        "vocab size": (hf_cfg.vocab_size, tp),
        "layers": (hf_cfg.num_hidden_layers, chunks),
    }
    bad = [f"{what} {n} by {k}" for what, (n, k) in divisible.items() if n % k]
    if bad:
        raise SwiftdistError(f"--tp {tp} --pp {pp}" + (f" --vpp {vpp}" if vpp else "")
                             + f": cannot split {'; '.join(bad)}")


def _rope_parameters(hf_cfg) -> dict:
    # transformers 5 keeps rope_theta and the scaling type in rope_parameters (4.x: rope_scaling)
    return getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}


def rope_theta(hf_cfg) -> float:
    return float(_rope_parameters(hf_cfg).get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))


def transformer_config(hf_cfg, tp: int, pp: int, vpp: int | None, sequence_parallel: bool):
    from megatron.core.transformer import TransformerConfig

    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return TransformerConfig(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads,
        num_query_groups=hf_cfg.num_key_value_heads,
        kv_channels=head_dim,
        ffn_hidden_size=hf_cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_cfg.model_type == "qwen2" or bool(getattr(hf_cfg, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_cfg, "attention_dropout", 0.0)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        params_dtype=torch.float32,  # master weights; bf16 runs under autocast like the other strategies
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is overwritten from the HF checkpoint
        variable_seq_lengths=True,  # micro-batches are padded to their own longest sample
        moe_token_dispatcher_type="alltoall",  # unused (dense model); the default refuses variable lengths
        calculate_per_token_loss=True,  # our loss function already divides by the global token count
        # Fused kernels need CUDA extensions; HF computes the same unfused.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )


def build_model(hf_cfg, config, vp_stage: int | None = None):
    """This rank's GPTModel chunk (embedding on the first stage, norm + head on the last)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # The local (non-transformer-engine) spec: its ColumnParallel/RowParallelLinear layers are the
    # ones peft can put LoRA on, and it runs on CPU.
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hf_cfg.vocab_size,
        max_sequence_length=hf_cfg.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_cfg),
        vp_stage=vp_stage,
    )
    pad = getattr(hf_cfg, "pad_token_id", None)
    if model.pre_process and pad is not None:
        model.embedding.word_embeddings.register_forward_hook(_no_grad_for_token(pad))
    return model


def _no_grad_for_token(token_id: int):
    """HF Llama/Qwen2 embed with nn.Embedding(padding_idx=pad_token_id): looking the pad token up
    never trains its row (even where it doubles as eos). Same here: its lookups are detached."""

    def hook(module, args, output):
        is_pad = (args[0] == token_id).unsqueeze(-1)
        return torch.where(is_pad, output.detach(), output)

    return hook


# ---- names and layout ---------------------------------------------------------------------------

# mcore module (inside decoder.layers.N.) -> (HF modules, how the mcore tensor splits into them,
# parallel style: "column" shards output rows, "row" shards input columns, None is replicated).
_LAYER = {
    "self_attention.linear_qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv", "column"),
    "self_attention.linear_proj": (("self_attn.o_proj",), "one", "row"),
    "mlp.linear_fc1": (("mlp.gate_proj", "mlp.up_proj"), "halves", "column"),
    "mlp.linear_fc2": (("mlp.down_proj",), "one", "row"),
    "input_layernorm": (("input_layernorm",), "one", None),
    "pre_mlp_layernorm": (("post_attention_layernorm",), "one", None),
}
_TOP = {
    "embedding.word_embeddings": (("model.embed_tokens",), "one", "column"),
    "decoder.final_layernorm": (("model.norm",), "one", None),
    "output_layer": (("lm_head",), "one", "column"),
}
_NAME = re.compile(r"^(?P<module>.+?)(?P<base>\.base_layer)?(?:\.(?P<lora>lora_[AB]))?\.(?P<leaf>weight|bias)$")


@dataclass
class Piece:
    name: str  # HF tensor name (peft adapter naming for LoRA factors)
    tensor: torch.Tensor  # this rank's part of it: a view or copy of the mcore tensor
    axis: int | None  # HF axis along which TP ranks hold consecutive chunks; None: whole on every TP rank
    replica: bool = False  # the tied head's copy of the embedding: the first stage's piece counts


@dataclass
class Entry:
    param: torch.nn.Parameter
    split: str  # how the mcore tensor splits into its pieces: one, halves, qkv or shared
    pieces: list[Piece]
    lora: bool


class Layout:
    """Maps the parameters of one (TP, PP)-sharded model chunk to HF pieces and back."""

    def __init__(self, hf_cfg):
        self.tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        self.q_rows = head_dim * hf_cfg.num_attention_heads // hf_cfg.num_key_value_heads  # per query group
        self.kv_rows = head_dim

    def entries(self, model) -> list[Entry]:
        # Local layer i of this chunk is global layer layer_number - 1 (mcore counts from 1).
        layers = {str(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        out = []
        for name, param in model.named_parameters():
            m = _NAME.match(name)
            module, lora, leaf = m.group("module"), m.group("lora"), m.group("leaf")
            layer = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", module)
            if layer:
                hf_modules, split, style = _LAYER[layer.group(2)]
                hf_modules = tuple(f"model.layers.{layers[layer.group(1)]}.{h}" for h in hf_modules)
            else:
                hf_modules, split, style = _TOP[module]
            # With tied embeddings the last pipeline stage holds a copy of the embedding as its head.
            tied_copy = module == "output_layer" and self.tied
            if tied_copy:
                hf_modules = ("model.embed_tokens",)
            if lora is None:
                names = [f"{h}.{leaf}" for h in hf_modules]
                axis = {"column": 0, "row": 1 if leaf == "weight" else None, None: None}[style]
            else:
                names = [f"{LORA_PREFIX}{h}.{lora}.default.weight" for h in hf_modules]
                # lora_A of a row-parallel layer is split like its input columns, lora_B of a
                # column-parallel layer like its output rows; the other factor is whole everywhere.
                axis = {("lora_A", "row"): 1, ("lora_B", "column"): 0}.get((lora, style))
                if lora == "lora_A" and len(hf_modules) > 1:
                    split = "shared"  # one A feeds the fused q/k/v (gate/up) outputs
            parts = self.split(param.detach(), split, len(hf_modules))
            pieces = [Piece(n, t, axis, replica=tied_copy) for n, t in zip(names, parts)]
            out.append(Entry(param, split, pieces, lora is not None))
        return out

    def split(self, tensor: torch.Tensor, split: str, n: int) -> list[torch.Tensor]:
        if split == "one":
            return [tensor]
        if split == "shared":
            return [tensor] * n
        if split == "halves":
            return list(tensor.chunk(2))
        # Fused QKV rows are grouped by query group: [q rows of group 0, k, v, q rows of group 1, ...].
        grouped = tensor.view(-1, self.q_rows + 2 * self.kv_rows, *tensor.shape[1:])
        q, k, v = grouped.split([self.q_rows, self.kv_rows, self.kv_rows], dim=1)
        return [t.reshape(-1, *tensor.shape[1:]) for t in (q, k, v)]

    def join(self, parts: list[torch.Tensor], split: str) -> torch.Tensor:
        """Inverse of split()."""
        if split in ("one", "shared"):
            return parts[0]
        if split == "halves":
            return torch.cat(parts)
        rest = parts[0].shape[1:]
        q, k, v = (p.reshape(-1, rows, *rest) for p, rows in zip(parts, (self.q_rows, self.kv_rows, self.kv_rows)))
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def assign(self, entries: list[Entry], tensors: dict[str, torch.Tensor], target=lambda e: e.param) -> None:
        """Copy HF-named local pieces into `target(entry)` (the parameter, or e.g. its Adam moment)."""
        with torch.no_grad():
            for e in entries:
                if e.pieces[0].name in tensors:
                    dest = target(e)
                    dest.copy_(self.join([tensors[p.name] for p in e.pieces], e.split).to(dest.dtype))


def tp_slice(full_shape, axis: int | None, tp_rank: int, tp_size: int) -> tuple:
    """Index of TP rank's chunk of a full HF tensor."""
    if axis is None:
        return (slice(None),)
    step = full_shape[axis] // tp_size
    return tuple(slice(tp_rank * step, (tp_rank + 1) * step) if d == axis else slice(None) for d in range(axis + 1))


def load_hf_weights(models: list, layout: Layout, path: Path, tp_rank: int, tp_size: int) -> None:
    """Each rank reads only its own slices of the HF safetensors: no scatter, no full copy."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    handles = [safe_open(str(path / f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    for model in models:
        entries = [e for e in layout.entries(model) if not e.lora]  # fresh adapters keep peft's init
        tensors = {}
        for p in (p for e in entries for p in e.pieces):
            if p.name not in where:
                raise SwiftdistError(f"{path}: tensor {p.name} is missing from the safetensors files")
            sl = where[p.name].get_slice(p.name)
            tensors[p.name] = sl[tp_slice(sl.get_shape(), p.axis, tp_rank, tp_size)]
        layout.assign(entries, tensors)

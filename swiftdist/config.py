"""Run configuration: typed dataclasses merged by OmegaConf from defaults, a YAML preset and the CLI.

Every field is settable three ways, later ones winning:
    --config configs/lora.yaml        a YAML preset (nested sections, or flat keys)
    --lora-rank 16  /  --lora-rank=16 a flag named after the field (unique across sections)
    model.lora_rank=16                an OmegaConf dotlist entry
Unknown keys and wrong types become one-line `SwiftdistError`s naming the key and the closest
valid name.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swiftdist.errors import SwiftdistError


@dataclass
class ModelConfig:
    model: str = "smollm2"
    """Local HF model directory, or an alias: `smollm2` (embedded default), `tiny-llama`, `tiny-qwen2`."""
    torch_dtype: str = "auto"
    """Weight dtype: auto (bf16 where the device supports it, else fp32), bfloat16, float32."""
    attn_impl: str = "auto"
    """auto (flash_attention_2 with CUDA + flash-attn, else sdpa; on CPU eager when every row has
    <= 256 tokens, where it is faster), sdpa, eager, flash_attention_2."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model's source."""
    train_type: str = "lora"
    """full, lora or qlora (4-bit NF4 base weights + LoRA)."""
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt, or `all-linear` (every linear layer but the LM head)."""
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=lambda: ["self-cognition"])
    """Files (jsonl/json/csv/parquet) or built-ins (`self-cognition`, `general-qa`); `path#N` samples N rows."""
    format: str = "auto"
    """auto, messages, sharegpt or alpaca."""
    system: Optional[str] = None
    """System prompt added to every conversation that has none."""
    max_length: int = 1024
    truncation: str = "truncate"
    """What to do with a sample longer than max_length: truncate or drop."""
    packing: bool = False
    """Concatenate samples into rows of max_length (attention stays within each sample)."""
    val_split: float = 0.0
    """Fraction of samples held out for evaluation."""
    model_name: str = "swiftdist-bot"
    """Fills {name} in the self-cognition data."""
    model_author: str = "the swiftdist team"
    """Fills {author} in the self-cognition data."""


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Micro-batch per device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = batch_size * grad_accum * data-parallel size."""
    epochs: int = 1
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    lr: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    scheduler: str = "cosine"
    """cosine, linear or constant (after warmup)."""
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    """auto (bf16 where the device runs it fast), bf16 or fp32."""
    seed: int = 42
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end, when there is a validation split)."""


@dataclass
class ParallelConfig:
    strategy: str = "ddp"
    """ddp, fsdp, fsdp-offload, zero2, zero2-offload, zero3, zero3-offload, megatron, auto."""
    tp: int = 1
    """Tensor-parallel size (megatron)."""
    pp: int = 1
    """Pipeline-parallel size (megatron)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON to use instead of the generated one (zero* strategies)."""
    gpu_memory: float = 0.0
    """GiB per device that --strategy auto may plan for (0: the device's own size)."""


@dataclass
class CheckpointConfig:
    output_dir: str = "output"
    save_steps: int = 0
    """Save every N steps (0: only at the end)."""
    save_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off). A job killed without
    warning (node failure, OOM, kill -9) then loses at most this much work."""
    save_total_limit: int = 2
    """Keep this many step checkpoints (the newest ones)."""
    resume: Optional[str] = None
    """auto (newest complete checkpoint in output_dir, or start fresh) or a checkpoint path."""
    ignore_data_changes: bool = False
    """Resume although the model or data differ from the checkpoint's: weights and optimizer are
    kept, the data position restarts at the beginning."""
    save_full_model: bool = False
    """Also gather the full model on rank 0 at each save (needs host memory for the whole model)."""


@dataclass
class LogConfig:
    log_steps: int = 1
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Any of: jsonl, wandb. The terminal always gets rank-0 logs."""
    wandb_project: str = "swiftdist"
    wandb_mode: str = "offline"
    """offline (default: no network needed), online or disabled."""
    log_samples: bool = False
    """Append each step's sample ids to samples-rank{R}.jsonl (to audit data order and resume)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "model.torch_dtype": ("auto", "bfloat16", "float32"),
    "model.attn_impl": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.train_type": ("full", "lora", "qlora"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca"),
    "data.truncation": ("truncate", "drop"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}
ALIASES = {"dataset": "data.dataset", "datasets": "data.dataset"}


def _field_paths() -> dict[str, str]:
    """Flag name (dashes) -> dotted path, for every leaf field."""
    paths = {}
    for section in fields(RunConfig):
        for leaf in fields(section.default_factory()):
            paths[leaf.name.replace("_", "-")] = f"{section.name}.{leaf.name}"
    paths.update({k.replace("_", "-"): v for k, v in ALIASES.items()})
    return paths


FLAGS = _field_paths()
DOTTED = set(FLAGS.values())


def _unknown(key: str, where: str) -> SwiftdistError:
    pool = list(DOTTED) if "." in key else [f"--{f}" for f in FLAGS]
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; see `swiftdist sft --help`"
    return SwiftdistError(f"{where}: unknown config key '{key}'{hint}")


def _flatten_yaml(path: str) -> list[str]:
    """A preset may be nested (`model: {lora_rank: 8}`) or flat (`lora_rank: 8`); both become dotlist."""
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise SwiftdistError(f"--config {path}: file not found") from None
    except Exception as e:  # yaml parser errors carry line numbers in their text
        raise SwiftdistError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    items = []
    for key, value in OmegaConf.to_container(raw).items():
        if isinstance(value, dict) and key in {f.name for f in fields(RunConfig)}:
            for sub, v in value.items():
                items.append((f"{key}.{sub}", v))
        else:
            items.append((key, value))
    out = []
    for key, value in items:
        dotted = key if key in DOTTED else FLAGS.get(key.replace("_", "-"))
        if dotted is None:
            raise _unknown(key, path)
        out.append((dotted, value))
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, object]]]:
    """Returns (config files, [(dotted key, raw value)]) in command-line order."""
    bool_keys = {k for k, v in _leaf_types().items() if v is bool}
    list_keys = {k for k, v in _leaf_types().items() if v is list}
    configs, pairs, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok.startswith("--"):
            name, eq, inline = tok[2:].partition("=")
            if name == "config":
                value = inline if eq else (argv[i] if i < len(argv) else "")
                i += 0 if eq else 1
                if not value:
                    raise SwiftdistError("--config needs a YAML file path")
                configs.append(value)
                continue
            dotted = FLAGS.get(name) or FLAGS.get(name.replace("_", "-"))
            if dotted is None:
                raise _unknown(tok.split("=")[0], "command line")
            if eq:
                values = [inline]
            else:
                values = []
                while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                    values.append(argv[i])
                    i += 1
            if dotted in bool_keys and not values:
                values = ["true"]
            if not values:
                raise SwiftdistError(f"{tok} needs a value")
            if dotted in list_keys:
                pairs.append((dotted, values))
            elif len(values) > 1:
                raise SwiftdistError(f"{tok} takes one value, got {len(values)}: {' '.join(values)}")
            else:
                pairs.append((dotted, values[0]))
        elif "=" in tok:
            key, _, value = tok.partition("=")
            if key not in DOTTED:
                raise _unknown(key, "command line")
            pairs.append((key, [value] if key in list_keys else value))
        else:
            raise SwiftdistError(f"unexpected argument '{tok}': use --key value or section.key=value")
    return configs, pairs


def _leaf_types() -> dict[str, type]:
    types = {}
    defaults = RunConfig()
    for section in fields(RunConfig):
        for leaf in fields(getattr(defaults, section.name)):
            value = getattr(getattr(defaults, section.name), leaf.name)
            types[f"{section.name}.{leaf.name}"] = type(value) if value is not None else str
    return types


def _set(cfg, dotted: str, value, where: str) -> None:
    try:
        OmegaConf.update(cfg, dotted, value, merge=False)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise SwiftdistError(f"{where}: {dotted}={value!r}: {msg}") from None


def parse_config(argv: list[str]) -> RunConfig:
    """CLI arguments -> validated RunConfig (defaults < presets in order < flags in order)."""
    configs, pairs = _split_argv(argv)
    cfg = OmegaConf.structured(RunConfig)
    for path in configs:
        for dotted, value in _flatten_yaml(path):
            _set(cfg, dotted, value, path)
    for dotted, value in pairs:
        _set(cfg, dotted, value, "command line")
    run: RunConfig = OmegaConf.to_object(cfg)
    validate(run)
    return run


def explicitly_set(argv: list[str]) -> set[str]:
    """Dotted keys that the arguments or their presets set, whatever the value: tells an explicit
    `--save-steps 0` from the default."""
    configs, pairs = _split_argv(argv)
    return {dotted for path in configs for dotted, _ in _flatten_yaml(path)} | {dotted for dotted, _ in pairs}


def validate(cfg: RunConfig) -> None:
    """Collect every problem, then raise once (litgpt's validate_args)."""
    problems = []
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            problems.append(f"{dotted}={value!r} must be one of {', '.join(allowed)}")
    positive = ["train.batch_size", "train.grad_accum", "train.epochs", "data.max_length", "parallel.tp", "parallel.pp"]
    for dotted in positive:
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            problems.append(f"{dotted} must be >= 1")
    if not 0.0 <= cfg.data.val_split < 1.0:
        problems.append("data.val_split must be in [0, 1)")
    if cfg.train.lr <= 0:
        problems.append("train.lr must be > 0")
    for sink in cfg.log.report_to:
        if sink not in ("jsonl", "wandb"):
            problems.append(f"log.report_to: unknown sink {sink!r} (jsonl, wandb)")
    if not cfg.data.dataset:
        problems.append("data.dataset: give at least one dataset")
    if problems:
        raise SwiftdistError("invalid config: " + "; ".join(problems))


def save_config(cfg: RunConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)


def help_text() -> str:
    lines = ["swiftdist sft [--config FILE.yaml] [--flag value ...] [section.key=value ...]", ""]
    for section in fields(RunConfig):
        lines.append(f"{section.name}:")
        for leaf in fields(section.default_factory()):
            default = getattr(section.default_factory(), leaf.name)
            lines.append(f"  --{leaf.name.replace('_', '-'):<24} (default: {default})")
    return "\n".join(lines)

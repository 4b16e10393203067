"""Run configuration: typed dataclasses merged by OmegaConf from defaults, a YAML preset and the CLI.

Every field is settable three ways, later ones winning:
    --config configs/lora.yaml        a YAML preset (nested sections, or flat keys)
    --lora-rank 16  /  --lora-rank=16 a flag named after the field (unique across sections)
    model.lora_rank=16                an OmegaConf dotlist entry
HF Trainer / ms-swift / TRL names work as flags and flat YAML keys where they mean the same
(`swiftdist/aliases.py`). Unknown keys, wrong types and out-of-range values become one-line
`SwiftdistError`s naming the file or command line, the key, and the closest valid name.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import textwrap
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swiftdist import aliases
from swiftdist.errors import SwiftdistError
from swiftdist.strategies import names as strategy_names


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
    """Rank of the LoRA update matrices."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt, or `all-linear` (every linear layer but the LM head)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, more compute
    (--checkpointing-mode says how much)."""
    checkpointing_mode: str = "full"
    """With --gradient-checkpointing: full (every decoder layer's forward runs again: the least memory)
    or selective (every second layer: about half the memory saved for half the recompute)."""
    activation_offload: bool = False
    """With --gradient-checkpointing: keep what is saved for the recompute (each decoder layer's input)
    in host memory, copied back in the backward pass. On a CPU host it is there already (a no-op)."""


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=lambda: ["self-cognition"])
    """Files (jsonl/json/csv/parquet) or built-ins (`self-cognition`, `general-qa`); `path#N` samples N rows."""
    format: str = "auto"
    """Row format of the dataset files; auto tells it from each row's keys."""
    system: Optional[str] = None
    """System prompt added to every conversation that has none."""
    max_length: int = 1024
    """Longest sample in tokens (with --packing: the length of a packed row)."""
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
    """Passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run all epochs)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """AdamW weight decay; 1-D weights (norms, biases) get none."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    scheduler: str = "cosine"
    """cosine, linear or constant (after warmup)."""
    warmup_ratio: float = 0.05
    """Fraction of the run spent raising the learning rate linearly from 0."""
    min_lr_ratio: float = 0.0
    """Where cosine/linear decay ends, as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: str = "auto"
    """auto (bf16 where the device runs it fast), bf16 or fp32."""
    seed: int = 42
    """Seeds the data order, the validation split, `#N` sampling and dropout."""
    eval_steps: int = 0
    """Evaluate every N steps (0: only at the end, when there is a validation split)."""
    loss_chunk_size: int = 0
    """Labelled positions per LM-head call in the loss (e.g. 1024): at most this many rows of
    vocabulary-wide logits exist at once, for long sequences. 0: all labelled positions at once (also
    for a model that changes its logits after the head, e.g. Gemma 2's softcapping)."""


@dataclass
class ParallelConfig:
    strategy: str = "ddp"
    """How the model is spread over the ranks (README: Strategies); auto takes the first whose memory
    estimate fits the device."""
    tp: int = 1
    """Tensor-parallel size (megatron)."""
    pp: int = 1
    """Pipeline-parallel size (megatron)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism: groups of N ranks hold 1/N of every sequence each, for long
    contexts (data-parallel size = world size / N). N must divide the world size and the model's
    attention and KV head counts."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON to use instead of the generated one (zero* strategies)."""
    gpu_memory: float = 0.0
    """GiB per device that --strategy auto may plan for (0: the device's own size)."""


@dataclass
class CheckpointConfig:
    output_dir: str = "output"
    """Where checkpoints, metrics, the resolved config and the final model go."""
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
    """Log every N optimizer steps."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Any of: jsonl, wandb. The terminal always gets rank-0 logs."""
    wandb_project: str = "swiftdist"
    """wandb project name (with --report-to wandb)."""
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
    "model.checkpointing_mode": ("full", "selective"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca"),
    "data.truncation": ("truncate", "drop"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "parallel.strategy": (*strategy_names(), "auto"),
    "train.precision": ("auto", "bf16", "fp32"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}
SINKS = ("jsonl", "wandb")


def _leaf_types() -> dict[str, type]:
    """Dotted path -> the type of its value (Optional[str] fields count as str)."""
    types = {}
    for section in fields(RunConfig):
        defaults = section.default_factory()
        for leaf in fields(defaults):
            value = getattr(defaults, leaf.name)
            types[f"{section.name}.{leaf.name}"] = type(value) if value is not None else str
    return types


LEAF_TYPES = _leaf_types()
SECTIONS = {section.name for section in fields(RunConfig)}
FLAGS = {dotted.split(".")[1].replace("_", "-"): dotted for dotted in LEAF_TYPES}  # flag name -> dotted path
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _unknown(key: str, where: str) -> SwiftdistError:
    """An unknown key, with the closest valid one in the same spelling (flag, YAML name or dotted path)."""
    if "." in key:
        section, _, leaf = key.partition(".")
        home = next((d for d in LEAF_TYPES if d.split(".")[1] == leaf), None)
        if home:
            return SwiftdistError(f"{where}: unknown config key '{key}': {leaf} belongs in section "
                                  f"'{home.split('.')[0]}' ({home})")
        pool = list(LEAF_TYPES)
    elif key.startswith("--"):
        pool = [f"--{flag}" for flag in FLAGS] + [f"--{name}" for name in aliases.ALIASES]
    else:
        pool = [d.split(".")[1] for d in LEAF_TYPES] + list(aliases.ALIASES)
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see `swiftdist sft --help`"
    return SwiftdistError(f"{where}: unknown config key '{key}'{hint}")


def _nargs(name: str) -> str | None:
    """How many values a flag takes: "one", "list", or "flag" (may stand alone); None if unknown."""
    alias = aliases.lookup(name)
    if alias:
        return alias.nargs
    dotted = FLAGS.get(name.replace("_", "-"))
    if dotted is None:
        return None
    kind = LEAF_TYPES[dotted]
    return "flag" if kind is bool else "list" if kind is list else "one"


def _pairs(name: str, value, shown: str, where: str) -> list[tuple[str, object]]:
    """A flat name (ours or an alias) and its value -> [(dotted path, value)]."""
    alias = aliases.lookup(name)
    if alias is None:
        return [(FLAGS[name.replace("_", "-")], value)]
    try:
        return alias.convert(value)
    except aliases.Refused as e:
        raise SwiftdistError(f"{where}: {shown}: {e}") from None


def _read_yaml(path: str) -> list[tuple[str, object]]:
    """A preset may be nested (`model: {lora_rank: 8}`) or flat (`lora_rank: 8`); both become dotted pairs."""
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise SwiftdistError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise SwiftdistError(f"--config {path}: a directory, not a YAML file") from None
    except yaml.MarkedYAMLError as e:  # its mark is where the parser gave up
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise SwiftdistError(f"{path}{line}: not valid YAML ({e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SwiftdistError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, DictConfig):
        raise SwiftdistError(f"{path}: expected a mapping of config keys (`key: value` lines), got a list")
    out = []
    for key, value in OmegaConf.to_container(raw).items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                dotted = f"{key}.{sub}"
                if dotted not in LEAF_TYPES:
                    raise _unknown(dotted, path)
                out.append((dotted, v))
        elif _nargs(key) is not None:
            out += _pairs(key, value, f"{key}: {value}", path)
        elif key in SECTIONS:
            raise SwiftdistError(f"{path}: '{key}' is a section; put its keys under it, indented")
        else:
            raise _unknown(key, path)
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, object]]]:
    """Returns (config files, [(dotted key, raw value)]) in command-line order."""

    def is_value(token: str) -> bool:  # not the next option, nor a section.key=value entry
        return not token.startswith("--") and token.partition("=")[0] not in LEAF_TYPES

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
            nargs = _nargs(name)
            if nargs is None:
                raise _unknown(f"--{name}", "command line")
            values = [inline] if eq else []
            while not eq and i < len(argv) and is_value(argv[i]):
                values.append(argv[i])
                i += 1
            if nargs == "flag" and not values:
                values = ["true"]
            if not values:
                raise SwiftdistError(f"--{name} needs a value")
            if nargs != "list" and len(values) > 1:
                raise SwiftdistError(f"--{name} takes one value, got {len(values)}: {' '.join(values)}")
            value = values if nargs == "list" else values[0]
            pairs += _pairs(name, value, f"--{name} {' '.join(values)}", "command line")
        elif "=" in tok:
            key, _, value = tok.partition("=")
            if key not in LEAF_TYPES:
                raise _unknown(key, "command line")
            pairs.append((key, value))
        else:
            raise SwiftdistError(f"unexpected argument '{tok}': use --key value or section.key=value")
    return configs, pairs


def _set(cfg, dotted: str, value, where: str) -> None:
    kind = LEAF_TYPES[dotted]
    if kind is list and not isinstance(value, (list, tuple)):
        value = [value]  # `dataset: a.jsonl` in YAML, or a dotlist entry
    try:
        OmegaConf.update(cfg, dotted, value, merge=False)
    except OmegaConfBaseException:
        wanted = "a value (not null)" if value is None else KINDS[kind]
        raise SwiftdistError(f"{where}: {dotted} must be {wanted}, got {value!r}") from None


def parse_config(argv: list[str]) -> RunConfig:
    """CLI arguments -> validated RunConfig (defaults < presets in order < flags in order)."""
    configs, pairs = _split_argv(argv)
    cfg = OmegaConf.structured(RunConfig)
    for path in configs:
        for dotted, value in _read_yaml(path):
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
    return {dotted for path in configs for dotted, _ in _read_yaml(path)} | {dotted for dotted, _ in pairs}


# (dotted path, test, what it must be) for numbers with a range; the choices are in CHOICES.
RANGES = [
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum", lambda v: v >= 1, ">= 1"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("data.max_length", lambda v: v >= 1, ">= 1"),
    ("parallel.tp", lambda v: v >= 1, ">= 1"),
    ("parallel.pp", lambda v: v >= 1, ">= 1"),
    ("parallel.sequence_parallel", lambda v: v >= 1, ">= 1"),
    ("model.lora_rank", lambda v: v >= 1, ">= 1"),
    ("log.log_steps", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("data.val_split", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("train.eval_steps", lambda v: v >= 0, ">= 0"),
    ("train.loss_chunk_size", lambda v: v >= 0, ">= 0 (0: the whole loss at once)"),
    ("checkpoint.save_steps", lambda v: v >= 0, ">= 0"),
    ("checkpoint.save_minutes", lambda v: v >= 0, ">= 0"),
    ("checkpoint.save_total_limit", lambda v: v >= 0, ">= 0"),
    ("parallel.gpu_memory", lambda v: v >= 0, ">= 0"),
]


def _get(cfg: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: RunConfig) -> None:
    """Collect every problem, then raise once (litgpt's validate_args)."""
    problems = []
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            problems.append(f"{dotted}={value!r} must be one of {', '.join(allowed)}")
    for dotted, ok, wanted in RANGES:
        if not ok(_get(cfg, dotted)):
            problems.append(f"{dotted}={_get(cfg, dotted)!r} must be {wanted}")
    for sink in cfg.log.report_to:
        if sink not in SINKS:
            problems.append(f"log.report_to: unknown sink {sink!r} ({', '.join(SINKS)})")
    if not cfg.data.dataset:
        problems.append("data.dataset: give at least one dataset")
    if not cfg.model.gradient_checkpointing:
        if cfg.model.checkpointing_mode != "full":
            problems.append(f"model.checkpointing_mode={cfg.model.checkpointing_mode} needs --gradient-checkpointing")
        if cfg.model.activation_offload:
            problems.append("model.activation_offload moves what checkpointing saves; it needs --gradient-checkpointing")
    if problems:
        raise SwiftdistError("invalid config: " + "; ".join(problems))


def save_config(cfg: RunConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)


# ---- --help ------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring under it, read from the class's source. Empty when the source is
    not shipped (a .pyc-only install): --help then shows defaults and choices alone."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _metavar(dotted: str) -> str:
    if dotted in CHOICES:
        return "{" + ",".join(CHOICES[dotted]) + "}"
    return {int: "INT", float: "FLOAT", bool: "[true|false]", str: "TEXT", list: "TEXT ..."}[LEAF_TYPES[dotted]]


def help_text() -> str:
    lines = ["usage: swiftdist sft [--config FILE.yaml] [--flag value ...] [section.key=value ...]", "",
             "Flags accept - or _ (--lora-rank, --lora_rank); YAML presets take the same names, flat or",
             "nested by section. HF Trainer / ms-swift / TRL names are accepted too (the README lists them).", ""]
    also: dict[str, list[str]] = {}
    for name, alias in aliases.ALIASES.items():
        if alias.ours and name.replace("_", "-") not in FLAGS:
            also.setdefault(alias.ours.split()[0].rstrip(","), []).append(f"--{name}")
    for section in fields(RunConfig):
        lines.append(f"{section.name}:")
        defaults = section.default_factory()
        docs = field_docs(type(defaults))
        for leaf in fields(defaults):
            dotted = f"{section.name}.{leaf.name}"
            flag = f"--{leaf.name.replace('_', '-')}"
            lines.append(f"  {flag} {_metavar(dotted)}")
            default = getattr(defaults, leaf.name)
            facts = [f"default: {'none' if default is None else default}"]
            if dotted in CHOICES:
                facts.append(f"choices: {', '.join(CHOICES[dotted])}")
            if flag in also:
                facts.append(f"also: {', '.join(also[flag])}")
            text = " ".join(filter(None, [docs.get(leaf.name, ""), f"({'; '.join(facts)})"]))
            lines += textwrap.wrap(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_on_hyphens=False)  # keep `tiny-qwen2` and flags whole
    return "\n".join(lines)

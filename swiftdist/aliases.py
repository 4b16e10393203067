"""Option names from HF `TrainingArguments`, ms-swift and TRL, accepted for ours.

A user's existing command line (or YAML) keeps working where a name means what ours means. Each
alias turns its value into our dotted keys, or refuses in one line saying why, where the meaning
differs (a fraction where we count steps, a value we have no path for). Names that are already
ours (`--output_dir`, `--save_steps`, `--lora_rank`, ...) need no alias: `_` and `-` are the same
in every flag. The README's alias table is generated from `ALIASES` (a test keeps the two equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class Refused(Exception):
    """The alias's meaning differs from ours for this value; the message says why, in one line."""


Pairs = list[tuple[str, object]]


@dataclass(frozen=True)
class Alias:
    ours: str  # what it sets, as the user would write it (help text and README table)
    source: str  # where the name comes from
    note: str  # how values map, and which are refused
    convert: Callable[[object], Pairs]
    nargs: str = "one"  # "one" value, a "list" of them, or "flag": may stand alone, meaning true


def _rename(dotted: str) -> Callable[[object], Pairs]:
    return lambda value: [(dotted, value)]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Refused("not a number") from None


def _truth(value) -> bool:
    """HF's spelling of booleans (transformers' string_to_bool)."""
    if isinstance(value, bool):
        return value
    word = str(value).lower()
    if word in ("true", "t", "yes", "y", "1"):
        return True
    if word in ("false", "f", "no", "n", "0"):
        return False
    raise Refused("expected true or false")


def _refuse(reason: str) -> Callable[[object], Pairs]:
    def convert(value) -> Pairs:
        raise Refused(reason)

    return convert


def _epochs(value) -> Pairs:
    epochs = _number(value)
    if epochs != int(epochs):
        raise Refused("swiftdist runs whole epochs; use --max-steps to stop part-way through one")
    return [("train.epochs", int(epochs))]


# HF scheduler names whose curve is ours; the rest are refused. HF's `constant` has no warmup at all.
_SCHEDULERS: dict[str, Pairs] = {
    "linear": [("train.scheduler", "linear")],
    "cosine": [("train.scheduler", "cosine")],
    "constant_with_warmup": [("train.scheduler", "constant")],
    "constant": [("train.scheduler", "constant"), ("train.warmup_ratio", 0.0)],
}


def _scheduler(value) -> Pairs:
    name = str(value)
    if name in _SCHEDULERS:
        return _SCHEDULERS[name]
    if name.startswith("cosine") and "min_lr" in name:
        raise Refused("use --scheduler cosine --min-lr-ratio R (the floor as a fraction of --lr)")
    raise Refused(f"no such schedule here; swiftdist has {', '.join(_SCHEDULERS)}")


def _warmup_steps(value) -> Pairs:
    steps = _number(value)
    if 0 <= steps < 1:  # transformers 5: a float in [0, 1) is a fraction of the run
        return [("train.warmup_ratio", steps)]
    raise Refused("swiftdist sets warmup as a fraction of the run: use --warmup-ratio (steps / total steps)")


def _bf16(value) -> Pairs:
    return [("train.precision", "bf16" if _truth(value) else "fp32")]


def _fp16(value) -> Pairs:
    if _truth(value):
        raise Refused("swiftdist has no fp16 path (no loss scaling); use --bf16 true or --precision fp32")
    return []


# ms-swift's --deepspeed names (swift/arguments/sft_args.py) -> our strategies.
_ZERO_NAMES = {"zero2": "zero2", "zero3": "zero3", "zero2_offload": "zero2-offload", "zero3_offload": "zero3-offload"}


def _deepspeed(value) -> Pairs:
    name = str(value).strip()
    if name in _ZERO_NAMES:
        return [("parallel.strategy", _ZERO_NAMES[name])]
    if name in ("zero0", "zero1"):
        raise Refused("ZeRO stages 0 and 1 are not offered; --strategy ddp or zero2 come closest")
    if isinstance(value, dict) or name.startswith("{"):
        raise Refused("an inline DeepSpeed config: save it to a JSON file and pass its path")
    path = Path(name)
    if not path.is_file():
        raise Refused(f"not one of {', '.join(_ZERO_NAMES)}, nor an existing JSON file")
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, ValueError, AttributeError) as e:
        raise Refused(f"cannot read it as a DeepSpeed JSON object ({e})") from None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (2, 3):
        raise Refused(f"it asks for ZeRO stage {stage}; swiftdist runs stage 2 or 3 (or --strategy ddp)")
    # Any offload device makes it an -offload strategy: the rule the zero* strategies check it by.
    offload = any((zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    strategy = f"zero{stage}" + ("-offload" if offload else "")
    return [("parallel.strategy", strategy), ("parallel.deepspeed_config", name)]


def _fsdp(value) -> Pairs:
    """HF: a space-separated option string ("full_shard auto_wrap offload"); ms-swift: `fsdp2`."""
    options = set(value if isinstance(value, list) else str(value).split())
    if options <= {"fsdp2", "full_shard", "auto_wrap"} and options:
        return [("parallel.strategy", "fsdp")]
    if options <= {"full_shard", "auto_wrap", "offload"} and "offload" in options:
        return [("parallel.strategy", "fsdp-offload")]
    raise Refused("swiftdist's FSDP2 shards fully per decoder layer: give full_shard [auto_wrap] [offload] or "
                  "fsdp2, or use --strategy fsdp|fsdp-offload (no shard_grad_op, hybrid_shard or JSON)")


def _truncation(value) -> Pairs:
    mapped = {"delete": "drop", "right": "truncate"}.get(str(value))
    if mapped is None:
        raise Refused("swiftdist truncates on the right (right) or drops the sample (delete); no left or split")
    return [("data.truncation", mapped)]


def _attn(value) -> Pairs:
    # ms-swift's `flash_attn` is its name for flash_attention_2; the rest pass to --attn-impl's own check.
    return [("model.attn_impl", "flash_attention_2" if value == "flash_attn" else value)]


def _report_to(values) -> Pairs:
    """HF's `none` (no tracker) is our local metrics.jsonl alone; other names pass to the sink check."""
    values = values if isinstance(values, list) else [values]
    sinks = [v for v in values if v != "none"]
    return [("log.report_to", sinks or ["jsonl"])]


def _use_peft(value) -> Pairs:
    return [("model.train_type", "lora" if _truth(value) else "full")]


QLORA = "use --train-type qlora (bitsandbytes 4-bit NF4 with double quantisation, plus LoRA)"

ALIASES: dict[str, Alias] = {
    "datasets": Alias("--dataset", "plural", "same", _rename("data.dataset"), nargs="list"),
    "learning_rate": Alias("--lr", "HF, ms-swift", "same", _rename("train.lr")),
    "num_train_epochs": Alias("--epochs", "HF, ms-swift", "whole numbers only (2.0 is 2; 2.5 is refused)", _epochs),
    "per_device_train_batch_size": Alias("--batch-size", "HF, ms-swift", "same", _rename("train.batch_size")),
    "gradient_accumulation_steps": Alias("--grad-accum", "HF, ms-swift", "same", _rename("train.grad_accum")),
    "lr_scheduler_type": Alias("--scheduler", "HF, ms-swift",
                               "linear, cosine; constant_with_warmup is constant; constant is constant with "
                               "--warmup-ratio 0; others refused", _scheduler),
    "warmup_steps": Alias("--warmup-ratio", "HF", "a fraction in [0, 1) (transformers 5); a step count is refused",
                          _warmup_steps),
    "logging_steps": Alias("--log-steps", "HF, ms-swift", "same (whole steps)", _rename("log.log_steps")),
    "resume_from_checkpoint": Alias("--resume", "HF, ms-swift", "same for a swiftdist checkpoint (or auto); an "
                                    "HF Trainer checkpoint-N folder is not one", _rename("checkpoint.resume")),
    "deepspeed": Alias("--strategy, --deepspeed-config", "HF, ms-swift",
                       "zero2, zero3, zero2_offload, zero3_offload pick the strategy; a JSON path is used as "
                       "--deepspeed-config with the strategy of its stage and offload; zero0, zero1 refused",
                       _deepspeed),
    "fsdp": Alias("--strategy", "HF, ms-swift", "full_shard [auto_wrap] or fsdp2 is fsdp; with offload, "
                  "fsdp-offload; shard_grad_op, hybrid_shard and JSON configs refused", _fsdp),
    "bf16": Alias("--precision", "HF, ms-swift", "true is bf16, false is fp32", _bf16, nargs="flag"),
    "fp16": Alias("--precision", "HF, ms-swift", "false is accepted; true is refused (no fp16 path)", _fp16,
                  nargs="flag"),
    "tuner_type": Alias("--train-type", "ms-swift 4", "same (lora, full)", _rename("model.train_type")),
    "use_peft": Alias("--train-type", "TRL", "true is lora, false is full", _use_peft, nargs="flag"),
    "model_name_or_path": Alias("--model", "HF scripts, TRL", "same (a local directory)", _rename("model.model")),
    "attn_implementation": Alias("--attn-impl", "TRL", "same", _attn),
    "attn_impl": Alias("--attn-impl", "ms-swift", "flash_attn is flash_attention_2", _attn),
    "max_seq_length": Alias("--max-length", "TRL", "same", _rename("data.max_length")),
    "truncation_strategy": Alias("--truncation", "ms-swift", "delete is drop, right is truncate; left, split refused",
                                 _truncation),
    "split_dataset_ratio": Alias("--val-split", "ms-swift", "same", _rename("data.val_split")),
    "report_to": Alias("--report-to", "HF, ms-swift", "none is jsonl alone (the local metrics file)", _report_to,
                       nargs="list"),
    "lora_r": Alias("--lora-rank", "TRL", "same", _rename("model.lora_rank")),
    "lora_target_modules": Alias("--target-modules", "TRL", "same", _rename("model.target_modules"), nargs="list"),
    "per_device_eval_batch_size": Alias("", "HF, ms-swift", "refused: evaluation runs at --batch-size",
                                        _refuse("evaluation runs at --batch-size; drop this option")),
    "quant_bits": Alias("", "ms-swift", "refused: " + QLORA, _refuse(QLORA)),
    "load_in_4bit": Alias("", "TRL", "refused: " + QLORA, _refuse(QLORA), nargs="flag"),
}


def lookup(name: str) -> Alias | None:
    """The alias a command-line or YAML name stands for (`-` and `_` alike), or None."""
    return ALIASES.get(name.replace("-", "_"))


def markdown_table() -> str:
    """The README's alias table."""
    lines = ["| alias | from | swiftdist | meaning here |", "|---|---|---|---|"]
    for name, alias in ALIASES.items():
        lines.append(f"| `--{name}` | {alias.source} | {f'`{alias.ours}`' if alias.ours else '-'} | {alias.note} |")
    return "\n".join(lines) + "\n"

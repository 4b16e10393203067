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
    """Rank of the LoRA update matrices."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt, or `all-linear` (every linear layer but the LM head)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass: less memory, more compute."""


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=lambda: ["self-cognition"])
    """Files (jsonl/json/csv/parquet) or built-ins (`self-cognition`, `general-qa`); `path#N` samples N rows."""
    format: str = "auto"
    """auto, messages, sharegpt or alpaca."""
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



"""The one job every contender runs: same model, data, batches, hyperparameters and step count.

A suite writes a BenchSpec to JSON; each contender process reads it back, so no contender can
drift from the others by a default of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class BenchSpec:
    model: str = "smollm2"
    """swiftdist model alias or local HF dir."""
    train_type: str = "lora"
    steps: int = 10
    global_batch: int = 8
    """Samples per optimizer step, split evenly over the ranks (no gradient accumulation)."""
    dataset: list[str] = field(default_factory=lambda: ["self-cognition"])
    max_length: int = 1024
    packing: bool = False
    precision: str = "auto"
    """Resolved once by the suite (swiftdist.model.resolve_precision) and pinned here."""
    gradient_checkpointing: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BenchSpec":
        raw = json.loads(Path(path).read_text())
        raw["betas"] = tuple(raw["betas"])
        return cls(**raw)

    def micro_batch(self, world_size: int) -> int:
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split over {world_size} ranks")
        return self.global_batch // world_size

    def swiftdist_argv(self, strategy: str, world_size: int, output_dir: str) -> list[str]:
        """The `swiftdist sft` flags that run this job (cosine schedule, as the peers below use)."""
        argv = [
            "--model", self.model, "--train-type", self.train_type, "--strategy", strategy,
            "--dataset", *self.dataset, "--max-length", str(self.max_length),
            "--batch-size", str(self.micro_batch(world_size)), "--grad-accum", "1",
            "--max-steps", str(self.steps), "--precision", self.precision,
            "--lr", str(self.lr), "--weight-decay", str(self.weight_decay),
            "--adam-beta1", str(self.betas[0]), "--adam-beta2", str(self.betas[1]),
            "--scheduler", "cosine", "--warmup-ratio", str(self.warmup_ratio),
            "--max-grad-norm", str(self.max_grad_norm), "--seed", str(self.seed),
            "--lora-rank", str(self.lora_rank), "--lora-alpha", str(self.lora_alpha),
            "--lora-dropout", str(self.lora_dropout), "--output-dir", output_dir,
            "--save-total-limit", "1",
        ]
        if self.packing:
            argv += ["--packing", "true"]
        if self.gradient_checkpointing:
            argv += ["--gradient-checkpointing", "true"]
        return argv


def peer_model(spec: BenchSpec):
    """Model + tokenizer + train samples for the peers (hand-written loop, HF Trainer), built the way
    their users would: transformers + peft directly. The samples come from swiftdist's data pipeline
    so that every contender trains on exactly the same tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from swiftdist.config import DataConfig, ModelConfig
    from swiftdist.data import build_datasets
    from swiftdist.model import load_tokenizer, resolve_model_path, weight_dtype

    path = resolve_model_path(spec.model)
    tokenizer = load_tokenizer(path)
    data = build_datasets(tokenizer, DataConfig(dataset=list(spec.dataset), max_length=spec.max_length,
                                                packing=spec.packing), spec.seed)
    torch.manual_seed(spec.seed)
    # The weights in swiftdist's dtypes: a bf16 frozen base for LoRA (peft keeps adapters fp32),
    # fp32 for full fine-tuning under bf16 autocast.
    dtype = weight_dtype(ModelConfig(train_type=spec.train_type), spec.precision)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if spec.train_type == "full":
        return model, tokenizer, data.train
    if spec.train_type != "lora":
        raise ValueError(f"the peer contenders run lora or full, not {spec.train_type}")
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer, data.train

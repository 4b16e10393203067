"""GPU suite: swiftdist's tokens/s per GPU, MFU and peak memory on real model shapes.

The GPU machines have no model hub, so each model is built with random weights from its real
config (configs/models/*.json) and saved once under $SWIFTDIST_CACHE/bench-models; the tokenizer
is the embedded SmolLM2's (its ids are all below every config's vocab size). Rows are packed to
`--seq` tokens, one row per GPU per step, with gradient checkpointing, as in the peers' figures.

MFU = achieved model FLOP/s per GPU / the card's dense bf16 peak. Model FLOPs per token
(torchtitan's convention, so its 33-39% on Llama-3.1-8B is comparable):
    full:        6 N + 12 L H Q T
    lora, qlora: 4 N + 12 L H Q T   (frozen weights need no weight-gradient matmuls)
N = parameters of every matmul (decoder linears and the output head; not the embedding lookup),
L layers, H heads, Q head dim, T sequence length. Recomputation by gradient checkpointing is
work the hardware does but the model does not need, so it is not counted (MFU, not HFU).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report
from benchmarks.estimates import estimated_gib
from benchmarks.runner import Contender, launch, median_after_warmup
from benchmarks.spec import BenchSpec

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
MODELS = {"qwen2.5-0.5b": "qwen2.5-0.5b.json", "qwen2.5-7b": "qwen2.5-7b.json", "llama3-8b": "llama3-8b.json"}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s. Matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("RTX 3090", 71.0),
]
# Full fine-tuning as swiftdist runs it: fp32 weights + fp32 grads + two fp32 AdamW moments.
FULL_BYTES_PER_PARAM = 16


def hf_config(model: str):
    from transformers import AutoConfig

    fields = json.loads((CONFIG_DIR / MODELS[model]).read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, cfg) -> "Shape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   head_dim, cfg.intermediate_size, cfg.vocab_size)

    @property
    def matmul_params(self) -> int:
        """Weights of q, k, v, o, gate, up, down in every layer, plus the output head."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) + self.hidden * self.vocab


def flops_per_token(shape: Shape, seq: int, train_type: str) -> float:
    """Training FLOPs per token (forward + backward); see the module docstring."""
    weight_passes = 6 if train_type == "full" else 4
    return weight_passes * shape.matmul_params + 12 * shape.layers * shape.heads * shape.head_dim * seq


def mfu(tokens_per_s_per_gpu: float, flops_token: float, peak_tflops: float) -> float:
    return tokens_per_s_per_gpu * flops_token / (peak_tflops * 1e12)


def peak_tflops(device_name: str, override: float | None) -> float:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    raise SystemExit(f"benchmarks: no bf16 peak known for '{device_name}'; pass --peak-tflops "
                     "with the card's dense bf16 TFLOP/s from its datasheet")


def random_model_dir(model: str, root: Path) -> Path:
    """A loadable HF dir of `model` with random bf16 weights (built on the GPU: fast), made once."""
    out = root / model
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from swiftdist.model import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2"))
    cfg = hf_config(model)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_suffix(".tmp")
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del hf
    torch.cuda.empty_cache()
    tmp.rename(out)
    return out


def total_params(model: str) -> int:
    """Exact parameter count of the config (built on the meta device: no memory, a second or two)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config(model)).parameters())


def skip_reason(model: str, train_type: str, card_gib: float) -> str | None:
    if train_type == "full":
        need = total_params(model) * FULL_BYTES_PER_PARAM / 2**30
        if need > card_gib:
            return f"full fine-tuning needs ~{need:.0f} GiB for weights, grads and AdamW alone; the card has {card_gib:.0f} GiB"
    return None


def job_spec(model_dir: Path, train_type: str, steps: int, seq: int, gpus: int) -> BenchSpec:
    # Enough self-cognition rows (45-112 tokens each) to pack every step's rows full to `seq`.
    rows_needed = steps * gpus * (seq // 40 + 1)
    return BenchSpec(model=str(model_dir), train_type=train_type, steps=steps, global_batch=gpus,
                     dataset=[f"self-cognition#{rows_needed}"], max_length=seq, packing=True,
                     precision="bf16", gradient_checkpointing=True)


def measure(model: str, train_type: str, args, peak: float, card_gib: float, out_dir: Path) -> dict:
    why = skip_reason(model, train_type, card_gib)
    if why:
        return {"model": model, "train_type": train_type, "gpus": args.gpus, "seq": args.seq, "status": f"skipped: {why}"}
    from swiftdist.model import CACHE_DIR

    return measure_dir(model, random_model_dir(model, CACHE_DIR / "bench-models"), train_type, args, peak, out_dir)


def measure_dir(model: str, model_dir: Path, train_type: str, args, peak: float, out_dir: Path) -> dict:
    """One swiftdist run (DDP over `args.gpus`) of the HF dir `model_dir`, named `model` in the table."""
    from transformers import AutoConfig

    row = {"model": model, "train_type": train_type, "gpus": args.gpus, "seq": args.seq}
    spec = job_spec(model_dir, train_type, args.steps, args.seq, args.gpus)
    run_dir = out_dir / "runs" / f"{model}-{train_type}"
    run_dir.mkdir(parents=True, exist_ok=True)
    res = launch(Contender(f"swiftdist {model} {train_type}", "benchmarks.swiftdist_worker", args.gpus, ["ddp"]),
                 spec.save(run_dir / "spec.json"), run_dir, args.timeout)
    est = estimated_gib(str(model_dir), spec, ["ddp"], args.gpus, args.seq, 1).get("ddp", {})
    row["est_gib"] = est.get("total")
    if not res.ok:
        return {**row, "status": res.error}
    tokens_per_gpu = median_after_warmup(res.ranks[0]["tokens_per_s"], args.warmup) / args.gpus
    flops = flops_per_token(Shape.of(AutoConfig.from_pretrained(model_dir)), args.seq, train_type)
    return {**row, "status": "ok", "step_s": median_after_warmup(res.step_s, args.warmup),
            "tokens_per_s_per_gpu": tokens_per_gpu, "mfu_pct": 100 * mfu(tokens_per_gpu, flops, peak),
            # None on a CPU host (a dry run of scripts/gpu_check.sh): no device memory to read.
            "max_memory_allocated_gib": max((r["max_memory_allocated_gib"] for r in res.ranks
                                             if "max_memory_allocated_gib" in r), default=None),
            "flops_per_token": flops, "loss_first": res.ranks[0]["losses"][0], "loss_last": res.ranks[0]["losses"][-1]}


COLUMNS = [("model", "model"), ("train_type", "train type"), ("gpus", "GPUs"), ("seq", "seq"),
           ("tokens_per_s_per_gpu", "tokens/s/GPU"), ("mfu_pct", "MFU %"),
           ("max_memory_allocated_gib", "max_memory_allocated GiB"), ("est_gib", "estimate GiB"),
           ("step_s", "s/step"), ("status", "status")]


def verdicts(rows: list[dict], device: str) -> list[str]:
    notes = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["model"] == "qwen2.5-7b" and r["train_type"] == "qlora":
            mem = r["max_memory_allocated_gib"]
            notes.append(f"Goal 7B QLoRA peak < 7 GiB at seq {r['seq']}: {mem:.2f} GiB, {'met' if mem < 7 else 'MISSED'} "
                         "(ms-swift: 9.2 GB on an RTX 3090; torchtune Llama-3-8B QLoRA: 7.4 GiB).")
        if r["train_type"] in ("full", "lora") and r["gpus"] == 1 and "H100" in device:
            notes.append(f"Goal MFU > 40% ({r['model']} {r['train_type']}, one H100): {r['mfu_pct']:.1f}%, "
                         f"{'met' if r['mfu_pct'] > 40 else 'MISSED'} (torchtitan: 33-39% for Llama-3.1-8B on 8xH100).")
    return notes


def main(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks: --suite gpu needs CUDA, and torch.cuda.is_available() is False on this machine. "
              "Run it on a GPU machine (the device tool lends one to some tasks); --suite cpu runs anywhere.",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    peak = peak_tflops(device, args.peak_tflops)
    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    models = args.gpu_models or list(MODELS)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"benchmarks: unknown --gpu-models {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    rows = []
    for model in models:
        for train_type in args.train_types:
            rows.append(measure(model, train_type, args, peak, card_gib, args.out))
            print(f"{model} {train_type}: {rows[-1]}", flush=True)
    notes = verdicts(rows, device) + [
        "Random weights from the real configs (configs/models); rows packed to the sequence length; "
        "gradient checkpointing on; bf16; one micro-batch row per GPU.",
        f"MFU = model FLOPs per token (6N full, 4N LoRA/QLoRA, + 12·L·H·Q·T attention) x tokens/s per GPU "
        f"/ {peak:.0f} TFLOP/s (dense bf16 peak of {device}).",
        "max_memory_allocated: torch.cuda.max_memory_allocated of each rank (the largest shown); "
        "estimate: `swiftdist estimate` total for the same job.",
    ]
    meta = {"device": device, "gpus": args.gpus, "peak_bf16_tflops": peak, "steps": args.steps,
            "warmup_steps_excluded": args.warmup, "torch": torch.__version__}
    md, js = report.write(args.out, f"swiftdist GPU benchmark ({device})", COLUMNS, rows, notes, meta)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0

"""Host memory at load: `python -m benchmarks.load_memory --out DIR [--ranks 2 4] [--strategies ddp fsdp]`.

The job of issue 13: a random ~1.07B-parameter Llama saved as fp32 safetensors in 500 MB files
(built once in a temporary directory and deleted after, or `--model-dir`), LoRA, one step, N ranks,
every rank a `benchmarks.swiftdist_worker`. For each strategy and rank count: the largest rank's
peak RSS (ru_maxrss) once the model is loaded and wrapped, and after the step, beside DDP's with
as many ranks. Goals (for sharded strategies): peak ≤ 0.65× DDP's, and the load peak ≤ model
bytes / N + the largest safetensors file + 1.5 GiB. Model bytes are counted twice, as the files
hold them (fp32) and as the ranks hold them (the weight dtype: bf16 for LoRA under bf16); the
table checks the stricter.

Memory: DDP holds the whole model in every rank (~4.5 GiB per rank in fp32, about half in bf16),
so check `free -g` before asking for 4 DDP ranks.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import tempfile
from pathlib import Path

from benchmarks import report
from benchmarks.runner import Contender, launch
from benchmarks.spec import BenchSpec

# ~1.07B parameters: 20 layers of 43.3M (GQA attention with 4 KV heads, SwiGLU MLP of 5504) and untied
# embedding and head over SmolLM2's 49152-token vocabulary (100.7M each).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=32,
                num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)
GOAL_RATIO = 0.65
GOAL_SLACK_GIB = 1.5
GIB = 2**30

COLUMNS = [("strategy", "strategy"), ("ranks", "ranks"), ("load_peak_gib", "load peak RSS GiB (largest rank)"),
           ("load_bound_gib", "load bound GiB"), ("peak_gib", "peak RSS GiB (largest rank)"),
           ("ratio", "peak × DDP"), ("loss", "loss"), ("status", "status")]


def build_model(out: Path) -> Path:
    """A random LLAMA_1B with SmolLM2's tokenizer, fp32 safetensors in 500 MB files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from swiftdist.model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2"))
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="500MB")
    tokenizer.save_pretrained(out)
    return out


def model_bytes(model_dir: Path, weight_bytes: int) -> dict[str, float]:
    """GiB of the files, of the largest file, and of the weights as the ranks hold them."""
    import json

    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    n_params = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                numel = 1
                for n in f.get_slice(key).get_shape():
                    numel *= n
                n_params += numel
    return {"files_gib": index["metadata"]["total_size"] / GIB, "largest_file_gib": max(f.stat().st_size for f in files) / GIB,
            "held_gib": n_params * weight_bytes / GIB, "params": n_params}


def measure(model_dir: Path, out: Path, ranks: list[int], strategies: list[str], precision: str, timeout: int,
            steps: int = 1) -> tuple[list[dict], dict]:
    import torch

    from swiftdist.config import ModelConfig
    from swiftdist.model import weight_dtype

    sizes = model_bytes(model_dir, torch.finfo(weight_dtype(ModelConfig(train_type="lora"), precision)).bits // 8)
    rows = []
    for n in ranks:
        # One row per rank and step: the weights, not the activations, are what is measured.
        spec = BenchSpec(model=str(model_dir), train_type="lora", steps=steps, global_batch=n, precision=precision,
                         dataset=[f"self-cognition#{n * steps}"], max_length=128)
        spec_path = spec.save(out / "spec.json")
        ddp_peak = None
        for strategy in strategies:
            result = launch(Contender(f"{strategy}-{n}", "benchmarks.swiftdist_worker", n, [strategy]), spec_path,
                            out / "runs" / f"{strategy}-{n}", timeout)
            # Two readings of "model bytes": the strict one decides the status.
            bounds = [sizes[k] / n + sizes["largest_file_gib"] + GOAL_SLACK_GIB for k in ("held_gib", "files_gib")]
            row = {"strategy": strategy, "ranks": n, "load_bound_gib": min(bounds), "load_bound_files_gib": max(bounds),
                   "status": "ok" if result.ok else result.error}
            if result.ok:
                row.update(load_peak_gib=max(r["load_peak_rss_gib"] for r in result.ranks),
                           peak_gib=max(r["peak_rss_gib"] for r in result.ranks),
                           per_rank=[{k: r[k] for k in ("rank", "load_peak_rss_gib", "peak_rss_gib", "tensor_gib")}
                                     for r in result.ranks],
                           loss=result.ranks[0]["losses"][0])
                if strategy == "ddp":
                    ddp_peak = row["peak_gib"]
                row["ratio"] = row["peak_gib"] / ddp_peak if ddp_peak else None
                row["within_load_bound"] = row["load_peak_gib"] <= row["load_bound_gib"]
            rows.append(row)
    return rows, sizes


def notes(rows: list[dict], sizes: dict) -> list[str]:
    out = [f"model: {sizes['params'] / 1e9:.3f}B parameters, {sizes['files_gib']:.2f} GiB of fp32 safetensors "
           f"(largest file {sizes['largest_file_gib']:.2f} GiB), {sizes['held_gib']:.2f} GiB as the ranks hold it",
           f"load bound = held GiB / ranks + largest file + {GOAL_SLACK_GIB} GiB (with the files' GiB instead: "
           "load_bound_files_gib in results.json)"]
    for row in rows:
        if row["strategy"] == "ddp" or "ratio" not in row:
            continue
        ratio = "no DDP run to compare" if row["ratio"] is None else (
            f"{row['ratio']:.2f}× DDP ({'meets' if row['ratio'] <= GOAL_RATIO else 'misses'} ≤ {GOAL_RATIO}×)")
        bound = "within" if row["within_load_bound"] else "above"
        out.append(f"{row['strategy']}, {row['ranks']} ranks: peak {ratio}; load peak {row['load_peak_gib']:.2f} GiB, "
                   f"{bound} its bound of {row['load_bound_gib']:.2f} GiB")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_memory", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], help="ddp first: the others are compared with it")
    p.add_argument("--precision", default=None, help="default: what --precision auto picks here")
    p.add_argument("--model-dir", type=Path, default=None, help="an existing model dir (default: build LLAMA_1B, then delete it)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one run may take")
    p.add_argument("--steps", type=int, default=1,
                   help="steps per run; more than 1 shows what later steps hold (ZeRO-3's prefetch starts at step 2)")
    p.add_argument("--out", type=Path, default=Path("bench-load-memory"))
    args = p.parse_args(argv)

    from swiftdist.model import resolve_precision

    precision = args.precision or resolve_precision("auto")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.model_dir else Path(tempfile.mkdtemp(prefix="llama-1b-"))
    try:
        model_dir = args.model_dir or build_model(tmp)
        rows, sizes = measure(model_dir, args.out, args.ranks, args.strategies, precision, args.timeout, args.steps)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = {"date": datetime.date.today().isoformat(), "precision": precision, "train type": "lora (r 8, all linear)",
            "steps": args.steps, "rows per rank per step": 1, "host": "CPU, gloo, 1 OpenMP thread per rank"}
    md, _ = report.write(args.out, f"Host memory at load: 1.07B Llama, LoRA, {args.steps} step(s)", COLUMNS, rows, notes(rows, sizes), meta)
    print(md.read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

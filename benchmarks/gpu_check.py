"""Every GPU check of issue 13 in one run: `scripts/gpu_check.sh` (or `python -m benchmarks.gpu_check`).

Prints one `PASS|FAIL|SKIP <check>: <what was seen>` line per check as it finishes, then a table,
and writes OUT/results.md + OUT/results.json (+ each run's log under OUT/runs/):
- env:        the packages a run needs import, and which versions;
- precision:  what `--precision auto` and `--attn-impl auto` pick on this device;
- packing:    packed rows give each sample its solo logits, under sdpa and (if installed) flash-attn,
              a micro-batch of two packed rows (the batch size transformers' own detection misses);
- matrix:     every strategy at world size 1 with NCCL, full / LoRA / QLoRA in bf16, a few steps
              on a tiny model; a combination a strategy refuses by design is SKIP with its reason;
- memory:     Qwen2.5-7B QLoRA, seq 2048, gradient checkpointing: max_memory_allocated beside
              `swiftdist estimate` (random weights from configs/models, there is no hub);
- placement:  QLoRA after strategy.build_model, before wrap (issue 13 item 6): under fsdp and zero3
              torch.cuda.memory_allocated() is ~0 (the 4-bit model waits in host memory for wrap
              to partition it), under ddp it is the whole 4-bit model on the rank's GPU;
- long-context: the longest sequence Qwen2.5-7B QLoRA trains at on one GPU with the chunked loss,
              activation offload and full checkpointing (benchmarks/longest_sequence.py: 8k doubling,
              then one bisection step), on a 24 GiB budget (--card-gib; issue 14's workstation cards),
              `swiftdist estimate` beside it. It runs beside the matrix (tiny models: the GPU is idle);
- sp-throughput: tokens/s per GPU at 8k tokens with Ulysses SP=2 against SP=1 on the same 2 GPUs
              (issue 14, goal >= 0.95x); SKIP with one GPU (NCCL refuses two ranks on one GPU).
`--dry` (GPU_CHECK_DRY=1 in the script) runs the same checks on CPU with tiny models and short
rows, to catch a broken check before GPU time is spent on it; its figures mean nothing.

Time on one H200, estimated from what each check runs (not yet measured on one; SECONDS below): the
whole check must stay under 8 minutes, so `--budget` (450 s) is shared out: the long-context search
gets what the checks after it leave and stops itself at that deadline.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks import gpu_suite, long_context, report
from benchmarks.cpu_suite import swiftdist_strategies
from benchmarks.runner import Contender, _free_port, launch, median_after_warmup
from benchmarks.spec import BenchSpec

TRAIN_TYPES = ["full", "lora", "qlora"]
REQUIRED = ["transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "megatron.core", "datasets", "omegaconf"]
COLUMNS = [("check", "check"), ("status", "result"), ("detail", "what was seen"), ("seconds", "s")]
CHECKS = ["env", "precision", "packing", "placement", "matrix", "long-context", "memory", "throughput", "sp-throughput"]
# Seconds each check is expected to take on one H200 (imports, building random weights once, loads,
# steps; estimated from what runs, not measured yet). The long-context search runs beside the matrix.
SECONDS = {"env": 15, "precision": 2, "packing": 15, "placement": 35, "matrix": 180, "long-context": 230,
           "memory": 70, "throughput": 60, "sp-throughput": 5}
# The job: the chunked loss, activation offload, full checkpointing (the spec's), sdpa's fused causal kernel.
LONG_CONTEXT_FLAGS = ["--activation-offload", "true", "--loss-chunk-size", "1024", "--attn-impl", "sdpa"]


class Checks:
    """Collects one row per check and prints its PASS/FAIL/SKIP line as soon as it is known."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, check: str, status: str, detail: str, seconds: float | None = None, **figures) -> dict:
        row = {"check": check, "status": status, "detail": detail, "seconds": seconds, **figures}
        self.rows.append(row)
        print(f"{status} {check}: {detail}", flush=True)
        return row

    @property
    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)

    @property
    def passed(self) -> int:
        return sum(r["status"] == "PASS" for r in self.rows)

    def write(self, out: Path, device_name: str, meta: dict, seconds: float) -> tuple[Path, Path]:
        notes = [f"{self.passed} passed, {self.failed} failed, {len(self.rows) - self.passed - self.failed} "
                 f"skipped in {seconds:.0f} s"]
        if meta["dry"]:
            notes.append("Dry run on CPU with tiny models: it shows the checks work, its figures mean nothing.")
        return report.write(out, f"swiftdist GPU check ({device_name})", COLUMNS, self.rows, notes, meta)


def check_env(checks: Checks) -> bool:
    versions, missing = {"torch": torch.__version__}, []
    for name in REQUIRED + ["flash_attn"]:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # an extension that fails to load counts as missing, with its reason
            if name != "flash_attn":
                missing.append(f"{name} ({type(e).__name__}: {str(e)[:80]})")
    if missing:
        checks.add("env", "FAIL", "cannot import " + "; ".join(missing) + ": install swiftdist's dependencies "
                   "(scripts/setup.sh; TORCH_SPEC for a CUDA torch), or carry their wheels")
        return False
    checks.add("env", "PASS", ", ".join(f"{k} {v}" for k, v in versions.items()))
    return True


def check_precision(checks: Checks, dry: bool) -> None:
    from swiftdist.model import cpu_supports_bf16, resolve_attn_impl, resolve_precision

    chosen = resolve_precision("auto")
    attn = resolve_attn_impl("auto", 2048, precision=chosen)
    if dry:
        expected, seen = ("bf16" if cpu_supports_bf16() else "fp32"), "CPU"
    else:
        capability = torch.cuda.get_device_capability()
        expected = "bf16" if capability >= (8, 0) else "fp32"
        seen = (f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]}, "
                f"is_bf16_supported() {torch.cuda.is_bf16_supported()})")
    checks.add("precision", "PASS" if chosen == expected else "FAIL",
               f"auto picks {chosen} (expected {expected}) and {attn} attention on {seen}", precision=chosen, attn=attn)


def nccl_env(dry: bool) -> dict:
    """A MASTER_ADDR makes one process join an NCCL group (swiftdist.distributed) instead of a local gloo one."""
    return {} if dry else {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def _packed_vs_solo(model, tok, attn: str, device: torch.device) -> tuple[float, float, float]:
    """Over a micro-batch of two packed rows of two conversations each: the largest |packed - solo| logit
    gap, the gap when the samples may see each other, and the largest |solo logit|."""
    from swiftdist.config import DataConfig
    from swiftdist.data import Conversation, build_samples, collate, pack

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
             [("hi", "hello"), ("what is two plus two?", "four"), ("name a colour", "blue, like the sky"),
              ("and a fruit?", "a pear")]]
    singles = build_samples(tok, [Conversation(m, "gpu_check") for m in convs], DataConfig())
    rows = pack(singles[:2], 1024) + pack(singles[2:], 1024)
    padding_free = attn == "flash_attention_2"
    batch = collate(rows, tok.pad_token_id, packed=True, padding_free=padding_free)
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs).logits.float()
        packed = [out[0]] if padding_free else [out[r, :len(row.input_ids)] for r, row in enumerate(rows)]
        packed = torch.cat(packed)
        solo = torch.cat([model(input_ids=torch.tensor([s.input_ids], device=device)).logits[0].float()
                          for s in singles])
        # The same rows as ordinary causal rows: what a leak between samples looks like.
        leaky = model(input_ids=inputs["input_ids"]).logits.float()
        leaky = leaky[0] if padding_free else torch.cat([leaky[r, :len(row.input_ids)] for r, row in enumerate(rows)])
    return (packed - solo).abs().max().item(), (leaky - solo).abs().max().item(), solo.abs().max().item()


def check_packing(checks: Checks, device: torch.device, dry: bool) -> None:
    from transformers import AutoModelForCausalLM

    from swiftdist.model import load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2" if not dry else "tiny-llama")
    tok = load_tokenizer(path)
    has_flash = importlib.util.find_spec("flash_attn") is not None and not dry
    # Gaps relative to the largest logit: sdpa in fp32 differs by summation order only (~1e-6); flash-attn
    # computes in bf16 (8 bits of mantissa), where other kernel shapes move logits by a few 1e-3.
    for attn, dtype, tol in [("sdpa", torch.float32, 1e-4), ("flash_attention_2", torch.bfloat16, 3e-2)]:
        name = f"packing {attn}"
        if attn == "flash_attention_2" and not has_flash:
            checks.add(name, "SKIP", "flash-attn is not installed here" if not dry else "no flash-attn on CPU")
            continue
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device).eval()
            model.config.use_cache = False
            gap, leak, scale = _packed_vs_solo(model, tok, attn, device)
        except Exception as e:
            checks.add(name, "FAIL", f"{type(e).__name__}: {str(e)[:300]}", time.perf_counter() - t0)
            continue
        ok = gap <= tol * scale and leak > 10 * gap
        checks.add(name, "PASS" if ok else "FAIL",
                   f"max |packed - solo| logit {gap:.2g} of {scale:.3g} (allowed {tol:g} of it in {str(dtype)[6:]}); "
                   f"{leak:.2g} when samples may see each other", time.perf_counter() - t0, gap=gap, leak=leak)


def _matrix_run(strategy: str, spec: BenchSpec, out: Path, timeout: int, dry: bool) -> tuple[str, dict | str, float]:
    run_dir = out / "runs" / f"matrix-{strategy}-{spec.train_type}"
    run_dir.mkdir(parents=True, exist_ok=True)
    res = launch(Contender(f"{strategy} {spec.train_type}", "benchmarks.swiftdist_worker", 1, [strategy]),
                 spec.save(run_dir / "spec.json"), run_dir, timeout, env=nccl_env(dry))
    if not res.ok:
        return strategy, res.error, res.seconds
    return strategy, res.ranks[0], res.seconds


def check_matrix(checks: Checks, model_dir: Path, out: Path, dry: bool, parallel: int, timeout: int) -> None:
    steps, batch = 3, 2
    jobs = []
    for train_type in TRAIN_TYPES:
        spec = BenchSpec(model=str(model_dir), train_type=train_type, steps=steps, global_batch=batch,
                         dataset=[f"self-cognition#{steps * batch * 2}"], max_length=512, packing=True,
                         precision="bf16", lr=1e-3)
        runnable, refused = swiftdist_strategies(spec, 1)
        for strategy, reason in refused.items():
            if strategy != "auto":
                checks.add(f"matrix {strategy} {train_type}", "SKIP", f"refused by design: {reason}")
        jobs += [(s, spec) for s in runnable if s != "auto"]
    with ThreadPoolExecutor(parallel) as pool:  # one GPU, tiny models: several runs share it at once
        futures = [(spec.train_type, pool.submit(_matrix_run, s, spec, out, timeout, dry)) for s, spec in jobs]
        for train_type, future in futures:
            strategy, result, seconds = future.result()
            name = f"matrix {strategy} {train_type}"
            if isinstance(result, str):
                checks.add(name, "FAIL", result, seconds)
                continue
            losses = result["losses"]
            mem = result.get("max_memory_allocated_gib", 0.0)
            finite = all(math.isfinite(x) for x in losses)
            on_device = dry or mem > 0  # the model and batches were on the GPU, not left on the host
            detail = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps" + ("" if dry else f", {mem:.2f} GiB max allocated")
            checks.add(name, "PASS" if finite and on_device else "FAIL",
                       detail + ("" if finite else " (non-finite loss)") + ("" if on_device else " (nothing on the GPU)"),
                       seconds, loss_first=losses[0], loss_last=losses[-1], max_memory_allocated_gib=mem)


def _figures(row: dict) -> dict:
    """A gpu_suite row's figures, for the check's row (whose own status is PASS/FAIL)."""
    return {k: v for k, v in row.items() if k != "status"}


def _suite_args(steps: int, seq: int, timeout: int) -> Namespace:
    return Namespace(gpus=1, steps=steps, warmup=min(2, steps - 1), seq=seq, timeout=timeout)


def _model_dir(name: str, dry: bool) -> Path:
    """A tiny model on a dry run, else `name` with random weights from configs/models (built once)."""
    from swiftdist.model import CACHE_DIR, resolve_model_path

    return resolve_model_path(name) if dry else gpu_suite.random_model_dir(name, CACHE_DIR / "bench-models")



def check_memory(checks: Checks, out: Path, dry: bool, peak: float, timeout: int) -> None:
    """Goal: 7B QLoRA below 7 GiB at seq 2048; the estimate within 15% of the measured peak."""
    name, seq = ("tiny-qwen2", 256) if dry else ("qwen2.5-7b", 2048)
    t0 = time.perf_counter()
    model_dir = _model_dir(name, dry)
    os.environ.update(nccl_env(dry))  # the suite's runs start one at a time, from this process's environment
    row = gpu_suite.measure_dir(name, model_dir, "qlora", _suite_args(4, seq, timeout), peak, out)
    seconds = time.perf_counter() - t0
    check = f"memory {name} qlora seq {seq}"
    if row["status"] != "ok":
        checks.add(check, "FAIL", row["status"], seconds, **_figures(row))
        return
    mem, est = row["max_memory_allocated_gib"] or 0.0, row["est_gib"]
    off = (est - mem) / mem if mem else float("nan")
    ok = dry or (mem < 7 and abs(off) <= 0.15)
    checks.add(check, "PASS" if ok else "FAIL",
               f"max_memory_allocated {mem:.2f} GiB (goal < 7), swiftdist estimate {est:.2f} GiB ({off:+.0%}, goal within 15%)",
               seconds, **_figures(row))


def check_throughput(checks: Checks, out: Path, dry: bool, peak: float, timeout: int) -> None:
    """Goal: MFU above 40% for full fine-tuning and LoRA."""
    name, seq, steps = ("tiny-qwen2", 256, 3) if dry else ("qwen2.5-0.5b", 2048, 8)
    model_dir = _model_dir(name, dry)
    for train_type in ("lora", "full"):
        t0 = time.perf_counter()
        os.environ.update(nccl_env(dry))
        row = gpu_suite.measure_dir(name, model_dir, train_type, _suite_args(steps, seq, timeout), peak, out)
        check = f"throughput {name} {train_type} seq {seq}"
        if row["status"] != "ok":
            checks.add(check, "FAIL", row["status"], time.perf_counter() - t0, **_figures(row))
            continue
        mfu = row["mfu_pct"]
        checks.add(check, "PASS" if dry or mfu > 40 else "FAIL",
                   f"{row['tokens_per_s_per_gpu']:.0f} tokens/s, MFU {mfu:.1f}% (goal > 40%), "
                   f"{row['max_memory_allocated_gib'] or 0.0:.2f} GiB max allocated",
                   time.perf_counter() - t0, **_figures(row))


def check_placement(checks: Checks, out: Path, dry: bool, timeout: int) -> None:
    """Issue 13 item 6: QLoRA under fsdp and zero3 lands on no GPU before wrap partitions it; under ddp
    the whole 4-bit model loads straight onto the rank's GPU. One process per strategy, side by side."""
    name = "tiny-qwen2" if dry else "qwen2.5-0.5b"
    spec = BenchSpec(model=str(_model_dir(name, dry)), train_type="qlora", precision="bf16")
    whole_on_gpu = {"ddp": True, "fsdp": False, "zero3": False}

    def one(strategy: str):
        run_dir = out / "runs" / f"placement-{strategy}"
        run_dir.mkdir(parents=True, exist_ok=True)
        return launch(Contender(f"placement {strategy}", "benchmarks.load_placement", 1, [strategy]),
                      spec.save(run_dir / "spec.json"), run_dir, timeout, env=nccl_env(dry))

    with ThreadPoolExecutor(len(whole_on_gpu)) as pool:
        results = dict(zip(whole_on_gpu, pool.map(one, whole_on_gpu)))
    for strategy, res in results.items():
        check = f"placement {strategy} qlora"
        if not res.ok:
            checks.add(check, "FAIL", res.error, res.seconds)
            continue
        r = res.ranks[0]
        allocated, whole, devices = r["allocated_gib"], r["model_gib"], r["devices"]
        if dry:  # on a CPU host every strategy's load device is the host: the check runs, proves nothing
            ok, expected = devices == ["cpu"], "on the host (CPU dry run)"
        elif whole_on_gpu[strategy]:
            # >= 0.9: the allocator rounds blocks up and the 4-bit quantization state is not counted in `whole`.
            ok, expected = allocated >= 0.9 * whole and devices == ["cuda"], "the whole model on the GPU"
        else:
            # <= 1%: nothing of the model; a few small buffers may be created on the current device.
            ok, expected = allocated <= 0.01 * whole and devices == ["cpu"], "nothing on the GPU"
        checks.add(check, "PASS" if ok else "FAIL",
                   f"after build_model, before wrap: memory_allocated {allocated:.3f} GiB, a {whole:.2f} GiB 4-bit "
                   f"model, parameters on {'/'.join(devices)} (expected {expected}; load device {r['load_device']})",
                   res.seconds, allocated_gib=allocated, model_gib=whole)


def _long_context_estimate(model_dir: Path, spec: BenchSpec, tokens: int) -> float:
    """`swiftdist estimate`'s device total (GiB) for the long-context job at `tokens`, ddp on one device."""
    from swiftdist.config import ModelConfig
    from swiftdist.memory import estimate, model_stats

    cfg = ModelConfig(train_type=spec.train_type, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                      lora_dropout=spec.lora_dropout, gradient_checkpointing=True, activation_offload=True)
    chunk = int(LONG_CONTEXT_FLAGS[LONG_CONTEXT_FLAGS.index("--loss-chunk-size") + 1])
    return estimate(model_stats(str(model_dir), cfg, spec.precision, tokens, 1, chunk), "ddp", 1)["total"] / 2**30


def check_long_context(checks: Checks, out: Path, dry: bool, deadline: float, card_gib: float) -> None:
    """Issue 14: the longest sequence Qwen2.5-7B QLoRA trains at on one GPU with the chunked loss,
    activation offload and full checkpointing. `deadline`: time.monotonic() by which the search must end."""
    name, start, max_tokens = ("tiny-qwen2", 64, 256) if dry else ("qwen2.5-7b", 8192, 1 << 20)
    check = f"long-context {name} qlora"
    t0 = time.perf_counter()
    model_dir = _model_dir(name, dry)
    seconds = min(deadline - time.monotonic(), 3600)  # a dry run has no deadline
    if seconds < 90:  # loading 7B in 4 bits takes most of a minute, and the first length is always tried
        checks.add(check, "SKIP", f"{seconds:.0f} s left of the check's time budget; run it alone: "
                   "scripts/gpu_check.sh --only long-context")
        return
    cap = 0 if dry else card_gib
    spec = BenchSpec(model=str(model_dir), train_type="qlora", steps=1, global_batch=1, dataset=["self-cognition#4"],
                     max_length=512, precision="bf16", gradient_checkpointing=True)
    run_dir = out / "runs" / "long-context"
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["--start", str(start), "--max-tokens", str(max_tokens), "--deadline-s", str(int(seconds) - 10),
            "--card-gib", str(cap), "--", *LONG_CONTEXT_FLAGS]
    res = launch(Contender(check, "benchmarks.longest_sequence", 1, args), spec.save(run_dir / "spec.json"),
                 run_dir, int(seconds) + 30, env=nccl_env(dry))
    found = res.ranks[0] if res.ranks else {}
    longest, tried = found.get("longest"), found.get("tried", [])
    where = f" within a {cap:g} GiB cap" if cap else ""
    steps = ", ".join(f"{t['tokens']} {'ok' if t['ok'] else 'out of memory'}" for t in tried)
    if not longest:
        why = next((t["error"] for t in tried if not t["ok"]), res.error or "no length was tried")
        checks.add(check, "FAIL", f"not even {start} tokens trained{where}: {why}", time.perf_counter() - t0)
        return
    at = next(t for t in tried if t["tokens"] == longest)
    stopped = found.get("stopped") or f"stopped from outside: {res.error}"
    est = _long_context_estimate(model_dir, spec, longest)
    mem = at["max_memory_allocated_gib"]
    measured = "" if mem is None else f"max_memory_allocated {mem:.2f} GiB, swiftdist estimate {est:.2f} GiB ({(est - mem) / mem:+.0%}), "
    checks.add(check, "PASS", f"longest {longest} tokens{where} ({stopped}): {measured}{at['tokens_per_s']:.0f} tokens/s; "
               f"tried {steps}", time.perf_counter() - t0, longest_tokens=longest, card_gib=cap or None,
               max_memory_allocated_gib=mem, est_gib=est, tokens_per_s=at["tokens_per_s"], tried=tried)


def check_sp_throughput(checks: Checks, out: Path, dry: bool, timeout: int) -> None:
    """Issue 14: tokens/s per GPU at 8k tokens with Ulysses SP=2 against SP=1 (DDP) on the same GPUs; goal >= 0.95x."""
    gpus = 2
    check = "sp-throughput"
    if not dry and torch.cuda.device_count() < gpus:
        checks.add(check, "SKIP", f"needs {gpus} GPUs and torch.cuda.device_count() is {torch.cuda.device_count()}: "
                   "each rank of a sequence-parallel group needs a GPU of its own (NCCL refuses two ranks on one "
                   "GPU: 'Duplicate GPU detected')")
        return
    name, seq, steps = ("tiny-qwen2", 256, 3) if dry else ("qwen2.5-0.5b", 8192, 6)
    t0 = time.perf_counter()
    data = out / "runs" / f"sp-{seq}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    # One conversation of `seq` tokens per row, unpacked: sdpa's fused causal kernel with and without SP.
    data.write_text("".join(json.dumps(long_context.conversation(seq)) + "\n" for _ in range(steps * gpus)))
    spec = BenchSpec(model=str(_model_dir(name, dry)), train_type="lora", steps=steps, global_batch=gpus,
                     dataset=[str(data)], max_length=seq, packing=False, precision="bf16")
    per_gpu = {}
    for sp in (1, gpus):
        run_dir = out / "runs" / f"sp{sp}-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        res = launch(Contender(f"sp {sp}", "benchmarks.swiftdist_worker", gpus, ["ddp", "--sequence-parallel", str(sp)]),
                     spec.save(run_dir / "spec.json"), run_dir, timeout)
        if not res.ok:
            checks.add(check, "FAIL", f"SP={sp}: {res.error}", time.perf_counter() - t0)
            return
        # A step reads one row per data-parallel rank (world / SP of them), `seq` tokens each.
        rows = gpus // sp
        per_gpu[sp] = rows * seq / median_after_warmup(res.step_s, 2) / gpus
    ratio = per_gpu[gpus] / per_gpu[1]
    checks.add(check, "PASS" if dry or ratio >= 0.95 else "FAIL",
               f"{name} LoRA at {seq} tokens on {gpus} ranks: SP={gpus} {per_gpu[gpus]:.0f} tokens/s per rank, "
               f"SP=1 {per_gpu[1]:.0f}: {ratio:.2f}x (goal >= 0.95x)", time.perf_counter() - t0,
               tokens_per_s_per_gpu_sp=per_gpu[gpus], tokens_per_s_per_gpu=per_gpu[1], ratio=ratio)


def _guarded(checks: Checks, name: str, run) -> None:
    try:
        run()
    except Exception as e:  # one broken check must not cost the others their (GPU) time
        checks.add(name, "FAIL", f"the check itself raised {type(e).__name__}: {str(e)[:300]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry", action="store_true", help="run on CPU with tiny models (figures mean nothing)")
    p.add_argument("--parallel", type=int, default=None, help="matrix runs at a time (default: 6 on GPU, 1 dry)")
    p.add_argument("--timeout", type=int, default=240, help="seconds one training run may take")
    p.add_argument("--budget", type=float, default=450,
                   help="seconds the whole check may take (scripts/gpu_check.sh stops it at 470); the long-context "
                        "search gets what the checks after it leave")
    p.add_argument("--card-gib", type=float, default=24,
                   help="device memory the long-context search may use (0: the whole card)")
    p.add_argument("--only", nargs="*", default=None, choices=CHECKS, metavar="CHECK",
                   help=f"checks to run ({' '.join(CHECKS)}); default all")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("FAIL cuda: torch.cuda.is_available() is False on this machine; the GPU check needs CUDA "
              "(GPU_CHECK_DRY=1 runs the same checks on CPU with tiny models)", flush=True)
        return 2
    wanted = set(args.only or CHECKS)
    device = torch.device("cpu" if args.dry else "cuda")
    device_name = "CPU (dry run)" if args.dry else torch.cuda.get_device_name()
    peak = 1.0 if args.dry else gpu_suite.peak_tflops(device_name, None)
    meta = {"device": device_name, "torch": torch.__version__, "dry": args.dry, "peak_bf16_tflops": peak,
            "long_context_card_gib": args.card_gib or None}
    checks, t_start = Checks(), time.perf_counter()
    env_ok = check_env(checks)
    md, js = checks.write(args.out, device_name, meta, time.perf_counter() - t_start)
    if not env_ok:
        return 1
    from swiftdist.model import resolve_model_path

    # The long-context search ends where the checks after it (estimated) would still fit in the budget;
    # a dry run on CPU takes as long as it takes.
    after = sum(SECONDS[c] for c in CHECKS[CHECKS.index("long-context") + 1:] if c in wanted)
    deadline = time.monotonic() + (math.inf if args.dry else args.budget - after)
    steps = [
        ("precision", lambda: check_precision(checks, args.dry)),
        ("packing", lambda: check_packing(checks, device, args.dry)),
        ("placement", lambda: check_placement(checks, args.out, args.dry, args.timeout)),
        ("matrix", lambda: check_matrix(checks, resolve_model_path("tiny-qwen2"), args.out, args.dry,
                                        args.parallel or (1 if args.dry else 6), args.timeout)),
        ("memory", lambda: check_memory(checks, args.out, args.dry, peak, args.timeout)),
        ("throughput", lambda: check_throughput(checks, args.out, args.dry, peak, args.timeout)),
        ("sp-throughput", lambda: check_sp_throughput(checks, args.out, args.dry, args.timeout)),
    ]
    # The long-context search (one large model, GPU-bound) runs beside the matrix (many tiny models,
    # bound by process start-up), and ends before the memory check reuses its 7B model dir.
    background = None
    with ThreadPoolExecutor(1) as pool:
        for name, run in steps:
            if name == "matrix" and "long-context" in wanted:
                background = pool.submit(_guarded, checks, "long-context",
                                         lambda: check_long_context(checks, args.out, args.dry, deadline, args.card_gib))
            if name == "memory" and background is not None:
                background.result()
                background = None
            if name in wanted:
                _guarded(checks, name, run)
            # Written after every check: a run stopped by the script's time limit keeps what it measured.
            md, js = checks.write(args.out, device_name, meta, time.perf_counter() - t_start)
    md, js = checks.write(args.out, device_name, meta, time.perf_counter() - t_start)
    print()
    print(md.read_text())
    print(f"wrote {md} and {js}")
    # The closing line CI-style runners read: 'N passed, N failed'.
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

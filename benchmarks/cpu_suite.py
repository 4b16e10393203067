"""CPU suite: swiftdist against a hand-written loop and HF Trainer on the same job, side by side.

Contenders run one after another, round after round (`repeats`), so machine load drifting over
the run hits all of them alike; each ratio is taken within a round and the median over rounds is
reported. Absolute seconds on a shared machine are noise; the ratios are the result.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.estimates import estimated_gib
from benchmarks.runner import Contender, RunResult, launch, median_after_warmup
from benchmarks.spec import BenchSpec

HAND, HAND_DDP, HF = "hand-written loop", "hand-written loop, DDP", "HF Trainer"
SWIFT_1P = "swiftdist ddp, 1 process"
MS_SWIFT = "ms-swift"


def swiftdist_strategies(spec: BenchSpec, nproc: int) -> tuple[list[str], dict[str, str]]:
    """Registered strategies that accept this job on `nproc` ranks, and why the others refuse it."""
    from swiftdist import strategies
    from swiftdist.config import parse_config

    cfg = parse_config(spec.swiftdist_argv("ddp", nproc, tempfile.gettempdir()))
    runnable, refused = [], {}
    for name in strategies.names():
        reason = strategies.get_strategy_class(name).refusal(cfg, spec.precision)
        if reason:
            refused[name] = reason
        else:
            runnable.append(name)
    return runnable, refused


def contenders(spec: BenchSpec, nproc: int, only: list[str] | None, ms_swift: list[str] | None
               ) -> tuple[list[Contender], dict[str, str]]:
    """`ms_swift`: [python, ARGS...] for the ms-swift contender, or None to leave it out."""
    runnable, refused = swiftdist_strategies(spec, nproc)
    if only:
        refused.update({s: "not selected (--strategies)" for s in runnable if s not in only})
        runnable = [s for s in runnable if s in only]
    out = [Contender(HAND, "benchmarks.handloop", 1),
           Contender(HF, "benchmarks.hf_trainer", 1, reference=HAND),
           Contender(SWIFT_1P, "benchmarks.swiftdist_worker", 1, ["ddp"], reference=HAND)]
    if ms_swift:
        out.append(Contender(MS_SWIFT, "benchmarks.ms_swift", 1, ms_swift[1:], reference=HAND, python=ms_swift[0]))
    if nproc > 1:
        out.append(Contender(HAND_DDP, "benchmarks.handloop", nproc))
        out += [Contender(f"swiftdist {s}", "benchmarks.swiftdist_worker", nproc, [s], reference=HAND_DDP, layout=s)
                for s in runnable]
        if ms_swift:
            out.append(Contender(f"{MS_SWIFT}, DDP", "benchmarks.ms_swift", nproc, ms_swift[1:], reference=HAND_DDP,
                                 python=ms_swift[0]))
    return out, refused


def ms_swift_inputs(spec: BenchSpec, out_dir: Path, python: str | None) -> tuple[list[str] | None, str]:
    """The ms-swift contender's command tail (data file, model dir, system prompt), or why it cannot run.

    The data file holds the job's conversations in the order swiftdist's sampler draws them."""
    if not python:
        return None, "not run: no --ms-swift-python (an environment with ms-swift; see benchmarks/README.md)"
    from swiftdist.config import DataConfig
    from swiftdist.data import StepSampler, load_conversations
    from swiftdist.model import load_tokenizer, resolve_model_path

    if spec.packing:
        return None, "not run: the ms-swift contender runs unpacked rows only"
    model_dir = resolve_model_path(spec.model)
    # ms-swift's chatml template takes the system prompt the model's own template would insert.
    rendered = load_tokenizer(model_dir).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not rendered.startswith(head):
        return None, "not run: the model's chat template is not chatml with a default system prompt"
    system = rendered[len(head):rendered.index("<|im_end|>")]
    cfg = DataConfig(dataset=list(spec.dataset), max_length=spec.max_length)
    conversations = [c for d in spec.dataset for c in load_conversations(d, cfg, spec.seed)]
    order = StepSampler(len(conversations), spec.seed, spec.global_batch, 1, 0, 1).permutation(0)
    data = out_dir / "ms_swift_data.jsonl"
    data.write_text("".join(json.dumps({"messages": conversations[i].messages}) + "\n" for i in order))
    return [python, str(data), str(model_dir), system], ""


def run(spec: BenchSpec, out_dir: Path, nproc: int, repeats: int, warmup: int, only: list[str] | None,
        timeout: int, ms_swift_python: str | None = None,
        say=lambda line: print(line, flush=True)) -> tuple[list[dict], list[str]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec.save(out_dir / "spec.json")
    ms_swift, ms_swift_absent = ms_swift_inputs(spec, out_dir, ms_swift_python)
    field, refused = contenders(spec, nproc, only, ms_swift)
    # Rows up to 112 tokens: 128 bounds the activations of every batch.
    estimates = {n: estimated_gib(spec.model, spec, sorted({c.layout for c in field if c.nproc == n}), n, 128,
                                  spec.micro_batch(n)) for n in {c.nproc for c in field}}
    results: dict[str, list[RunResult]] = {c.name: [] for c in field}
    for r in range(repeats):
        for c in field:
            res = launch(c, spec_path, out_dir / "runs" / f"{c.name.replace(' ', '_').replace(',', '')}-r{r}", timeout)
            results[c.name].append(res)
            say(f"round {r + 1}/{repeats} {c.name} ({c.nproc}p): "
                + (f"{median_after_warmup(res.step_s, warmup):.3f} s/step" if res.ok else res.error))
    rows = []
    for c in field:
        est = estimates[c.nproc].get(c.layout, {})
        rows.append({**_row(c, results, warmup), "est_states_gib": est.get("states"), "est_total_gib": est.get("total")})
    rows += [{"contender": f"swiftdist {s}", "procs": nproc, "status": f"skipped: {why}"} for s, why in refused.items()]
    if ms_swift_absent:
        rows.append({"contender": MS_SWIFT, "procs": 1, "status": ms_swift_absent})
    return rows, _verdicts(rows, nproc)


def _row(c: Contender, results: dict[str, list[RunResult]], warmup: int) -> dict:
    runs = results[c.name]
    good = [r for r in runs if r.ok]
    row = {"contender": c.name, "procs": c.nproc, "reference": c.reference or "",
           "status": "ok" if len(good) == len(runs) else "; ".join(r.error for r in runs if not r.ok)}
    if not good:
        return row
    medians = [median_after_warmup(r.step_s, warmup) for r in good]
    row["step_s"] = statistics.median(medians)
    row["step_s_per_round"] = medians
    if c.reference:
        ratios = [median_after_warmup(mine.step_s, warmup) / median_after_warmup(ref.step_s, warmup)
                  for mine, ref in zip(runs, results[c.reference]) if mine.ok and ref.ok]
        row["ratio"] = statistics.median(ratios) if ratios else None
        row["ratio_per_round"] = ratios
    else:
        row["ratio"] = 1.0
    last = good[-1]
    row["peak_rss_gib"] = max(rk["peak_rss_gib"] for rk in last.ranks)
    row["tensor_gib"] = max(rk["tensor_gib"] for rk in last.ranks)
    row["per_rank"] = [{k: rk[k] for k in ("rank", "peak_rss_gib", "tensor_gib")} for rk in last.ranks]
    row["loss_first"], row["loss_last"] = last.ranks[0]["losses"][0], last.ranks[0]["losses"][-1]
    row["steps_timed"] = len(last.step_s) - min(warmup, len(last.step_s) - 1)
    return row


def _verdicts(rows: list[dict], nproc: int) -> list[str]:
    """The issue's goals, checked against this run's figures."""
    by = {r["contender"]: r for r in rows}
    notes = []
    ddp1 = by.get(SWIFT_1P, {})
    if ddp1.get("ratio") is not None:
        ok = "met" if ddp1["ratio"] <= 1.05 else "MISSED"
        notes.append(f"Goal swiftdist DDP overhead <= 1.05x the hand-written loop (1 process): "
                     f"{ddp1['ratio']:.3f}x, {ok}.")
        for peer in (HF, MS_SWIFT):
            other = by.get(peer, {})
            if other.get("ratio") is not None:
                ok = "met" if ddp1["ratio"] < other["ratio"] else "MISSED"
                notes.append(f"Goal faster than {peer} (1 process): swiftdist ddp {ddp1['ratio']:.3f}x vs {peer} "
                             f"{other['ratio']:.3f}x of the hand-written loop, {ok}; peak RSS "
                             f"{ddp1['peak_rss_gib']:.2f} vs {other['peak_rss_gib']:.2f} GiB.")
    ddp2 = by.get("swiftdist ddp", {})
    if ddp2.get("ratio") is not None:
        ok = "met" if ddp2["ratio"] <= 1.05 else "MISSED"
        notes.append(f"Goal swiftdist DDP overhead <= 1.05x the hand-written DDP loop ({nproc} processes): "
                     f"{ddp2['ratio']:.3f}x, {ok}.")
    # The layouts that exist to save memory per rank (auto picks one of them or ddp; megatron splits layers).
    sharded = [r for r in rows if r["contender"].startswith(("swiftdist fsdp", "swiftdist zero"))
               and "tensor_gib" in r]
    if "tensor_gib" in ddp2 and sharded:
        # Below means by more than noise: ZeRO-2 shards only LoRA's tiny grads and optimizer state.
        parts = [f"{r['contender'].removeprefix('swiftdist ')} {r['tensor_gib'] / ddp2['tensor_gib']:.2f}x"
                 + ("" if r["tensor_gib"] < 0.95 * ddp2["tensor_gib"] else " (not below)") for r in sharded]
        notes.append(f"Goal sharded per-rank memory below DDP's: tensors per rank relative to swiftdist ddp's "
                     f"{ddp2['tensor_gib']:.3f} GiB ({nproc} ranks): {', '.join(parts)}.")
    return notes

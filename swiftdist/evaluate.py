"""`swiftdist eval`: score a model (optionally + a LoRA adapter) on held-out conversations, and
with `--baseline` the model it was trained from, side by side.

    swiftdist eval --model smollm2 --adapter output/demo/final --dataset self-cognition general-qa --baseline
    swiftdist eval --from-run output/run            # the run's model, adapter and --val-split data
    torchrun --nproc-per-node 2 -m swiftdist.evaluate ...   # each rank scores its share

Metrics, per source file and over everything:
    loss, perplexity   token-mean cross-entropy on the assistant tokens (as training's eval_loss), exp(loss)
    exact_match        greedy answer to the last assistant turn == the reference (case and whitespace ignored)
    contains           the reference appears inside the answer (same normalisation)
    rouge_l            ROUGE-L F1 of answer vs reference (Google's rouge-score; CJK scored per character)
Answers are generated up to the reference's length + 16 tokens (at most --max-new-tokens): longer ones
cannot match exactly, and a `contains` hit must come within that span.
Writes eval.json (summary and every answer) and eval.png (bars, before vs after) to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swiftdist.config import DataConfig, parse_config
from swiftdist.data import Conversation, Sample, collate, load_conversations, split_conversations, tokenize
from swiftdist.errors import SwiftdistError
from swiftdist.loss import DEFAULT_CHUNK, output_head, target_count, token_loss_sum

log = logging.getLogger("swiftdist")

SCORES = ("exact_match", "contains", "rouge_l")  # in [0, 1], higher is better
METRICS = ("loss", "perplexity", *SCORES)
# A greedy answer longer than its reference by more than this many tokens cannot match it exactly,
# and a base model that rambles would otherwise cost --max-new-tokens steps per question.
ANSWER_SLACK_TOKENS = 16


# ---- what to evaluate --------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    adapter: str | None
    baseline: str | None  # None, BASE_WITHOUT_ADAPTER, or another model to score as "before"
    conversations: list[Conversation]
    max_length: int
    loss_chunk_size: int
    output_dir: Path


BASE_WITHOUT_ADAPTER = "base"


def _from_run(run_dir: Path):
    """A training run's config (its config.yaml) and what it produced."""
    config = run_dir / "config.yaml"
    if not config.exists():
        raise SwiftdistError(f"--from-run {run_dir}: no config.yaml there (give the output dir of a training run)")
    cfg = parse_config(["--config", str(config)])
    final = run_dir / "final"
    if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
        raise SwiftdistError(f"--from-run {run_dir}: {final} is missing (the run has not finished); "
                             "export a checkpoint with `swiftdist export` and pass --model/--adapter")
    return cfg, final


def make_plan(args) -> Plan:
    if args.from_run:
        run_dir = Path(args.from_run)
        cfg, final = _from_run(run_dir)
        data_cfg, seed, chunk = cfg.data, cfg.train.seed, cfg.train.loss_chunk_size
        full = cfg.model.train_type == "full"
        model = args.model or (str(final) if full else cfg.model.model)
        adapter = args.adapter or (None if full else str(final))
        # A full fine-tune's "before" is the model it started from.
        default_baseline = cfg.model.model if full else BASE_WITHOUT_ADAPTER
        output_dir = Path(args.output_dir or run_dir / "eval")
        if args.dataset:
            data_cfg.dataset = list(args.dataset)
            conversations = [c for spec in args.dataset for c in load_conversations(spec, data_cfg, seed)]
        else:
            if not data_cfg.val_split:
                raise SwiftdistError(f"{run_dir / 'config.yaml'}: data.val_split is 0, so the run held nothing "
                                     "out; pass --dataset to evaluate on other data")
            conversations = split_conversations(data_cfg, seed)[1]
    else:
        if not args.dataset:
            raise SwiftdistError("swiftdist eval: give --dataset FILE|builtin (or --from-run OUTPUT_DIR)")
        model, adapter, chunk = args.model or "smollm2", args.adapter, DEFAULT_CHUNK
        default_baseline = BASE_WITHOUT_ADAPTER if adapter else None
        data_cfg = DataConfig(dataset=list(args.dataset), model_name=args.model_name, model_author=args.model_author,
                              system=args.system, max_length=args.max_length or DataConfig.max_length)
        conversations = [c for spec in args.dataset for c in load_conversations(spec, data_cfg, args.seed)]
        output_dir = Path(args.output_dir or "eval")
    baseline = None
    if args.baseline is True:
        if default_baseline is None:
            raise SwiftdistError("--baseline without --adapter: name the model to compare with (--baseline MODEL)")
        baseline = default_baseline
    elif args.baseline:
        baseline = args.baseline
    chunk = chunk if args.loss_chunk_size is None else args.loss_chunk_size
    return Plan(model, adapter, baseline, conversations, args.max_length or data_cfg.max_length, chunk, output_dir)


# ---- scoring -----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


class _WordsAndCJK:
    """rouge-score's default tokenizer keeps only [a-z0-9] and so scores every Chinese answer 0;
    this one keeps words of any script and splits CJK text (written without spaces) per character."""

    _TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.casefold())


_rouge = None


def rouge_l(answer: str, reference: str) -> float:
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordsAndCJK())
    return _rouge.score(reference, answer)["rougeL"].fmeasure


@dataclass
class Scored:
    index: int  # position in the evaluation set
    source: str  # the file the conversation came from
    loss_sum: float  # summed cross-entropy over the conversation's assistant tokens
    tokens: int  # how many assistant tokens the loss counts
    answer: str
    exact_match: float
    contains: float
    rouge_l: float


def split_last_turn(conv: Conversation) -> tuple[list[dict], str]:
    """(the chat up to the last assistant turn, that turn's text): the prompt and the reference."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    return conv.messages[:last], conv.messages[last]["content"]


@torch.no_grad()
def conversation_loss(lm, tokenizer, conv: Conversation, max_length: int, chunk_size: int) -> tuple[float, int]:
    """(summed CE, token count) over every assistant turn, labelled exactly as training labels them."""
    ids, labels = tokenize(tokenizer, conv)
    ids, labels = ids[:max_length], labels[:max_length]
    batch = collate([Sample(ids, labels, list(range(len(ids))), [0])], tokenizer.pad_token_id, packed=False)
    n = target_count(batch).item()
    if n == 0:
        return 0.0, 0  # truncation removed every assistant token
    batch = {k: v.to(lm.device) for k, v in batch.items()}
    return token_loss_sum(lm, output_head(lm), batch, chunk_size).item(), n


@torch.no_grad()
def generate_answers(lm, tokenizer, prompts: list[list[dict]], budgets: list[int]) -> list[str]:
    """Greedy answers for a batch of chats (left-padded, so every row's answer starts at the same column)."""
    tokenizer.padding_side = "left"
    inputs = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_dict=True,
                                           return_tensors="pt").to(lm.device)
    out = lm.generate(**inputs, max_new_tokens=max(budgets), do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def score(lm, tokenizer, items: list[tuple[int, Conversation]], plan: Plan, max_new_tokens: int,
          batch_size: int) -> list[Scored]:
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts, references = zip(*(split_last_turn(conv) for _, conv in chunk))
        budgets = [min(max_new_tokens, len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + ANSWER_SLACK_TOKENS)
                   for ref in references]
        answers = generate_answers(lm, tokenizer, list(prompts), budgets)
        for (index, conv), reference, answer in zip(chunk, references, answers):
            loss_sum, tokens = conversation_loss(lm, tokenizer, conv, plan.max_length, plan.loss_chunk_size)
            results.append(Scored(
                index=index, source=Path(conv.where.rsplit(":", 1)[0]).name, loss_sum=loss_sum, tokens=tokens,
                answer=answer, exact_match=float(normalize(answer) == normalize(reference)),
                contains=float(normalize(reference) in normalize(answer)), rouge_l=rouge_l(answer, reference),
            ))
    return results


def summarize(scored: list[Scored]) -> dict:
    tokens = sum(s.tokens for s in scored)
    loss = sum(s.loss_sum for s in scored) / tokens if tokens else float("nan")
    summary = {"samples": len(scored), "loss": loss, "perplexity": math.exp(loss) if tokens else float("nan")}
    summary.update({name: sum(getattr(s, name) for s in scored) / len(scored) for name in SCORES})
    return summary


def summaries(scored: list[Scored]) -> dict:
    sources = sorted({s.source for s in scored})
    return {"all": summarize(scored), **{src: summarize([s for s in scored if s.source == src]) for src in sources}}


def score_everywhere(lm, tokenizer, plan: Plan, args, rank: int, world: int) -> list[Scored]:
    """Every rank scores every world-th conversation; all ranks get everyone's results, in order."""
    import torch.distributed as dist

    mine = list(enumerate(plan.conversations))[rank::world]
    local = score(lm, tokenizer, mine, plan, args.max_new_tokens, args.batch_size)
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return sorted((s for part in gathered for s in part), key=lambda s: s.index)


# ---- reporting ---------------------------------------------------------------------------------


def table(after: dict, before: dict | None) -> str:
    if before is None:
        return "\n".join(f"  {m:<12} {after[m]:>12.4f}" for m in METRICS)
    lines = [f"  {'metric':<12} {'before':>12} {'after':>12} {'change':>12}"]
    lines += [f"  {m:<12} {before[m]:>12.4f} {after[m]:>12.4f} {after[m] - before[m]:>+12.4f}" for m in METRICS]
    return "\n".join(lines)


def report(after: dict, before: dict | None) -> str:
    groups = list(after) if len(after) > 2 else ["all"]  # with one source, its table would repeat "all"
    return "\n\n".join(
        f"{'all' if g == 'all' else 'source ' + g} ({after[g]['samples']} conversations)\n"
        f"{table(after[g], before and before[g])}"
        for g in groups
    )


def plot(after: dict, before: dict | None, path: Path, labels: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("scores (higher is better)", SCORES), ("loss (lower is better)", ("loss",)),
              ("perplexity (lower is better)", ("perplexity",))]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1, 1]})
    runs = [(labels[0], before), (labels[1], after)] if before else [(labels[1], after)]
    width = 0.8 / len(runs)
    for ax, (title, names) in zip(axes, panels):
        for k, (label, summary) in enumerate(runs):
            xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, [summary["all"][n] for n in names], width, label=label)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    axes[0].set_ylim(0, 1.15)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(plan: Plan, after: list[Scored], before: list[Scored] | None, args) -> None:
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    after_summary = summaries(after)
    before_summary = summaries(before) if before else None
    samples = []
    for i, conv in enumerate(plan.conversations):
        prompt, reference = split_last_turn(conv)
        row = {"where": conv.where, "prompt": prompt, "reference": reference, "after": asdict(after[i])}
        if before:
            row["before"] = asdict(before[i])
        samples.append(row)
    result = {"model": plan.model, "adapter": plan.adapter, "baseline": plan.baseline,
              "max_new_tokens": args.max_new_tokens, "after": after_summary, "before": before_summary,
              "samples": samples}
    (plan.output_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    labels = ("before: " + ("base model" if plan.baseline == BASE_WITHOUT_ADAPTER else str(plan.baseline)),
              "after: " + (f"+ {plan.adapter}" if plan.adapter else plan.model))
    plot(after_summary, before_summary, plan.output_dir / "eval.png", labels)
    print(report(after_summary, before_summary))
    print(f"\nwritten: {plan.output_dir / 'eval.json'}, {plan.output_dir / 'eval.png'}")


# ---- entry point -------------------------------------------------------------------------------


def evaluate(plan: Plan, args, dist_info) -> None:
    from swiftdist.infer import load_for_inference

    log.info("evaluating %s%s on %d conversations (%d ranks)%s", plan.model,
             f" + {plan.adapter}" if plan.adapter else "", len(plan.conversations), dist_info.world_size,
             f"; baseline: {plan.baseline}" if plan.baseline else "")
    lm, tokenizer = load_for_inference(plan.model, plan.adapter, args.trust_remote_code)
    before = None
    if plan.baseline == BASE_WITHOUT_ADAPTER:
        with lm.disable_adapter():
            before = score_everywhere(lm, tokenizer, plan, args, dist_info.rank, dist_info.world_size)
    after = score_everywhere(lm, tokenizer, plan, args, dist_info.rank, dist_info.world_size)
    if plan.baseline and plan.baseline != BASE_WITHOUT_ADAPTER:
        del lm
        base_lm, base_tokenizer = load_for_inference(plan.baseline, None, args.trust_remote_code)
        before = score_everywhere(base_lm, base_tokenizer, plan, args, dist_info.rank, dist_info.world_size)
    if dist_info.is_main:
        write_results(plan, after, before, args)


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="swiftdist eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model dir or alias (default: smollm2, or the run's model)")
    parser.add_argument("--adapter", help="a LoRA adapter dir (e.g. output/final)")
    parser.add_argument("--dataset", nargs="+", help="files or built-ins, as for training (`path#N` samples N rows)")
    parser.add_argument("--from-run", metavar="OUTPUT_DIR",
                        help="a training run's output dir: its model, its final adapter, and (without --dataset) "
                             "the validation split its --val-split held out, rebuilt from its config.yaml")
    parser.add_argument("--baseline", nargs="?", const=True, metavar="MODEL",
                        help="also score the model before training (the base without the adapter, or MODEL) "
                             "and print before/after")
    parser.add_argument("--output-dir", help="where eval.json and eval.png go (default: ./eval, or OUTPUT_DIR/eval)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="longest answer generated (each is cut at its reference's length + 16 tokens anyway)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations generated at once per rank")
    parser.add_argument("--max-length", type=int, help="tokens per conversation for the loss (default: 1024 or the run's)")
    parser.add_argument("--loss-chunk-size", type=int,
                        help="labelled positions per LM-head chunk of the loss, 0: all at once, needed by models "
                             "that change logits after the head (default: 1024 or the run's)")
    parser.add_argument("--system", help="system prompt for conversations that have none")
    parser.add_argument("--model-name", default=DataConfig.model_name, help="fills {name} in self-cognition")
    parser.add_argument("--model-author", default=DataConfig.model_author, help="fills {author} in self-cognition")
    parser.add_argument("--seed", type=int, default=42, help="for `path#N` sampling")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SwiftdistError(f"--{name.replace('_', '-')} must be >= 1")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 0:
        raise SwiftdistError("--loss-chunk-size must be >= 0 (0: the whole loss at once)")
    return args


def main(argv: list[str] | None = None) -> int:
    from swiftdist.distributed import destroy, init_distributed, setup_logging

    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = make_plan(args)  # every user mistake surfaces before a process group or model exists
    if not plan.conversations:
        raise SwiftdistError("nothing to evaluate: the data has no conversations")
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        evaluate(plan, args, dist_info)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SwiftdistError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank hits the same mistake; one line is enough
            print(f"swiftdist: error: {e}", file=sys.stderr)
        sys.exit(2)

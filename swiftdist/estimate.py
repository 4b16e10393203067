"""`swiftdist estimate`: memory per device for each strategy, before launching anything.

The table of what swiftdist.memory computes from a model config alone (no weights are read and no
memory is allocated), in the order `--strategy auto` tries the strategies."""

from __future__ import annotations

import argparse

from swiftdist.config import TrainConfig
from swiftdist.memory import GIB, ModelStats, estimate, model_stats


def table(stats: ModelStats, strategies: list[str], world_size: int, gpu_memory_gib: float | None,
          refusals: dict[str, str]) -> str:
    cols = ["params", "buffers", "grads", "optimizer", "activations", "total", "host"]
    head = f"{'strategy':<14}" + "".join(f"{c:>12}" for c in cols) + ("   fits" if gpu_memory_gib else "")
    lines = [head]
    for name in strategies:
        if name in refusals:
            lines.append(f"{name:<14}  refused: {refusals[name]}")
            continue
        parts = estimate(stats, name, world_size)
        row = f"{name:<14}" + "".join(f"{_size(parts[c]):>12}" for c in cols)
        if gpu_memory_gib:
            row += "   yes" if parts["total"] <= gpu_memory_gib * GIB else "   no"
        lines.append(row)
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def main(argv: list[str]) -> int:
    from swiftdist.config import RunConfig, validate
    from swiftdist.strategies import get_strategy_class, names
    from swiftdist.strategies.auto import PREFERENCE

    parser = argparse.ArgumentParser(prog="swiftdist estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="HF model dir, its config.json, or an alias")
    parser.add_argument("--strategy", default="all", help="one strategy, or all (default)")
    parser.add_argument("--train-type", default="lora", choices=["full", "lora", "qlora"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--gpus", type=int, default=1, help="devices (ranks) the model is spread over")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="Ulysses group size: each device holds 1/N of every sequence's activations")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpointing-mode", default="full", choices=["full", "selective"],
                        help="with --gradient-checkpointing: every decoder layer, or every second one")
    parser.add_argument("--activation-offload", action="store_true",
                        help="with --gradient-checkpointing: what it saves is counted in host memory")
    parser.add_argument("--loss-chunk-size", type=int, default=TrainConfig.loss_chunk_size,
                        help="labelled positions per LM-head chunk in the loss (0: all at once)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per device: marks which strategies fit")
    args = parser.parse_args(argv)
    candidates = [n for n in PREFERENCE if n in names()]
    if args.strategy != "all":
        get_strategy_class(args.strategy)  # unknown names: the one-line error with the valid list
        candidates = [args.strategy]
    cfg = RunConfig()
    cfg.model.train_type, cfg.model.lora_rank = args.train_type, args.lora_rank
    cfg.model.gradient_checkpointing = args.gradient_checkpointing
    cfg.model.checkpointing_mode, cfg.model.activation_offload = args.checkpointing_mode, args.activation_offload
    cfg.train.loss_chunk_size = args.loss_chunk_size
    validate(cfg)  # e.g. --activation-offload without --gradient-checkpointing, in the run's own words
    # Under sequence parallelism a device keeps the activations of its 1/N of the tokens; attention in
    # between holds the whole sequence for 1/N of the heads, the same bytes.
    stats = model_stats(args.model, cfg.model, args.precision, -(-args.seq_len // args.sequence_parallel),
                        args.micro_batch, args.loss_chunk_size)
    refusals = {n: r for n in candidates if (r := get_strategy_class(n).refusal(cfg, args.precision))}
    print(f"{args.model}: {stats.n_params / 1e9:.3f}B params, {stats.n_trainable / 1e6:.2f}M trainable "
          f"({args.train_type}, {args.precision}); seq {args.seq_len} x micro-batch {args.micro_batch}"
          f"{f', sequence parallel {args.sequence_parallel}' if args.sequence_parallel > 1 else ''}"
          f"{f', {args.checkpointing_mode} gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', activation offload' if args.activation_offload else ''}"
          f"; loss chunks of {args.loss_chunk_size or 'all'} positions; {args.gpus} device(s); "
          "bytes per device")
    print(table(stats, candidates, args.gpus, args.gpu_memory, refusals))
    return 0

"""Strategy registry: name -> class, imported lazily so a DDP run never imports DeepSpeed."""

from __future__ import annotations

import importlib

from swiftdist.errors import SwiftdistError

_REGISTRY = {
    "ddp": "ddp:DDPStrategy",
    "megatron": "megatron.strategy:MegatronStrategy",
    "fsdp": "fsdp:FSDPStrategy",
    "fsdp-offload": "fsdp:FSDPOffloadStrategy",
    "zero2": "deepspeed:ZeroStrategy",
    "zero2-offload": "deepspeed:Zero2OffloadStrategy",
    "zero3": "deepspeed:Zero3Strategy",
    "zero3-offload": "deepspeed:Zero3OffloadStrategy",
}
AUTO = "auto"  # not a strategy: choose() picks one of the above by memory


def names() -> list[str]:
    """The strategies (backends) by name; `auto` is not one of them."""
    return list(_REGISTRY)


def get_strategy_class(name: str):
    if name not in _REGISTRY:
        raise SwiftdistError(f"--strategy {name}: unknown strategy; choose one of: {', '.join([*_REGISTRY, AUTO])}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"swiftdist.strategies.{module}"), cls)


def choose(cfg, precision: str, dist_info):
    """The strategy class that runs `cfg`: --strategy looked up (`auto` picks one by memory), or a
    SwiftdistError saying why it cannot run this train type x precision x layout."""
    from swiftdist.strategies import auto

    name = cfg.parallel.strategy
    cls = auto.choose(cfg, precision, dist_info) if name == AUTO else get_strategy_class(name)
    reason = cls.refusal(cfg, precision)
    if reason:
        raise SwiftdistError(f"--strategy {cls.name} --train-type {cfg.model.train_type} --precision {precision}: {reason}")
    return cls


def owned_flags() -> dict[str, str]:
    """Every strategy's owned_flags: flag -> the reason the other strategies refuse it."""
    flags = {}
    for name in names():
        flags.update(get_strategy_class(name).owned_flags)
    return flags


def support_matrix() -> str:
    """Markdown table of which strategy runs which train type x precision, from each strategy's own
    refusal(); the README embeds it and a test keeps the two equal."""
    from swiftdist.config import RunConfig

    combos = [(t, p) for t in ("full", "lora", "qlora") for p in ("bf16", "fp32")]
    lines = ["| strategy | " + " | ".join(f"{t} {p}" for t, p in combos) + " |",
             "|---|" + "---|" * len(combos)]
    reasons: list[str] = []
    for name in names():
        cells = []
        for train_type, precision in combos:
            cfg = RunConfig()
            cfg.model.train_type = train_type
            reason = get_strategy_class(name).refusal(cfg, precision)
            if reason and reason not in reasons:
                reasons.append(reason)
            cells.append(f"no ({reasons.index(reason) + 1})" if reason else "yes")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"({i}) {r}" for i, r in enumerate(reasons, 1)]
    return "\n".join(lines).rstrip() + "\n"

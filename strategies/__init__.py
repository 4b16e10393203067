"""Strategy registry: name -> class, imported lazily so a DDP run never imports DeepSpeed."""

from __future__ import annotations

import importlib

from swiftdist.errors import SwiftdistError

_REGISTRY = {
    "ddp": "ddp:DDPStrategy",
    "megatron": "megatron:MegatronStrategy",
    "fsdp": "fsdp:FSDPStrategy",
    "fsdp-offload": "fsdp:FSDPOffloadStrategy",
    "zero2": "deepspeed:ZeroStrategy",
    "zero2-offload": "deepspeed:Zero2OffloadStrategy",
    "zero3": "deepspeed:Zero3Strategy",
    "zero3-offload": "deepspeed:Zero3OffloadStrategy",
    "auto": "auto:AutoStrategy",
}


def names() -> list[str]:
    return list(_REGISTRY)


def get_strategy_class(name: str):
    if name not in _REGISTRY:
        raise SwiftdistError(f"--strategy {name}: unknown strategy; choose one of: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"swiftdist.strategies.{module}"), cls)

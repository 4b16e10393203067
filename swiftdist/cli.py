"""`swiftdist` console script: sft, infer, eval, serve, export, estimate, launch, slurm, env.

User mistakes (SwiftdistError) print as one line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import sys

from swiftdist.errors import SwiftdistError

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "sft": ("swiftdist.sft", "main", "fine-tune (same as python -m swiftdist.sft)"),
    "infer": ("swiftdist.infer", "main", "chat with a model or model + adapter"),
    "eval": ("swiftdist.evaluate", "main", "score a model (+ adapter) on held-out chats; --baseline: before vs after"),
    "serve": ("swiftdist.serve", "main", "OpenAI-compatible chat API for a model and its adapters"),
    "export": ("swiftdist.export", "main", "checkpoint -> plain HF safetensors dir (--merge-lora merges LoRA/QLoRA)"),
    "estimate": ("swiftdist.estimate", "main", "memory per device for each strategy, from a model config alone"),
    "launch": ("swiftdist.launchers.torchrun", "main", "torchrun the training on this machine (one of several with --nnodes)"),
    "slurm": ("swiftdist.launchers.slurm", "main", "render|submit|status|cancel a SLURM batch job"),
    "strategies": ("swiftdist.cli", "strategies", "which strategy runs which train type x precision (markdown)"),
    "env": ("swiftdist.cli", "env", "versions and devices on this machine"),
}


def env(argv: list[str]) -> int:
    import torch

    from swiftdist.model import cpu_supports_bf16

    print(f"torch {torch.__version__}, cuda: {torch.cuda.is_available()}, cpu bf16: {cpu_supports_bf16()}")
    for name in ("transformers", "peft", "bitsandbytes", "deepspeed", "megatron.core", "datasets", "omegaconf", "wandb"):
        try:
            module = importlib.import_module(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as e:  # an optional backend that fails to import is worth reporting, not fatal
            print(f"{name}: not importable ({type(e).__name__})")
    return 0


def strategies(argv: list[str]) -> int:
    from swiftdist.strategies import support_matrix

    print(support_matrix(), end="")
    return 0


def usage() -> str:
    lines = ["usage: swiftdist <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {info[2]}" for name, info in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"swiftdist: error: unknown command '{argv[0]}'\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    try:
        return getattr(importlib.import_module(module), func)(argv[1:])
    except SwiftdistError as e:
        print(f"swiftdist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

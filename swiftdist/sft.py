"""Supervised fine-tuning entry point: `python -m swiftdist.sft ...` or `torchrun ... -m swiftdist.sft ...`.

Parse the config, join the process group, train, clean up — whatever happens.
"""

from __future__ import annotations

import os
import sys

from swiftdist import preemption
from swiftdist.config import help_text, parse_config
from swiftdist.errors import SwiftdistError


def run(argv: list[str]) -> int:
    cfg = parse_config(argv)
    from swiftdist.distributed import destroy, init_distributed, setup_logging

    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    trainer = None
    try:
        from swiftdist.trainer import Trainer

        trainer = Trainer(cfg, dist_info)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.strategy.close()  # e.g. megatron's CPU patches and model-parallel groups
        destroy()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch is imported (seconds): a stop request during startup is kept, not fatal.
    preemption.install()
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    try:
        return run(argv)
    except SwiftdistError as e:
        # Every rank hits the same user error; one line from rank 0 is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"swiftdist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""swiftdist on the benchmark job: `[torchrun ...] python -m benchmarks.swiftdist_worker SPEC.json RUN_DIR STRATEGY`.

The same steps as `python -m swiftdist.sft` (parse, join the group, Trainer(...).train()), kept in
this process so the probe can count what the trainer still holds after its last step.
"""

from __future__ import annotations

import os
import sys

from benchmarks.probe import peak_rss_gib, report
from benchmarks.spec import BenchSpec
from swiftdist.config import parse_config
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.trainer import Trainer


def main(spec_path: str, run_dir: str, strategy: str) -> None:
    spec = BenchSpec.load(spec_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = parse_config(spec.swiftdist_argv(strategy, world, os.path.join(run_dir, "output")))
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        trainer = Trainer(cfg, dist_info)
        loaded = peak_rss_gib()
        trainer.train()
        steps = [r for r in trainer.metrics.history if "step_s" in r]
        report(run_dir, [r["step_s"] for r in steps], [r["loss"] for r in steps], load_peak_rss_gib=loaded,
               tokens_per_s=[r["tokens_per_s"] for r in steps])
    finally:
        destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])

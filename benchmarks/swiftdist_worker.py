"""swiftdist on the benchmark job: `[torchrun ...] python -m benchmarks.swiftdist_worker SPEC.json RUN_DIR STRATEGY [FLAG ...]`.

The same steps as `python -m swiftdist.sft` (parse, join the group, Trainer(...).train()), kept in
this process so the probe can count what the trainer still holds after its last step. FLAGs are
further `swiftdist sft` flags (a variant of the job, e.g. `--gradient-checkpointing`).
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks.probe import peak_rss_gib, report
from benchmarks.spec import BenchSpec
from swiftdist.config import parse_config
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.trainer import Trainer


def main(spec_path: str, run_dir: str, strategy: str, *flags: str) -> None:
    spec = BenchSpec.load(spec_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = parse_config(spec.swiftdist_argv(strategy, world, os.path.join(run_dir, "output")) + list(flags))
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        trainer = Trainer(cfg, dist_info)
        loaded = peak_rss_gib()
        cpu = time.process_time()
        trainer.train()
        cpu = time.process_time() - cpu
        steps = [r for r in trainer.metrics.history if "step_s" in r]
        # CPU seconds of this process per step over the whole loop: on a shared machine less
        # sensitive to other load than wall time (one OpenMP thread per rank).
        report(run_dir, [r["step_s"] for r in steps], [r["loss"] for r in steps], load_peak_rss_gib=loaded,
               tokens_per_s=[r["tokens_per_s"] for r in steps], cpu_s_per_step=cpu / max(len(steps), 1))
    finally:
        destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])

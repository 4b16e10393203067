"""Run several `swiftdist.sft` argument lists one after another in one torchrun.

    torchrun --nproc-per-node 2 tests/multiproc/sft_many.py RUNS.json

RUNS.json holds a list of argument lists. Each run parses its arguments and builds a Trainer as
`python -m swiftdist.sft` does; only the process group and the imports (torch, transformers,
DeepSpeed: ~10 s per process) are shared, which keeps a many-strategy test within its budget.
After each run every rank takes part in one forward pass of a fixed probe batch (the model may be
sharded) and rank 0 saves its logits as OUTPUT_DIR/probe_logits.pt, for reload comparisons, and
the class of the LM head it trained with as OUTPUT_DIR/head.txt.
"""

import json
import sys

import torch

from swiftdist.config import parse_config
from swiftdist.data import collate
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.trainer import Trainer


@torch.no_grad()
def probe_logits(trainer: Trainer) -> torch.Tensor:
    pad = trainer.tokenizer.pad_token_id
    batch = collate([trainer.data.train[i] for i in range(2)], pad, trainer.cfg.data.packing)
    batch = {k: v.to(trainer.dist.device) for k, v in batch.items() if k != "labels"}
    model = trainer.strategy.model
    model.eval()
    with trainer.strategy.autocast():
        return model(**batch).logits.float().cpu()


def main() -> None:
    runs = json.load(open(sys.argv[1]))
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        for argv in runs:
            trainer = Trainer(parse_config(argv), dist_info)
            assert trainer.train() == 0
            logits = probe_logits(trainer)
            if dist_info.is_main:
                torch.save(logits, trainer.output_dir / "probe_logits.pt")
                (trainer.output_dir / "head.txt").write_text(type(trainer.strategy.head).__name__)
            del trainer
    finally:
        destroy()


if __name__ == "__main__":
    main()

"""Build models under --strategy fsdp on every rank and compare them with the eager load on rank 0.

    torchrun --nproc-per-node 2 tests/multiproc/sharded_load_driver.py CASES.json OUT.json

CASES.json: a list of {"name", "model" (a dir or alias), "strategy" (fsdp or fsdp-offload),
"train_type", "precision"}. For each case
every rank builds and wraps the model as the trainer does (same seed); rank 0 gathers the full
state dict and compares it, and the buffers and the CPU generator's state after building, with
`load_model` (from_pretrained, whole, no strategy) under the same seed. OUT.json gets, per case:
whether the sliced path was taken and every difference found. OUT.json.threads-rankN: the gloo
threads still running on rank N after it closed every strategy (as the trainer does) and destroyed
the process groups, which should be none.
"""

import gc
import json
import os
import sys

import torch

from swiftdist.config import RunConfig
from swiftdist.distributed import destroy, init_distributed, setup_logging
from swiftdist.model import load_model, resolve_model_path
from swiftdist.strategies import get_strategy_class


def compare(case: dict, dist_info) -> dict:
    cfg = RunConfig()
    cfg.model.train_type, cfg.parallel.strategy = case["train_type"], case["strategy"]
    path = resolve_model_path(case["model"])
    strategy = get_strategy_class(case["strategy"])(cfg, dist_info, case["precision"])
    torch.manual_seed(cfg.train.seed)
    model = strategy.build_model(path)
    sliced = strategy._initial is not None
    rng_after = torch.get_rng_state()
    strategy.wrap(model)
    state = strategy.full_state_dict(trainable_only=False)
    strategy.close()
    if not dist_info.is_main:
        return {}
    torch.manual_seed(cfg.train.seed)
    eager = load_model(cfg.model, path, case["precision"])
    want = eager.state_dict()
    differ = sorted(k for k in want.keys() & state.keys()
                    if want[k].dtype != state[k].dtype or not torch.equal(want[k], state[k]))
    buffers = dict(model.named_buffers())
    differ += sorted(f"buffer {k}" for k, b in eager.named_buffers() if not torch.equal(b, buffers[k].cpu()))
    return {"sliced": sliced, "missing": sorted(want.keys() - state.keys()), "extra": sorted(state.keys() - want.keys()),
            "differ": differ, "rng_equal": torch.equal(rng_after, torch.get_rng_state()), "n_tensors": len(want)}


def main() -> None:
    cases, out = json.load(open(sys.argv[1])), sys.argv[2]
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        results = {case["name"]: compare(case, dist_info) for case in cases}
        if dist_info.is_main:
            json.dump(results, open(out, "w"), indent=1)
    finally:
        destroy()
    gc.collect()  # the engines' reference cycles
    threads = sorted(name for name in map(_thread_name, os.listdir("/proc/self/task")) if "gloo" in name)
    json.dump(threads, open(f"{out}.threads-rank{dist_info.rank}", "w"))


def _thread_name(tid: str) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


if __name__ == "__main__":
    main()

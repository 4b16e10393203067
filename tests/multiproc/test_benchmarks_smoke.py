"""The CPU benchmark suite end to end at tiny sizes, so it cannot rot. Figures are not asserted."""

import json
import sys

import pytest

from tests.helpers import run_cmd

pytestmark = pytest.mark.slow


def test_cpu_suite_writes_table_and_json_with_every_contender(tiny_llama, tmp_path):
    out = tmp_path / "bench"
    run_cmd([sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--model", "tiny-llama", "--steps", "2",
             "--procs", "2", "--strategies", "ddp", "--out", str(out)])  # run_cmd: OMP_NUM_THREADS=1, offline
    rows = {r["contender"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    ran = ["hand-written loop", "HF Trainer", "swiftdist ddp, 1 process", "hand-written loop, DDP", "swiftdist ddp"]
    for name in ran:
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["step_s"] > 0 and rows[name]["ratio"] > 0 and rows[name]["tensor_gib"] > 0
        assert len(rows[name]["per_rank"]) == rows[name]["procs"]
    # The others are listed with the reason they did not run.
    assert rows["swiftdist fsdp"]["status"].startswith("skipped")
    assert rows["ms-swift"]["status"].startswith("not run")
    table = (out / "results.md").read_text()
    for name in ran:
        assert f"| {name} |" in table
    # Same data, same initial weights, same precision: every contender starts from the same loss.
    first = [rows[name]["loss_first"] for name in ran]
    assert max(first) - min(first) < 0.05, first

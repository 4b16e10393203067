"""The CPU benchmark suite end to end at tiny sizes, so it cannot rot. Figures are not asserted."""

import json
import os
import sys

import pytest

from tests.helpers import run_cmd

pytestmark = pytest.mark.slow


def test_cpu_suite_writes_table_and_json_with_every_contender(tiny_llama, tmp_path):
    out = tmp_path / "bench"
    # scripts/test.sh builds ms-swift's environment and sets MS_SWIFT_PYTHON; without it, ms-swift is listed as not run.
    ms_swift = os.environ.get("MS_SWIFT_PYTHON")
    run_cmd([sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--model", "tiny-llama", "--steps", "2",
             "--procs", "2", "--strategies", "ddp", "--out", str(out), "--ms-swift-python", ms_swift or ""])
    rows = {r["contender"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    ran = ["hand-written loop", "HF Trainer", "swiftdist ddp, 1 process", "hand-written loop, DDP", "swiftdist ddp"]
    ran += ["ms-swift", "ms-swift, DDP"] if ms_swift else []
    for name in ran:
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["step_s"] > 0 and rows[name]["ratio"] > 0 and rows[name]["tensor_gib"] > 0
        assert len(rows[name]["per_rank"]) == rows[name]["procs"]
    # The others are listed with the reason they did not run.
    assert rows["swiftdist fsdp"]["status"].startswith("skipped")
    if not ms_swift:
        assert rows["ms-swift"]["status"].startswith("not run")
    table = (out / "results.md").read_text()
    for name in ran:
        assert f"| {name} |" in table
    # Same data, same initial weights, same precision: every contender starts from the same loss.
    first = [rows[name]["loss_first"] for name in ran]
    assert max(first) - min(first) < 0.05, first

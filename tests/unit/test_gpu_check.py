"""scripts/gpu_check.sh's checks, on CPU: the CUDA gate, the cheap checks' dry mode, the SP check's
SKIP on one GPU, the long-context search's logic (with a fake step), and (slow) the placement and
long-context checks end to end on a tiny model.

The other training checks (matrix, memory, throughput) start processes and take minutes on CPU; they
are run by hand with `GPU_CHECK_DRY=1 scripts/gpu_check.sh`, not here.
"""

import math

import pytest
import torch

from benchmarks import gpu_check


def test_without_cuda_it_stops_with_a_message(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal without it is what is tested here")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAIL cuda:") and "GPU_CHECK_DRY=1" in line and "\n" not in line


def test_packing_check_passes_for_sdpa_and_skips_flash_on_cpu(capsys):
    checks = gpu_check.Checks()
    gpu_check.check_packing(checks, torch.device("cpu"), dry=True)
    by_name = {r["check"]: r for r in checks.rows}
    sdpa = by_name["packing sdpa"]
    assert sdpa["status"] == "PASS", sdpa["detail"]
    assert sdpa["gap"] < 1e-4 < sdpa["leak"]  # packed rows match solo rows; ordinary causal rows do not
    assert by_name["packing flash_attention_2"]["status"] == "SKIP"
    assert "PASS packing sdpa:" in capsys.readouterr().out  # one line per check, printed as it finishes


def test_precision_check_states_the_choice():
    checks = gpu_check.Checks()
    gpu_check.check_precision(checks, dry=True)
    (row,) = checks.rows
    assert row["status"] == "PASS" and row["precision"] in ("bf16", "fp32")


def test_sp_throughput_is_skipped_with_one_gpu_saying_why(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    checks = gpu_check.Checks()
    gpu_check.check_sp_throughput(checks, tmp_path, dry=False, timeout=1)
    (row,) = checks.rows
    assert row["status"] == "SKIP" and "needs 2 GPUs" in row["detail"] and "Duplicate GPU" in row["detail"]


def _fake_steps(fits_up_to: int, seconds_per_token: float = 0.0):
    tried = []

    def step(tokens):
        tried.append(tokens)
        if tokens > fits_up_to:
            return {"tokens": tokens, "ok": False, "error": "CUDA out of memory"}
        return {"tokens": tokens, "ok": True, "step_s": tokens * seconds_per_token}

    return step, tried


def test_longest_sequence_doubles_until_out_of_memory_then_bisects_once():
    from benchmarks.longest_sequence import search

    step, tried = _fake_steps(fits_up_to=50_000)
    written = []  # what a check stopping the search from outside would read after each length
    result = search(step, 8192, 1 << 20, deadline=math.inf, write=lambda r: written.append(r["longest"]))
    assert tried == [8192, 16384, 32768, 65536, 49152]  # 65536 fails; (32768 + 65536) / 2 fits
    assert result["longest"] == 49152 and result["stopped"] == "out of memory at 65536 tokens"
    assert written[:4] == [8192, 16384, 32768, 32768] and written[-1] == 49152

    step, tried = _fake_steps(fits_up_to=40_000)
    result = search(step, 8192, 1 << 20, deadline=math.inf, write=lambda r: None)
    assert result["longest"] == 32768 and result["stopped"] == "out of memory at 49152 tokens"

    step, tried = _fake_steps(fits_up_to=0)
    assert search(step, 8192, 1 << 20, deadline=math.inf, write=lambda r: None)["longest"] is None
    assert tried == [8192]


def test_longest_sequence_stops_at_the_deadline_and_at_max_tokens():
    import time

    from benchmarks.longest_sequence import search

    # 8192 "took" 0.4 s and 16384 0.8 s: 32768 would take ~3x that, more than the 2 s left.
    step, tried = _fake_steps(fits_up_to=1 << 30, seconds_per_token=5e-5)
    result = search(step, 8192, 1 << 20, deadline=time.monotonic() + 2.0, write=lambda r: None)
    assert tried == [8192, 16384] and result["longest"] == 16384 and result["stopped"].startswith("time")

    step, tried = _fake_steps(fits_up_to=1 << 30)
    result = search(step, 64, 256, deadline=math.inf, write=lambda r: None)
    assert tried == [64, 128, 256] and result["stopped"] == "reached --max-tokens 256"


@pytest.mark.slow
def test_placement_check_runs_dry(tmp_path):
    # Three one-rank processes side by side on tiny-qwen2 (~30-40 s here): on a CPU host every
    # strategy loads on the host, so this shows the check runs end to end, not the GPU placement.
    checks = gpu_check.Checks()
    gpu_check.check_placement(checks, tmp_path, dry=True, timeout=300)
    by_name = {r["check"]: r for r in checks.rows}
    for strategy in ("ddp", "fsdp", "zero3"):
        row = by_name[f"placement {strategy} qlora"]
        assert row["status"] == "PASS" and row["allocated_gib"] == 0.0 and row["model_gib"] > 0, row


@pytest.mark.slow
def test_long_context_check_runs_dry(tmp_path):
    # One training process on tiny-qwen2 (~20-30 s here), lengths 64 to 256, the flags.
    checks = gpu_check.Checks()
    gpu_check.check_long_context(checks, tmp_path, dry=True, deadline=math.inf, card_gib=24)
    (row,) = checks.rows
    assert row["status"] == "PASS", row["detail"]
    assert row["longest_tokens"] == 256 and [t["tokens"] for t in row["tried"]] == [64, 128, 256]
    assert all(t["ok"] and math.isfinite(t["loss"]) for t in row["tried"]) and row["est_gib"] > 0

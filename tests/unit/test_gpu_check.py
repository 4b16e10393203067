"""scripts/gpu_check.sh's checks, on CPU: the CUDA gate and the cheap checks' dry mode.

The training checks (matrix, memory, throughput) start processes and take minutes on CPU; they are
run by hand with `GPU_CHECK_DRY=1 scripts/gpu_check.sh`, not here.
"""

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

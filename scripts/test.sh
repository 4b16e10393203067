#!/usr/bin/env bash
# Set up and run the whole suite. The SLURM tests start (and stop) their own local two-node
# cluster through scripts/slurm_cluster.sh, which apt-installs slurm + munge when missing.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick inner loop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# ms-swift, the peer the benchmark smoke test runs beside swiftdist, lives in an environment of its own.
scripts/setup_ms_swift.sh
export MS_SWIFT_PYTHON="$PWD/${MS_SWIFT_VENV:-.venv-ms-swift}/bin/python"
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
# DeepSpeed JIT-builds small C++ ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/swiftdist/torch_extensions}"
status=0
python -m pytest "$@" || status=$?
# pytest exits 5 when it collected nothing (e.g. a -m filter matched no test): not a failure here.
[ "$status" -eq 5 ] && status=0
exit "$status"

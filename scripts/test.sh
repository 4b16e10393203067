#!/usr/bin/env bash
# Set up, start the local SLURM cluster the launcher tests use, run the whole suite, stop the cluster.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick inner loop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
# DeepSpeed JIT-builds small C++ ops on first use; keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/swiftdist/torch_extensions}"
eval "$(scripts/slurm_cluster.sh start)"
trap 'scripts/slurm_cluster.sh stop' EXIT
status=0
python -m pytest "$@" || status=$?
# pytest exits 5 when it collected nothing (e.g. a -m filter matched no test): not a failure here.
[ "$status" -eq 5 ] && status=0
exit "$status"

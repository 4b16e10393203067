#!/usr/bin/env bash
# A separate environment with ms-swift, the peer the CPU benchmark compares against
# (`python -m benchmarks.run --suite cpu --ms-swift-python .venv-ms-swift/bin/python`). Separate
# because ms-swift pins its own transformers/peft; torch is installed first and pinned the same way
# as scripts/setup.sh, so it cannot pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MS_SWIFT_VENV:-.venv-ms-swift}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MS_SWIFT_SPEC="${MS_SWIFT_SPEC:-ms-swift==4.6.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"$VENV/bin/pip" install -q -c "$constraints" "$MS_SWIFT_SPEC"
echo "ms-swift installed in $VENV ($("$VENV/bin/python" -c 'from importlib.metadata import version; print("ms-swift", version("ms-swift"))'))" >&2

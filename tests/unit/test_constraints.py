"""constraints.txt (the exact set scripts/setup.sh installs) and setup.py (ranges) must agree."""

import importlib.util
from importlib import metadata

from packaging.utils import canonicalize_name

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("pin_constraints", REPO / "scripts" / "pin_constraints.py")
pin_constraints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pin_constraints)

REGENERATE = "or regenerate the whole file (transitive pins too) with `.venv/bin/python scripts/pin_constraints.py`"


def _line_to_add(name: str) -> str:
    try:
        return f"add the line '{name}=={metadata.version(name)}' (the version installed here) to constraints.txt"
    except metadata.PackageNotFoundError:
        return f"install it, then add its exact version as '{name}==X.Y.Z' to constraints.txt"


def test_every_setup_requirement_is_pinned_within_its_range():
    pins = pin_constraints.read_pins()  # raises on a line that is not an exact name==version pin
    problems = []
    for req in pin_constraints.setup_requirements():
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"setup.py requires '{req}' but constraints.txt has no pin for it: {_line_to_add(req.name)}")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"constraints.txt pins {req.name}=={pinned}, outside setup.py's '{req}': "
                            "change the pin to a version in the range (and test it), or widen the range")
    assert not problems, "\n".join(problems + [REGENERATE])


def test_the_packages_setup_sh_installs_besides_setup_py_are_pinned():
    pins = pin_constraints.read_pins()
    missing = [n for n in pin_constraints.ALSO_INSTALLED if canonicalize_name(n) not in pins]
    assert not missing, "\n".join([f"{n}: {_line_to_add(n)}" for n in missing] + [REGENERATE])
    # A public version (2.13.0, not 2.13.0+cpu), so a CUDA build of the same release satisfies it too.
    assert pins["torch"].local is None, f"pin torch by its public version: torch=={pins['torch'].public}"

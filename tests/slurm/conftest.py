"""The local two-node SLURM cluster (scripts/slurm_cluster.sh), started once per session.

It gets its own state dir (and so its own ports) under the session's tmp dir, so a cluster someone
runs by hand is left alone. A cluster that cannot start fails the tests: CI must not pass by
skipping them.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """SLURM_CONF of a running cluster (nodes n1, n2); set in os.environ for the session's clients."""
    state_dir = tmp_path_factory.mktemp("slurm-cluster")
    script = [str(REPO / "scripts" / "slurm_cluster.sh")]
    proc = subprocess.run([*script, "start", "--state-dir", str(state_dir)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 or "export SLURM_CONF=" not in proc.stdout:
        pytest.fail(f"the local SLURM cluster did not start (exit {proc.returncode}):\n{proc.stderr}", pytrace=False)
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run([*script, "stop", "--state-dir", str(state_dir)], capture_output=True, timeout=120)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous

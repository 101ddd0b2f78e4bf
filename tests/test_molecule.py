"""Molecule scenarios of the compute-node roles, run for real.

Each scenario boots a Debian 12 target under systemd-nspawn (molecule/shared/
target.sh: cached mmdebstrap rootfs, per-scenario overlay, own network
namespace) and runs `molecule test`: syntax, create, prepare, converge,
idempotence, verify (testinfra), destroy. See molecule/README.md for what each
scenario proves for real and what it only renders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOLECULE_DIR = PROJECT_ROOT / "molecule"
VENV_BIN = Path(sys.executable).parent
SCENARIOS = sorted(p.parent.name for p in MOLECULE_DIR.glob("*/molecule.yml"))
HOST_TOOLS = ("systemd-nspawn", "mmdebstrap", "socat", "ip", "ssh", "ssh-keygen")


def test_every_role_is_converged_by_a_scenario() -> None:
    roles = {
        "nvidia_driver",
        "enroot",
        "apptainer",
        "cvmfs",
        "munge",
        "slurm_node",
        "sssd",
        "wireguard",
        "node_tools",
        "postboot",
        "join_agent",
    }
    converged = "\n".join((MOLECULE_DIR / s / "converge.yml").read_text() for s in SCENARIOS)
    missing = sorted(r for r in roles if r not in converged)
    assert not missing, f"roles without a molecule scenario: {missing}"
    readme = (MOLECULE_DIR / "README.md").read_text()
    assert all(f"`{s}`" in readme for s in SCENARIOS), "molecule/README.md must have a row per scenario"


@pytest.mark.vm
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("molecule scenarios boot systemd-nspawn targets: run as root (CI does)")
    absent = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    assert not absent, f"missing host tools {absent}: ./run setup installs them"
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "ANSIBLE_ROLES_PATH": str(PROJECT_ROOT / "roles"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    }
    for passthrough in ("XDG_CACHE_HOME", "PROVISION_DEBIAN_MIRROR"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    proc = subprocess.run(
        [str(VENV_BIN / "molecule"), "test", "-s", scenario],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"molecule test -s {scenario} failed:\n{output[-8000:]}"
    for step in ("converge", "idempotence", "verify"):
        assert f"{step}: Executed: Successful" in output, f"{step} did not run successfully:\n{output[-4000:]}"

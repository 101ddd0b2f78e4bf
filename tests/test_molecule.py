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
from typing import Any

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOLECULE_DIR = PROJECT_ROOT / "molecule"
ROLES_DIR = PROJECT_ROOT / "roles"
VENV_BIN = Path(sys.executable).parent
SCENARIOS = sorted(p.parent.name for p in MOLECULE_DIR.glob("*/molecule.yml"))
COLLECTION = "provision.cluster."  # a scenario may name the roles as the installed collection's
HOST_TOOLS = ("systemd-nspawn", "mmdebstrap", "socat", "ip", "ssh", "ssh-keygen")


_ROLE_MODULES = {f"{ns}{verb}_role" for ns in ("", "ansible.builtin.") for verb in ("include", "import")}
_PLAYBOOK_MODULES = {"import_playbook", "ansible.builtin.import_playbook"}
_TASKS_MODULES = {f"{ns}{verb}_tasks" for ns in ("", "ansible.builtin.") for verb in ("include", "import")}
_TASK_LISTS = ("pre_tasks", "tasks", "post_tasks", "handlers", "block", "rescue", "always")


def converged_roles(playbook: Path) -> tuple[set[str], list[str]]:
    """The roles a playbook applies (plays' roles:, include/import_role, imported playbooks and
    task files, the roles' meta dependencies), and what could not be read."""
    roles: set[str] = set()
    unreadable: list[str] = []

    def role_name(name: object, task: dict[str, Any], where: str) -> None:
        if isinstance(name, str) and "{{" not in name:
            roles.add(name.removeprefix(COLLECTION))
        elif name == "{{ item }}" and isinstance(task.get("loop", task.get("with_items")), list):
            roles.update(str(item).removeprefix(COLLECTION) for item in task.get("loop", task.get("with_items")))
        else:
            unreadable.append(f"{where}: role {name!r}")

    def tasks(items: object, base: Path, where: str) -> None:
        for task in items if isinstance(items, list) else []:
            if not isinstance(task, dict):
                continue
            for key, value in task.items():
                if key in _ROLE_MODULES:
                    role_name(value.get("name") if isinstance(value, dict) else value, task, where)
                elif key in _TASKS_MODULES and isinstance(value, str) and "{{" not in value:
                    tasks(yaml.safe_load((base / value).read_text()), (base / value).parent, str(base / value))
                elif key in _TASK_LISTS:
                    tasks(value, base, where)

    def plays(path: Path) -> None:
        for play in yaml.safe_load(path.read_text()) or []:
            for key, value in play.items():
                if key in _PLAYBOOK_MODULES:
                    plays(path.parent / str(value))
                elif key == "roles":
                    for entry in value or []:
                        role_name(
                            entry.get("role", entry.get("name")) if isinstance(entry, dict) else entry, {}, str(path)
                        )
                elif key in _TASK_LISTS:
                    tasks(value, path.parent, str(path))

    plays(playbook)
    pending = list(roles)
    while pending:  # a converged role's meta dependencies are converged too
        meta_file = ROLES_DIR / pending.pop() / "meta" / "main.yml"
        meta = (yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else None) or {}
        for dep in meta.get("dependencies") or []:
            name = dep.get("role", dep.get("name")) if isinstance(dep, dict) else dep
            if name not in roles:
                roles.add(name)
                pending.append(name)
    return roles, unreadable


def converge_playbook(scenario: str) -> Path:
    config = yaml.safe_load((MOLECULE_DIR / scenario / "molecule.yml").read_text()) or {}
    section = config.get("ansible") or config.get("provisioner") or {}
    return MOLECULE_DIR / scenario / str((section.get("playbooks") or {}).get("converge", "converge.yml"))


def test_every_role_is_converged_by_a_scenario() -> None:
    roles = {p.name for p in ROLES_DIR.iterdir() if p.is_dir()}
    assert roles, f"no roles under {ROLES_DIR}"
    converged: set[str] = set()
    for scenario in SCENARIOS:
        found, unreadable = converged_roles(converge_playbook(scenario))
        assert not unreadable, f"{scenario}: roles this test cannot read: {unreadable}"
        converged |= found
    assert sorted(roles - converged) == [], "roles no molecule scenario converges"
    assert sorted(converged - roles) == [], "scenarios converge roles that are not in roles/"
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
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    }
    for passthrough in ("XDG_CACHE_HOME", "PROVISION_DEBIAN_MIRROR", "PROVISION_SOURCE_MIRROR"):
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
    if COLLECTION in converge_playbook(scenario).read_text():
        # Its roles ran from the collection its dependency step installed, not from roles/.
        assert "provision.cluster:" in output and "was installed successfully" in output, output[-4000:]

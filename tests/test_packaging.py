"""Shipped as users install it: the wheel and the Ansible collection, away from the checkout.

Builds the wheel (``pip wheel``) and the collection (``ansible-galaxy collection
build``), installs them into a fresh virtualenv and a collections directory
under tmp, and runs from a directory outside the repository, with no
``ANSIBLE_*`` variable, no roles path and no ansible.cfg: image validation, a
build plan, the join command's help, the collection's join playbook parsed,
and the collection's join playbook run for real in check mode on this machine
(k0s_worker, the one join role built to run in check mode here, with its
download pointed at a local stand-in), its role found in the collection.
A molecule scenario would need minutes (a booted target); this run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Installed:
    venv: Path
    collections: Path
    site: Path  # a site directory outside the repository, holding a copy of inventory/example
    env: dict[str, str]

    def run(self, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.site, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def _check(argv: list[str], cwd: Path, timeout: int = 300) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    top = tmp_path_factory.mktemp("shipped")
    assert not top.resolve().is_relative_to(ROOT), "the install must be outside the repository"
    dist, venv, collections, site = top / "dist", top / "venv", top / "collections", top / "site"
    _check([str(VENV_BIN / "pip"), "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)], cwd=top)
    _check([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(dist), str(ROOT)], cwd=top)
    (wheel,) = dist.glob("provision-*.whl")
    (tarball,) = dist.glob("provision-cluster-*.tar.gz")
    _check(["/usr/bin/python3", "-m", "venv", str(venv)], cwd=top)
    _check([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)], cwd=top)
    _check(
        [
            str(venv / "bin" / "ansible-galaxy"),
            "collection",
            "install",
            "--force",
            "--no-deps",
            "-p",
            str(collections),
            str(tarball),
        ],
        cwd=top,
    )
    shutil.copytree(ROOT / "inventory" / "example", site / "inventory")
    (top / "no-roles").mkdir()
    (top / "home").mkdir()
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{SYSTEM_PATH}",
        "HOME": str(top / "home"),  # nothing from ~/.ansible (a collection molecule installed there, say)
        "LANG": "C.UTF-8",
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_ROLES_PATH": str(top / "no-roles"),  # roles come from the collection, or not at all
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    }
    yield Installed(venv=venv, collections=collections, site=site, env=env)


def test_wheel_carries_its_files_and_not_the_bundle(installed: Installed) -> None:
    proc = installed.run(
        "python",
        "-c",
        "import json; from provision import catalog as c; "
        "print(json.dumps([str(c.ROLES_DIR), str(c.SOURCE_CHECKOUT), sorted(c.known_images()),"
        " sorted(p.name for p in c.ROLES_DIR.iterdir())]))",
    )
    assert proc.returncode == 0, proc.stderr
    roles_dir, checkout, images, roles = json.loads(proc.stdout)
    assert Path(roles_dir).is_relative_to(installed.venv), roles_dir
    assert checkout == "None"
    assert images == sorted(p.stem for p in (ROOT / "images").glob("*.yml"))
    assert roles == sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())
    # ansible-core only: the 48-collection `ansible` bundle is not a dependency.
    pip_list = installed.run("pip", "list", "--format=json", "--disable-pip-version-check")
    names = {p["name"].lower() for p in json.loads(pip_list.stdout)}
    assert "ansible-core" in names and "ansible" not in names


def test_cli_outside_the_checkout(installed: Installed) -> None:
    validate = installed.run("provision", "-i", "inventory", "image", "validate")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "compute-debian12: ok" in validate.stdout + validate.stderr
    plan = installed.run("provision", "-i", "inventory", "image", "build", "compute-debian12", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    data = json.loads(plan.stdout)
    assert data["name"] == "compute-debian12" and "roles" in data["stages"]
    assert "k0s_worker" not in data["roles"] and "munge" in data["roles"]
    join_help = installed.run("provision", "node", "join", "--help")
    assert join_help.returncode == 0, join_help.stderr
    assert "join" in join_help.stdout


def test_collection_join_playbook_parses(installed: Installed) -> None:
    proc = installed.run("ansible-playbook", "provision.cluster.join", "-i", "inventory", "--syntax-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{installed.collections}/ansible_collections/provision/cluster/playbooks/join.yml" in proc.stdout


def test_collection_join_runs_its_role_in_check_mode(installed: Installed, tmp_path: Path) -> None:
    stand_in = tmp_path / "fake-k0s-for-check-mode"
    stand_in.write_bytes(b"#!/bin/sh\nexit 1\n")
    extra = {
        "join_hosts": "localhost",
        "join_host_key_policy": "inventory",
        "join_slurm": False,
        # join.yml templates delegate_to before `when`: its Slurm tasks need this even when skipped.
        "slurm_controller_host": "localhost",
        "join_sssd": False,
        "join_k0s": True,
        "ansible_python_interpreter": str(installed.venv / "bin" / "python"),
        "k0s_worker_download_url": f"file://{stand_in}",
        "k0s_worker_checksum": "sha256:" + hashlib.sha256(stand_in.read_bytes()).hexdigest(),
        "k0s_worker_binary_path": str(tmp_path / "k0s"),
        "k0s_worker_token_file": str(tmp_path / "worker-token"),
        "k0s_worker_controller_host": "localhost",
        "k0s_worker_token": "check-mode-token",
    }
    proc = installed.run(
        "ansible-playbook",
        "provision.cluster.join",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        json.dumps(extra),
        "--check",
        "--diff",
        "-vv",
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    role_tasks = f"{installed.collections}/ansible_collections/provision/cluster/roles/k0s_worker/tasks/join.yml"
    assert f"task path: {role_tasks}" in out, out[-6000:]
    assert "k0s_worker : Install the k0s worker service" in out
    assert not (tmp_path / "k0s").exists() and not (tmp_path / "worker-token").exists()

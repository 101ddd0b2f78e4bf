"""examples/ci: the site pipelines' own commands, run against inventory/example.

The check commands are read from the YAML (GitLab jobs' `script`, GitHub
steps' `run`) and run as written, with SITE_INVENTORY pointing at a copy of
inventory/example outside the repository and provision.cluster found in a
collections directory that links to this checkout (test_packaging.py covers
the installed wheel and collection; the pipelines' install lines fetch release
artefacts and are not run here). The `check-join` job (`--check --diff`)
needs booted nodes on the provisioning network: here it is parsed against the
inventory (`--syntax-check` appended), not run.
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

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "examples" / "ci"
VENV_BIN = Path(sys.executable).parent
INSTALL_MARKERS = ("pip install", "ansible-galaxy collection install", "python -m venv")
NEEDS_NODES = "check-join"


def gitlab_commands(doc: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(job["script"]) for name, job in doc.items() if isinstance(job, dict) and "script" in job}


def github_commands(doc: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: [
            step["run"] for step in job["steps"] if "run" in step and not any(m in step["run"] for m in INSTALL_MARKERS)
        ]
        for name, job in doc["jobs"].items()
    }


PIPELINES = {"gitlab-ci.yml": gitlab_commands, "github-actions.yml": github_commands}


def pipeline(name: str) -> dict[str, list[str]]:
    return PIPELINES[name](yaml.safe_load((CI / name).read_text()))


def test_both_pipelines_run_the_same_checks() -> None:
    gitlab, github = pipeline("gitlab-ci.yml"), pipeline("github-actions.yml")
    assert gitlab == github
    checks = " ".join(gitlab["validate"])
    assert "provision -i" in checks and "inventory check" in checks
    assert "ansible-lint" in checks
    assert "ansible-playbook provision.cluster.join" in checks
    assert any("--check --diff" in line for line in gitlab[NEEDS_NODES])


@pytest.fixture(scope="module")
def site_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    top = tmp_path_factory.mktemp("site-ci")
    site = top / "site"
    shutil.copytree(ROOT / "inventory" / "example", site / "inventory" / "site")
    collection = top / "collections" / "ansible_collections" / "provision" / "cluster"
    collection.parent.mkdir(parents=True)
    collection.symlink_to(ROOT)
    (top / "home").mkdir()
    env = {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(top / "home"),
        "LANG": "C.UTF-8",
        "SITE_INVENTORY": "inventory/site",
        "ANSIBLE_COLLECTIONS_PATH": str(top / "collections"),
        "ANSIBLE_NOCOLOR": "1",
    }
    return site, env


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_commands_pass_on_the_example_site(name: str, site_env: tuple[Path, dict[str, str]]) -> None:
    site, env = site_env
    ran = 0
    for job, lines in pipeline(name).items():
        for line in lines:
            command = f"{line} --syntax-check" if job == NEEDS_NODES else line
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=site,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert proc.returncode == 0, f"{name} {job}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ran += 1
    assert ran == 4

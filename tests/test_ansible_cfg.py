"""ansible.cfg: plain ansible-playbook from a clean checkout finds the project's roles.

No ANSIBLE_* variable is set and HOME is empty, so nothing but the
repository's own ansible.cfg can point Ansible at roles/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").is_file())


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(HOME=str(home), PATH=os.pathsep.join([str(ANSIBLE_PLAYBOOK.parent), env.get("PATH", "/usr/bin:/bin")]))
    return env


def _ansible_playbook(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), *args],
        cwd=cwd,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_join_playbook_syntax_check_from_a_clean_checkout(tmp_path: Path) -> None:
    proc = _ansible_playbook("-i", "inventory/example", "playbooks/join.yml", "--syntax-check", cwd=ROOT, home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_role_is_found_through_ansible_cfg(tmp_path: Path) -> None:
    """join.yml includes its roles dynamically; a static import makes Ansible look each one up now."""
    assert ROLES, "no roles found"
    play = [
        {
            "name": "Import every role",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [{"name": role, "ansible.builtin.import_role": {"name": role}} for role in ROLES],
        }
    ]
    playbook = tmp_path / "every-role.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    home = tmp_path / "home"
    home.mkdir()

    proc = _ansible_playbook("-i", "localhost,", str(playbook), "--syntax-check", cwd=ROOT, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The control: the same command outside the checkout does not find them.
    proc = _ansible_playbook("-i", "localhost,", str(playbook), "--syntax-check", cwd=tmp_path, home=home)
    assert proc.returncode != 0 and f"the role '{ROLES[0]}' was not found" in proc.stdout + proc.stderr

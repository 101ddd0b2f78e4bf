"""playbooks/join.yml: syntax, the admin-side checks, and how host keys are trusted.

The checks run before any connection to a node, so each bad input is one
host of a single run and must fail on its own message. The one good host
connects locally with every service switched off: it proves the checks pass
and shows the ssh options the playbook sets for a node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
JOIN = ROOT / "playbooks" / "join.yml"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        **extra,
    }


def test_syntax_check_with_the_example_inventory() -> None:
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(ROOT / "inventory" / "example"), str(JOIN)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: " in proc.stdout


def test_join_uses_the_compute_roles_join_entry_points() -> None:
    plays = yaml.safe_load(JOIN.read_text())
    includes = {
        task["ansible.builtin.include_role"]["name"]: task["ansible.builtin.include_role"].get("tasks_from")
        for task in _all_tasks(plays)
        if "ansible.builtin.include_role" in task
    }
    assert includes == {
        "wireguard": "join",
        "munge": "join",
        "sssd": "join",
        "slurm_node": "join",
        "k0s_worker": "join",
    }
    # Every command carries changed_when.
    for task in _all_tasks(plays):
        if "ansible.builtin.command" in task:
            assert "changed_when" in task, task["name"]


def _all_tasks(plays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(tasks: list[dict[str, Any]]) -> None:
        for t in tasks:
            out.append(t)
            walk(t.get("block", []))

    for play in plays:
        walk(play.get("tasks", []))
    return out


GOOD = {
    "slurm_controller_host": "localhost",
    "slurm_conf_server": "10.99.0.1:6817",
    "munge_key_file": "/nonexistent/munge.key",
}
CASES: dict[str, tuple[dict[str, Any], str | None]] = {
    "badpolicy": (
        {**GOOD, "join_host_key_policy": "yolo"},
        "join_host_key_policy must be pinned, accept-new or inventory (got yolo)",
    ),
    "nocontroller": ({**GOOD, "slurm_controller_host": ""}, "set slurm_controller_host"),
    "unknowncontroller": ({**GOOD, "slurm_controller_host": "master99"}, 'got "master99"'),
    "noconfserver": ({**GOOD, "slurm_conf_server": ""}, 'slurm_conf_server ("host:port" of slurmctld'),
    "nomungekey": ({k: v for k, v in GOOD.items() if k != "munge_key_file"}, "set munge_key_file"),
    "nohostkey": (GOOD, "no host key for nohostkey in"),
    "badtimeout": ({**GOOD, "join_slurm_timeout": 0}, "join_slurm_timeout > 0"),
    # Checks pass; no service is joined (all off), connection is local.
    "pinned": ({**GOOD, "join_slurm": False, "join_sssd": False, "join_k0s": False}, None),
    "acceptnew": (
        {**GOOD, "join_slurm": False, "join_sssd": False, "join_k0s": False, "join_host_key_policy": "accept-new"},
        None,
    ),
}


@pytest.mark.integration
def test_admin_side_checks_fail_per_node_with_a_message(tmp_path: Path) -> None:
    inv = tmp_path / "inventory"
    (inv / ".state" / "known_hosts").mkdir(parents=True)
    (inv / ".state" / "known_hosts" / "pinned").write_text("pinned ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n")
    hosts = {
        name: {**vars_, "ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        for name, (vars_, _) in CASES.items()
    }
    (inv / "hosts.yml").write_text(
        yaml.safe_dump({"all": {"vars": {"provision_state_dir": ".state"}, "children": {"compute": {"hosts": hosts}}}})
    )
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), str(JOIN)],
        cwd=ROOT,
        env=_env(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json"),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0  # some hosts fail, by design
    doc = json.loads(proc.stdout)
    per_host: dict[str, list[dict[str, Any]]] = {}
    for play in doc["plays"]:
        for task in play["tasks"]:
            for host, res in task["hosts"].items():
                per_host.setdefault(host, []).append({"task": task["task"]["name"], **res})
    for name, (_, message) in CASES.items():
        failed = [r for r in per_host[name] if r.get("failed")]
        if message is None:
            assert failed == [], f"{name}: {failed}"
        else:
            assert len(failed) == 1, f"{name}: {[r['task'] for r in per_host[name]]}"
            assert message in failed[0]["msg"], f"{name}: {failed[0]['msg']}"
            # Stopped before connecting: no fact gathering, no join task ran for this node.
            assert not any(r["task"] == "Gathering Facts" for r in per_host[name]), name
    assert doc["stats"]["pinned"]["failures"] == 0 and doc["stats"]["acceptnew"]["failures"] == 0

    def ssh_args(host: str) -> str:
        facts = [r["ansible_facts"] for r in per_host[host] if "ansible_ssh_extra_args" in r.get("ansible_facts", {})]
        assert len(facts) == 1, host
        return " ".join(str(facts[0]["ansible_ssh_extra_args"]).split())

    known = inv / ".state" / "known_hosts"
    assert ssh_args("pinned") == (
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known / 'pinned'} -o HostKeyAlias=pinned"
    )
    assert ssh_args("acceptnew") == (
        f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known / 'acceptnew'} -o HostKeyAlias=acceptnew"
    )

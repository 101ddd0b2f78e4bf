"""roles/k0s_worker: validation, rendering, and a check-mode join on localhost.

k0s downloads and a k0s controller are unreachable here, so the role never
runs for real in these tests: check mode (nothing is changed, commands are
skipped) against this machine, with the download pointed at a local file
named ``fake-k0s-for-check-mode`` whose checksum the role verifies.
Tests that run ansible-playbook are marked integration (seconds each).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
LOCALHOST = ["-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"]
TOKEN = "K0S-TOKEN-must-never-be-printed-4f1c"


def _playbook(tmp_path: Path, tasks: list[dict[str, Any]], role_vars: dict[str, Any]) -> Path:
    play = [
        {
            "name": "k0s_worker test",
            "hosts": "localhost",
            "gather_facts": True,
            "gather_subset": ["min"],
            "vars": role_vars,
            "tasks": tasks,
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def _run(playbook: Path, *args: str, inventory: Path | None = None) -> tuple[int, str, list[dict[str, Any]]]:
    """Run ansible-playbook with the json callback; return rc, raw output and task results."""
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    }
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), *(["-i", str(inventory)] if inventory else LOCALHOST), str(playbook), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    results: list[dict[str, Any]] = []
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        doc = {"plays": []}
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            for host, res in task["hosts"].items():
                name = task["task"]["name"].split(" : ", 1)[-1]
                results.append({"name": name, "host": host, **res})
    return proc.returncode, proc.stdout + proc.stderr, results


def _result(results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [r for r in results if r["name"] == name]
    assert found, f"task {name!r} did not run; ran: {[r['name'] for r in results]}"
    return found[-1]


@pytest.fixture
def fake_binary(tmp_path: Path) -> tuple[str, str]:
    """A local stand-in for the k0s download, for check mode only."""
    path = tmp_path / "fake-k0s-for-check-mode"
    path.write_bytes(b"#!/bin/sh\necho 'not k0s: a check-mode stand-in' >&2\nexit 1\n")
    return f"file://{path}", "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _join(**overrides: Any) -> list[dict[str, Any]]:
    return [{"name": "Join", "ansible.builtin.include_role": {"name": "k0s_worker", "tasks_from": "join"}, **overrides}]


@pytest.mark.integration
def test_default_download_url_renders(tmp_path: Path) -> None:
    tasks = [
        {
            "name": "Load the role's variables",
            "ansible.builtin.include_role": {"name": "k0s_worker", "tasks_from": "validate", "public": True},
        },
        {"name": "Show the URL", "ansible.builtin.debug": {"msg": "{{ k0s_worker_download_url }}"}},
    ]
    pb = _playbook(tmp_path, tasks, {"k0s_worker_checksum": "sha256:" + "0" * 64})
    rc, out, results = _run(pb)
    assert rc == 0, out
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    assert _result(results, "Show the URL")["msg"] == (
        f"https://github.com/k0sproject/k0s/releases/download/v1.31.2+k0s.0/k0s-v1.31.2+k0s.0-{arch}"
    )


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"k0s_worker_checksum": ""}, 'k0s_worker_checksum must be "sha256:" and the 64 hex digits'),
    ({"k0s_worker_checksum": "md5:" + "0" * 32}, 'k0s_worker_checksum must be "sha256:"'),
    ({"k0s_worker_download_url": "ftp://mirror/k0s"}, "an http(s):// or file:// URL"),
    ({"k0s_worker_version": "1.31"}, 'k0s_worker_version must look like "v1.31.2+k0s.0" (got 1.31)'),
    ({"k0s_worker_binary_path": "bin/k0s"}, "k0s_worker_binary_path and k0s_worker_token_file must be absolute"),
    ({"k0s_worker_controller_host": ""}, "set k0s_worker_controller_host"),
    ({"k0s_worker_controller_host": "nosuchhost"}, 'got "nosuchhost"'),
    ({"k0s_worker_token_expiry": "one hour"}, "k0s_worker_token_expiry must be a duration"),
    ({"k0s_worker_labels": ["gpu=true"]}, "k0s_worker_labels"),
]


@pytest.mark.integration
def test_validation_fails_with_a_message_before_any_change(tmp_path: Path, fake_binary: tuple[str, str]) -> None:
    """Each bad input is one host of the same run: each must fail on its own message, nothing written."""
    url, checksum = fake_binary
    base = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "k0s_worker_download_url": url,
        "k0s_worker_checksum": checksum,
        "k0s_worker_controller_host": "localhost",
    }
    hosts = {}
    for i, (bad, _) in enumerate(BAD_INPUT):
        out_dir = tmp_path / f"case{i}"
        out_dir.mkdir()
        paths = {"k0s_worker_binary_path": str(out_dir / "k0s"), "k0s_worker_token_file": str(out_dir / "token")}
        hosts[f"case{i}"] = {**base, **paths, **bad}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    play = [{"name": "bad input", "hosts": "all", "gather_facts": True, "gather_subset": ["min"], "tasks": _join()}]
    pb = tmp_path / "play.yml"
    pb.write_text(yaml.safe_dump(play, sort_keys=False))
    # Not check mode: validation must stop each host before anything is written.
    rc, _, results = _run(pb, inventory=inventory)
    assert rc != 0
    for i, (_, message) in enumerate(BAD_INPUT):
        host = f"case{i}"
        failed = [r for r in results if r["host"] == host and r.get("failed")]
        assert len(failed) == 1, f"{host}: {[r['name'] for r in results if r['host'] == host]}"
        assert message in failed[0]["msg"], f"{host}: {failed[0]['msg']}"
        assert not any(r.get("changed") for r in results if r["host"] == host)
        assert not (tmp_path / host / "k0s").exists() and not (tmp_path / host / "token").exists()


@pytest.mark.integration
def test_check_mode_join_changes_nothing_and_hides_the_token(tmp_path: Path, fake_binary: tuple[str, str]) -> None:
    url, checksum = fake_binary
    binary, token_file = tmp_path / "k0s", tmp_path / "etc" / "k0s" / "worker-token"
    role_vars = {
        "k0s_worker_download_url": url,
        "k0s_worker_checksum": checksum,
        "k0s_worker_binary_path": str(binary),
        "k0s_worker_token_file": str(token_file),
        "k0s_worker_controller_host": "localhost",
        "k0s_worker_token": TOKEN,
        "k0s_worker_labels": {"provision/rack": "r1", "gpu": "true"},
    }
    pb = _playbook(tmp_path, _join(), role_vars)
    rc, out, results = _run(pb, "--check", "--diff")
    assert rc == 0, out
    assert TOKEN not in out
    # Would download the checksummed binary and write the token, mode 0600 -- but in check mode does neither.
    assert _result(results, "Install the k0s binary (checksummed)")["changed"]
    write = _result(results, "Write the join token (mode 0600)")
    assert write["changed"] and write.get("censored")
    assert not binary.exists() and not token_file.exists()
    # Commands never run in check mode (the install command is rendered, not run); nothing is started or awaited.
    install = _result(results, "Install the k0s worker service")
    assert install["msg"] == "Command would have run if not in check mode"
    assert install["cmd"] == [
        str(binary),
        "install",
        "worker",
        "--token-file",
        str(token_file),
        "--labels=provision/rack=r1,gpu=true",
    ]
    assert _result(results, "Start the k0s worker").get("skipped")
    assert _result(results, "Wait until the Node is Ready on the controller").get("skipped")


@pytest.mark.integration
def test_check_mode_with_controller_token_delegates_and_is_no_log(tmp_path: Path, fake_binary: tuple[str, str]) -> None:
    url, checksum = fake_binary
    role_vars = {
        "k0s_worker_download_url": url,
        "k0s_worker_checksum": checksum,
        "k0s_worker_binary_path": str(tmp_path / "k0s"),
        "k0s_worker_token_file": str(tmp_path / "token"),
        "k0s_worker_controller_host": "localhost",
        "k0s_worker_controller_k0s": [str(tmp_path / "controller-k0s-never-run")],
    }
    pb = _playbook(tmp_path, _join(), role_vars)
    rc, out, results = _run(pb, "--check", "--diff")
    assert rc == 0, out
    stale = _result(results, "Delete a stale Node object of the same name on the controller")
    create = _result(results, "Create a worker join token on the controller")
    # Skipped in check mode (a command), but present and aimed at the controller; the token task is no_log.
    assert stale.get("skipped") and create.get("skipped")
    assert create.get("censored")
    assert not (tmp_path / "token").exists()


def test_argument_specs_match_defaults() -> None:
    specs = yaml.safe_load((ROOT / "roles/k0s_worker/meta/argument_specs.yml").read_text())["argument_specs"]
    defaults = yaml.safe_load((ROOT / "roles/k0s_worker/defaults/main.yml").read_text())
    assert set(specs) == {"main", "join"}
    assert set(specs["main"]["options"]) == set(defaults)
    assert all(name.startswith("k0s_worker_") for name in defaults)
    assert specs["main"]["options"]["k0s_worker_token"]["no_log"] is True

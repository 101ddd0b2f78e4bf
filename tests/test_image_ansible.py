"""provision.ansible: the one ansible-runner wrapper (events, failures, no secrets left behind)."""

from __future__ import annotations

import glob
import sys
import tempfile
from pathlib import Path

import pytest

from provision.ansible import EventKind, PlaybookError, TaskEvent, run_playbook

pytestmark = pytest.mark.integration

LOCAL = {"all": {"hosts": {"box": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}


def playbook(tmp_path: Path, tasks: str) -> Path:
    path = tmp_path / "play.yml"
    path.write_text(f"- name: Test play\n  hosts: all\n  gather_facts: false\n  tasks:\n{tasks}")
    return path


def test_events_stream_and_extravars_reach_the_play(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    book = playbook(
        tmp_path,
        "    - name: Write the variable\n"
        "      ansible.builtin.copy:\n"
        '        content: \'{{ greeting }} {{ lookup("env", "PROVISION_TEST_ENV") }}\'\n'
        f"        dest: {out}\n"
        "        mode: '0600'\n",
    )
    events: list[TaskEvent] = []
    result = run_playbook(
        book,
        inventory=LOCAL,
        extravars={"greeting": "hello"},
        envvars={"PROVISION_TEST_ENV": "from-env"},
        on_event=events.append,
    )
    assert out.read_text() == "hello from-env"
    assert result.status == "successful" and result.changed == 1
    kinds = [(e.kind, e.task) for e in events]
    assert (EventKind.TASK, "Write the variable") in kinds
    assert (EventKind.CHANGED, "Write the variable") in kinds


def test_failure_names_the_task_and_keeps_no_logs(tmp_path: Path) -> None:
    before = set(glob.glob(f"{tempfile.gettempdir()}/provision-ansible-*"))
    book = playbook(
        tmp_path,
        "    - name: Use the secret quietly\n"
        "      ansible.builtin.command: /bin/false {{ api_token }}\n"
        "      changed_when: false\n"
        "      no_log: true\n",
    )
    events: list[TaskEvent] = []
    with pytest.raises(PlaybookError) as info:
        run_playbook(book, inventory=LOCAL, extravars={"api_token": "s3cr3t-value"}, on_event=events.append)
    assert "task failed: Use the secret quietly" in info.value.message
    assert "s3cr3t-value" not in info.value.message
    assert all("s3cr3t-value" not in str(e) for e in events)
    assert any(e.kind is EventKind.FAILED for e in events)
    # The private data directory (extravars file, artifacts) is gone.
    assert set(glob.glob(f"{tempfile.gettempdir()}/provision-ansible-*")) == before


def test_cancel_stops_the_run(tmp_path: Path) -> None:
    book = playbook(tmp_path, "    - name: Sleep\n      ansible.builtin.command: sleep 60\n      changed_when: false\n")
    with pytest.raises(PlaybookError, match="cancelled"):
        run_playbook(book, inventory=LOCAL, cancel=lambda: True)


def test_syntax_error_is_reported(tmp_path: Path) -> None:
    book = tmp_path / "bad.yml"
    book.write_text("- hosts: all\n  tasks:\n    - name: x\n      no.such.module: {}\n")
    with pytest.raises(PlaybookError) as info:
        run_playbook(book, inventory=LOCAL)
    assert "bad.yml" in info.value.message

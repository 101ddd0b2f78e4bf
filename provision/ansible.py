"""The one wrapper around ansible-runner: run a playbook, stream its events.

Image builds, joins and the virtual lab all run playbooks through
``run_playbook``. It keeps secrets out of argv and off disk for longer than a
run: extra variables go to ansible-playbook as ``-e @file`` from a private
(0700) directory that is deleted afterwards (ansible-runner would otherwise
put a dict of extra vars on the command line), env files are suppressed,
and callers only ever see ``TaskEvent``s, whose messages Ansible has already
censored for ``no_log`` tasks. Cancellation is polled (``cancel``), so a
signal handler can stop a run and ansible-runner kills the process group.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from provision.errors import ProvisionError

log = logging.getLogger(__name__)


class PlaybookError(ProvisionError):
    """A playbook failed, was cancelled or could not start."""


class EventKind(StrEnum):
    PLAY = "play"
    TASK = "task"
    OK = "ok"
    CHANGED = "changed"
    SKIPPED = "skipped"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


_RUNNER_EVENTS = {
    "playbook_on_play_start": EventKind.PLAY,
    "playbook_on_task_start": EventKind.TASK,
    "runner_on_ok": EventKind.OK,
    "runner_on_skipped": EventKind.SKIPPED,
    "runner_on_failed": EventKind.FAILED,
    "runner_on_unreachable": EventKind.UNREACHABLE,
    "runner_item_on_failed": EventKind.FAILED,
}


@dataclass(frozen=True)
class TaskEvent:
    kind: EventKind
    task: str
    host: str = ""
    role: str = ""
    message: str = ""
    ignored: bool = False

    def __str__(self) -> str:
        where = f"{self.role} : " if self.role else ""
        text = f"{self.kind.value}: {where}{self.task}"
        if self.host:
            text += f" [{self.host}]"
        return text + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class PlaybookResult:
    status: str
    rc: int
    failures: tuple[TaskEvent, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)
    tasks: int = 0
    changed: int = 0


def _message(res: Mapping[str, Any]) -> str:
    if res.get("censored"):
        return str(res["censored"])
    parts = [str(res.get("msg") or "")]
    for key in ("stderr", "module_stderr"):
        if res.get(key):
            parts.append(str(res[key]).strip().splitlines()[-1])
    return " | ".join(p for p in parts if p)[:500]


def to_event(raw: Mapping[str, Any]) -> TaskEvent | None:
    """Turn an ansible-runner event into a TaskEvent (or None if uninteresting)."""
    kind = _RUNNER_EVENTS.get(str(raw.get("event")))
    if kind is None:
        return None
    data = raw.get("event_data") or {}
    res = data.get("res") or {}
    if kind is EventKind.OK and res.get("changed"):
        kind = EventKind.CHANGED
    message = _message(res) if kind in (EventKind.FAILED, EventKind.UNREACHABLE) else ""
    return TaskEvent(
        kind=kind,
        task=str(data.get("task") or data.get("play") or ""),
        host=str(data.get("host") or ""),
        role=str(data.get("role") or ""),
        message=message,
        ignored=bool(data.get("ignore_errors")),
    )


def run_playbook(
    playbook: Path,
    *,
    inventory: Mapping[str, Any] | Path,
    extravars: Mapping[str, Any] | None = None,
    envvars: Mapping[str, str] | None = None,
    roles_path: Sequence[Path] = (),
    on_event: Callable[[TaskEvent], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    limit: str | None = None,
    timeout: int | None = None,
    verbosity: int = 0,
) -> PlaybookResult:
    """Run playbook; raise PlaybookError if it fails or is cancelled."""
    import ansible_runner

    private = Path(tempfile.mkdtemp(prefix="provision-ansible-"))
    os.chmod(private, 0o700)
    try:
        if isinstance(inventory, Path):
            inventory_arg = str(inventory.resolve())
        else:
            inv_file = private / "inventory.yml"
            inv_file.write_text(yaml.safe_dump(dict(inventory), sort_keys=False))
            inventory_arg = str(inv_file)
        vars_file = private / "extravars.json"
        fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as vars_handle:
            json.dump(dict(extravars or {}), vars_handle)

        env = {
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_NOCOWS": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": os.environ.get("ANSIBLE_COLLECTIONS_PATH", ""),
        }
        if roles_path:
            env["ANSIBLE_ROLES_PATH"] = os.pathsep.join(str(p) for p in roles_path)
        # ansible-playbook is installed beside this interpreter (a venv is not
        # necessarily on PATH).
        here = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        env = {k: v for k, v in env.items() if v}
        env.update(envvars or {})

        failures: list[TaskEvent] = []
        counts = {"tasks": 0, "changed": 0}

        def handle(raw: dict[str, Any]) -> bool:
            event = to_event(raw)
            if event is None:
                return False
            if event.kind is EventKind.TASK:
                counts["tasks"] += 1
            elif event.kind is EventKind.CHANGED:
                counts["changed"] += 1
            elif event.kind in (EventKind.FAILED, EventKind.UNREACHABLE) and not event.ignored:
                failures.append(event)
            if on_event is not None:
                on_event(event)
            return False  # do not keep the event on disk

        runner = ansible_runner.run(
            private_data_dir=str(private),
            playbook=str(playbook.resolve()),
            inventory=inventory_arg,
            extravars=str(vars_file),
            envvars=env,
            limit=limit,
            quiet=True,
            suppress_env_files=True,
            event_handler=handle,
            cancel_callback=cancel or (lambda: False),
            settings={"pexpect_timeout": 1, "suppress_ansible_output": True},
            timeout=timeout,
            verbosity=verbosity,
        )
        stats = dict(getattr(runner, "stats", None) or {})
        tail = ""
        if not failures and runner.status not in ("successful", "canceled"):
            try:
                lines = [ln for ln in runner.stdout.read().splitlines() if ln.strip()]
                tail = " | ".join(lines[-3:])[:500]
            except (OSError, AttributeError):
                tail = ""
        result = PlaybookResult(
            status=str(runner.status),
            rc=int(runner.rc if runner.rc is not None else -1),
            failures=tuple(failures),
            stats=stats,
            tasks=counts["tasks"],
            changed=counts["changed"],
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)

    name = playbook.name
    if result.status == "canceled":
        raise PlaybookError(f"{name}: cancelled")
    if result.status == "timeout":
        raise PlaybookError(f"{name}: timed out after {timeout} s", hint="raise the timeout or look at the slow task")
    if result.status != "successful":
        if result.failures:
            first = result.failures[0]
            raise PlaybookError(
                f"{name}: task failed: {first.role + ' : ' if first.role else ''}{first.task}: {first.message}",
                hint="fix the role or its variables, then run again (-v shows each task)",
            )
        raise PlaybookError(
            f"{name}: ansible-playbook exited {result.rc} ({result.status}){': ' + tail if tail else ''}",
            hint="run with --debug; a syntax error or a missing role/collection is the usual cause",
        )
    return result

"""``playbooks/join.yml`` through ansible-runner, with a result per node.

The same playbook a site runs with plain ``ansible-playbook -i INVENTORY
playbooks/join.yml``: ``join_nodes`` only limits it to the nodes given,
turns SSH host key checking on (the playbook pins this boot's keys) and
reads the outcome of each host from the run's events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.ansible import EventKind, PlaybookError, TaskEvent, run_playbook
from provision.catalog import JOIN_PLAYBOOK, ROLES_DIR
from provision.settings import SiteSettings


@dataclass
class JoinResult:
    node: str
    ok: bool
    seconds: float  # from the start of the run to the node's last task
    error: str = ""
    tasks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "ok": self.ok, "seconds": round(self.seconds, 1), "error": self.error}


@dataclass
class _Tally:
    started: float
    last: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)


def join_nodes(
    inventory: Path,
    names: Sequence[str],
    *,
    vault_password_file: str | None = None,
    on_event: Callable[[TaskEvent], None] | None = None,
    timeout: int | None = None,
    verbosity: int = 0,
    settings: SiteSettings | None = None,
) -> list[JoinResult]:
    """Run the join playbook on ``names``; never raises for a node's failure (it is in its result).

    ``settings``: the site's settings, passed to the playbook so that it reads
    the pinned host keys where ``provision`` wrote them.
    """
    return run_per_node(
        JOIN_PLAYBOOK,
        inventory,
        names,
        extravars=settings.playbook_vars() if settings else {},
        envvars={
            "ANSIBLE_HOST_KEY_CHECKING": "True",  # the playbook pins this boot's host keys
            "ANSIBLE_PIPELINING": "True",  # one SSH round trip per task (root logins: no requiretty)
        },
        vault_password_file=vault_password_file,
        on_event=on_event,
        timeout=timeout,
        verbosity=verbosity,
    )


def run_per_node(
    playbook: Path,
    inventory: Path,
    names: Sequence[str],
    *,
    extravars: Mapping[str, Any],
    envvars: Mapping[str, str] | None = None,
    vault_password_file: str | None = None,
    on_event: Callable[[TaskEvent], None] | None = None,
    timeout: int | None = None,
    verbosity: int = 0,
) -> list[JoinResult]:
    """Run ``playbook`` limited to ``names`` (as ``join_hosts``); one result per node, never raises for a node."""
    if not names:
        return []
    tally = _Tally(started=time.monotonic())

    def handle(event: TaskEvent) -> None:
        host = event.host
        if host in names:
            now = time.monotonic() - tally.started
            if event.kind in (EventKind.FAILED, EventKind.UNREACHABLE) and not event.ignored:
                tally.failed.setdefault(
                    host, f"{event.role + ' : ' if event.role else ''}{event.task}: {event.message}"
                )
                tally.last[host] = now
            elif event.kind in (EventKind.OK, EventKind.CHANGED):
                tally.tasks[host] = tally.tasks.get(host, 0) + 1
                if host not in tally.failed:
                    tally.last[host] = now
        if on_event is not None:
            on_event(event)

    env = dict(envvars or {})
    if vault_password_file:
        env["ANSIBLE_VAULT_PASSWORD_FILE"] = str(Path(vault_password_file).resolve())
    general_error = ""
    try:
        run_playbook(
            playbook,
            inventory=inventory,
            extravars={"join_hosts": ",".join(names), **extravars},
            envvars=env,
            roles_path=[ROLES_DIR],
            on_event=handle,
            limit=",".join(names),
            timeout=timeout,
            verbosity=verbosity,
        )
    except PlaybookError as exc:
        general_error = exc.message
    end = time.monotonic() - tally.started
    results = []
    for name in names:
        if name in tally.failed:
            results.append(
                JoinResult(name, False, tally.last.get(name, end), tally.failed[name], tally.tasks.get(name, 0))
            )
        elif general_error and not tally.tasks.get(name):
            results.append(JoinResult(name, False, end, general_error))
        else:
            results.append(JoinResult(name, True, tally.last.get(name, end), tasks=tally.tasks.get(name, 0)))
    return results


__all__ = ["JOIN_PLAYBOOK", "JoinResult", "join_nodes", "run_per_node"]

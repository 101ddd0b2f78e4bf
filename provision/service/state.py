"""The service's run state: challenges, per-node records, the bounded event list, the status file."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from provision.files import write_atomic
from provision.service.settings import EVENTS_KEPT, NONCE_TTL, NONCES_PER_NODE

log = logging.getLogger("provision.service")


class EventKind(StrEnum):
    BOOT = "boot"  # a new boot marker on the node's console
    KEY = "key"  # its ssh-ed25519 host key for that boot
    SERVED = "served"  # a bundle went out
    REPORT = "report"  # the node reported joined/failed
    PENDING = "pending"  # 503: this boot's key not on the console yet
    REFUSED = "refused"  # 403 (or 400): nothing given


class ReportStatus(StrEnum):
    JOINED = "joined"
    FAILED = "failed"


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")


def now_iso() -> str:
    return _iso(time.time())


def printable(text: str, limit: int = 64) -> str:
    """A claimed value fit for one log line: cut short, control characters escaped."""
    cut = text[:limit]
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode()


@dataclass(frozen=True)
class Event:
    time: float
    kind: EventKind
    node: str  # the claimed node name (printable, cut short)
    peer: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {
            "time": _iso(self.time),
            "kind": str(self.kind),
            "node": self.node,
            "peer": self.peer,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Event:
        return cls(
            time=datetime.fromisoformat(data["time"]).timestamp(),
            kind=EventKind(data["kind"]),
            node=data["node"],
            peer=data["peer"],
            detail=data["detail"],
        )


@dataclass
class NodeRecord:
    """What the service knows of one inventory node (mutable run state)."""

    boot_id: str | None = None  # the console's current boot
    key_fingerprint: str | None = None  # its pinned ssh-ed25519 key, for this boot
    boot_seen: str | None = None
    bundles_served: int = 0
    last_served: str | None = None
    last_report: dict[str, str] | None = None  # status, step, boot_id, time
    refusals: int = 0
    last_refusal: str | None = None
    earlier_boots: list[str] = field(default_factory=list)  # boot ids the console showed before (the last 16)

    def this_boot_report(self) -> dict[str, str]:
        """The last report when it is from the boot the console shows now ({} otherwise)."""
        report = self.last_report or {}
        return report if report and report.get("boot_id") == self.boot_id else {}


class Nonces:
    """Single-use challenges, per node, expiring after NONCE_TTL; at most NONCES_PER_NODE outstanding."""

    def __init__(self, ttl: float = NONCE_TTL, per_node: int = NONCES_PER_NODE) -> None:
        self.ttl = ttl
        self.per_node = per_node
        self._by_node: dict[str, OrderedDict[str, float]] = {}

    def issue(self, node: str, now: float, ttl: float | None = None) -> str:
        pending = self._by_node.setdefault(node, OrderedDict())
        for nonce, expires in list(pending.items()):
            if expires <= now:
                del pending[nonce]
        while len(pending) >= self.per_node:
            pending.popitem(last=False)
        nonce = secrets.token_urlsafe(32)
        pending[nonce] = now + (self.ttl if ttl is None else ttl)
        return nonce

    def valid(self, node: str, nonce: str, now: float) -> bool:
        pending = self._by_node.get(node)
        expires = pending.get(nonce) if pending is not None else None
        return expires is not None and expires > now

    def consume(self, node: str, nonce: str, now: float) -> bool:
        """Use a nonce up; False when it was not outstanding (replay) or expired."""
        expires = self._by_node.get(node, OrderedDict()).pop(nonce, None)
        return expires is not None and expires > now


@dataclass
class ServiceState:
    """Node records and the bounded event list; mirrored to the status file."""

    status_file: Path
    address: str = ""
    port: int = 0
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    started: float = field(default_factory=time.time)
    dirty: bool = True

    def resume(self) -> None:
        """Carry over what the last run of the service wrote (records, events): a restart forgets nothing."""
        from provision.service.errors import JoinServiceError

        try:
            previous = read_status(self.status_file)
        except (JoinServiceError, KeyError, TypeError, ValueError) as exc:  # replaced, not fatal
            log.warning("%s: not carried over (%s)", self.status_file, exc)
            return
        if previous is None:
            return
        for name, record in previous.nodes.items():
            if name in self.nodes:
                self.nodes[name] = record
        self.events.extend(previous.events)

    def event(self, kind: EventKind, node: str, peer: str, detail: str) -> Event:
        now = time.time()
        shown = printable(node)
        item = Event(now, kind, shown, peer, detail)
        self.events.append(item)
        record = self.nodes.get(node)
        if kind is EventKind.REFUSED:
            log.warning("%s refused peer=%s node=%s reason=%s", _iso(now), peer, shown, detail)
            if record is not None:
                record.refusals += 1
                record.last_refusal = f"{_iso(now)} {peer}: {detail}"
        elif kind is EventKind.PENDING:
            log.info("%s pending peer=%s node=%s reason=%s", _iso(now), peer, shown, detail)
        else:
            log.info("%s %s peer=%s node=%s %s", _iso(now), kind, peer, shown, detail)
        self.dirty = True
        return item

    def snapshot(self) -> dict[str, Any]:
        return {
            "service": {"address": self.address, "port": self.port, "started": _iso(self.started)},
            "written": _iso(time.time()),
            "nodes": {name: asdict(record) for name, record in sorted(self.nodes.items())},
            "events": [e.as_dict() for e in self.events],
        }

    def write(self) -> None:
        """The status file, readable by its owner only (it names peers and nodes, never a secret)."""
        write_atomic(self.status_file, json.dumps(self.snapshot(), indent=1) + "\n", mode=0o600)
        self.dirty = False


@dataclass(frozen=True)
class ServiceStatus:
    """The status file as the lead's commands read it (``provision boot events/status``)."""

    address: str
    port: int
    started: str
    written: str
    nodes: dict[str, NodeRecord]
    events: tuple[Event, ...]

    def refusals(self) -> list[Event]:
        return [e for e in self.events if e.kind is EventKind.REFUSED]


def read_status(status_file: Path) -> ServiceStatus | None:
    """The last status the service wrote, or None when it never ran."""
    try:
        data = json.loads(Path(status_file).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        from provision.service.errors import JoinServiceError

        raise JoinServiceError(f"{status_file}: unreadable ({exc})", hint="restart `provision service run`") from exc
    service = data["service"]
    return ServiceStatus(
        address=service["address"],
        port=int(service["port"]),
        started=service["started"],
        written=data["written"],
        nodes={name: NodeRecord(**record) for name, record in data["nodes"].items()},
        events=tuple(Event.from_dict(e) for e in data["events"]),
    )

"""A rollout's state on disk: ``<state dir>/rollout/state.json``, one rollout per site at a time.

Saved at every change of a node's phase (atomically), so a killed
``provision`` loses nothing: ``--resume`` reads it back. ``rollout.lock`` is
held (flock) by the process carrying the rollout out; a second one is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from provision.errors import RolloutError
from provision.files import write_atomic


class NodePhase(StrEnum):
    PENDING = "pending"  # not started (a later wave)
    ASSIGNED = "assigned"  # pinned to the new version on the boot backend
    WAITING = "waiting for jobs"  # drained, reboot requested; its jobs still run
    REBOOTING = "rebooting"  # no job left: Slurm reboots it (or its BMC did)
    BOOTED = "booted"  # a new boot on its console
    JOINED = "joined"  # its agent reported joined, on the new version
    RESUMED = "resumed"  # back in service in Slurm
    DONE = "done"  # and the site's check passed
    FAILED = "failed"
    ROLLING_BACK = "rolling back"
    ROLLED_BACK = "rolled back"  # on its previous version again, in service
    ROLLBACK_FAILED = "rollback failed"
    SKIPPED = "skipped"  # already on the version


#: Phases in which the node is out of service because of this rollout.
IN_FLIGHT = frozenset({NodePhase.ASSIGNED, NodePhase.WAITING, NodePhase.REBOOTING, NodePhase.BOOTED,
                       NodePhase.JOINED, NodePhase.RESUMED})  # fmt: skip
FINAL = frozenset({NodePhase.DONE, NodePhase.SKIPPED, NodePhase.ROLLED_BACK, NodePhase.ROLLBACK_FAILED})


class RolloutStatus(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"  # interrupted, or stopped at --deadline: --resume goes on
    DONE = "done"
    FAILED = "failed"  # a node failed; it was rolled back; the rest untouched


@dataclass
class NodeRollout:
    name: str
    previous: str  # the version it booted before
    phase: NodePhase = NodePhase.PENDING
    old_boot: str | None = None  # its boot id (join service) when the reboot was asked for
    boot: str | None = None  # the new boot's id
    release: str = ""  # what the node reported it runs
    times: dict[str, float] = field(default_factory=dict)  # phase -> wall-clock time reached
    error: str = ""
    console_tail: list[str] = field(default_factory=list)

    def reach(self, phase: NodePhase, now: float | None = None) -> None:
        self.phase = phase
        self.times.setdefault(phase.value, time.time() if now is None else now)

    def durations(self) -> dict[str, float]:
        """Seconds per step: drain wait, reboot, boot (to the new boot seen), join, resume, check."""
        t = self.times
        steps = {
            "drain_wait": ("waiting for jobs", "rebooting"),
            "reboot": ("rebooting", "booted"),
            "boot_and_join": ("booted", "joined"),
            "resume": ("joined", "resumed"),
            "check": ("resumed", "done"),
        }
        return {k: round(t[b] - t[a], 1) for k, (a, b) in steps.items() if a in t and b in t}

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        data["seconds"] = self.durations()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeRollout:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["phase"] = NodePhase(fields.get("phase", NodePhase.PENDING))
        return cls(**fields)


@dataclass
class RolloutState:
    image: str
    version: str
    waves: list[list[str]]
    nodes: dict[str, NodeRollout]
    options: dict[str, Any]
    status: RolloutStatus = RolloutStatus.RUNNING
    wave: int = 0  # the wave under way
    started: float = field(default_factory=time.time)
    finished: float | None = None
    max_out: int = 0  # the most selected nodes seen out of service at once
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "version": self.version,
            "status": self.status.value,
            "message": self.message,
            "wave": self.wave,
            "waves": self.waves,
            "options": self.options,
            "started": self.started,
            "finished": self.finished,
            "max_out": self.max_out,
            "nodes": [self.nodes[n].as_dict() for w in self.waves for n in w],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        nodes = {n["name"]: NodeRollout.from_dict(n) for n in data["nodes"]}
        return cls(
            image=data["image"], version=data["version"], waves=[list(w) for w in data["waves"]], nodes=nodes,
            options=dict(data.get("options", {})), status=RolloutStatus(data["status"]), wave=int(data["wave"]),
            started=float(data["started"]), finished=data.get("finished"), max_out=int(data.get("max_out", 0)),
            message=str(data.get("message", "")),
        )  # fmt: skip


class RolloutStore:
    """``<state dir>/rollout/``: the state file and the lock of the process carrying it out."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "rollout"
        self.path = self.root / "state.json"
        self._lock: IO[str] | None = None

    def load(self) -> RolloutState | None:
        try:
            return RolloutState.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RolloutError(f"{self.path}: unreadable rollout state ({type(exc).__name__})",
                               hint="fix or remove it (nodes may still be pinned: provision boot status)") from exc  # fmt: skip

    def save(self, state: RolloutState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(state.as_dict(), indent=1) + "\n", mode=0o644)

    def lock(self) -> None:
        """Hold the lock for this process's life; refused when another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / "rollout.lock", "a+")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RolloutError(f"a rollout is under way (pid {holder})", hint="wait for it, or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

"""Slurm, as the admin host drives it: node states, reboots through slurmctld, jobs.

Everything goes through Slurm's own commands (``scontrol``, ``srun``) from
``provision_slurm_bin_dir`` (default: ``PATH``), so a site's slurmctld, its
authentication and its RebootProgram are used as they are. ``scontrol show
node -o`` is read rather than ``--json``: Debian 12's Slurm 22.05 has no
JSON output without its data-parser plugins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from provision import proc
from provision.errors import CommandError, ProvisionError

#: ``Key=`` at the start of a field of ``scontrol show node -o`` (values may contain blanks: Reason, OS).
_FIELD = re.compile(r"(?:^| )([A-Z][A-Za-z]*)=")
#: Flags after which a node takes no new job (sinfo shows it drain/down/reboot).
OUT_FLAGS = frozenset({"DRAIN", "NOT_RESPONDING", "REBOOT_REQUESTED", "REBOOT_ISSUED", "POWERING_DOWN", "POWERED_DOWN"})
BUSY_STATES = frozenset({"ALLOCATED", "MIXED", "COMPLETING"})


class SlurmError(ProvisionError):
    """slurmctld could not be asked or refused a request."""


@dataclass(frozen=True)
class SlurmNode:
    """One node as slurmctld sees it: ``State=MIXED+DRAIN+REBOOT_REQUESTED`` → base MIXED, flags {DRAIN, …}."""

    name: str
    base: str
    flags: frozenset[str]
    reason: str = ""
    boot_time: str = ""

    @property
    def state(self) -> str:
        return "+".join([self.base, *sorted(self.flags)])

    @property
    def busy(self) -> bool:
        """Jobs still run on it (what ``reboot ASAP`` waits for)."""
        return self.base in BUSY_STATES or "COMPLETING" in self.flags

    @property
    def out(self) -> bool:
        """Not taking jobs: down, drained or draining, not responding, or rebooting."""
        return self.base in {"DOWN", "UNKNOWN", "FUTURE"} or bool(self.flags & OUT_FLAGS)

    @property
    def usable(self) -> bool:
        """In service: idle, mixed or allocated, and none of the above."""
        return self.base in {"IDLE", *BUSY_STATES} and not self.out

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "state": self.state, "reason": self.reason, "boot_time": self.boot_time}


def parse_nodes(text: str) -> dict[str, SlurmNode]:
    """``scontrol show node -o`` output: one node per line."""
    nodes: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        marks = list(_FIELD.finditer(line))
        fields = {
            m.group(1): line[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(line)].strip()
            for i, m in enumerate(marks)
        }
        name = fields.get("NodeName")
        if not name:
            continue
        base, *flags = (fields.get("State") or "UNKNOWN").upper().split("+")
        reason = fields.get("Reason", "")
        nodes[name] = SlurmNode(name, base.rstrip("*~#%$@^-!"), frozenset(flags), reason, fields.get("BootTime", ""))
    return nodes


@dataclass(frozen=True)
class Slurm:
    """slurmctld through its commands in ``bin_dir`` (None: from PATH)."""

    bin_dir: Path | None = None
    timeout: float = 60.0

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def _run(self, tool: str, *args: str, timeout: float | None = None) -> str:
        try:
            return proc.output([self._tool(tool), *args], what=f"{tool} {' '.join(args[:2])}",
                               timeout=timeout or self.timeout, hint="check slurmctld (`scontrol ping`) and "
                               "provision_slurm_bin_dir")  # fmt: skip
        except CommandError as exc:
            raise SlurmError(exc.message, hint=exc.hint) from exc

    def nodes(self, names: Sequence[str]) -> dict[str, SlurmNode]:
        """The named nodes slurmctld knows (an unknown name is simply absent)."""
        if not names:
            return {}
        known = parse_nodes(self._run("scontrol", "-o", "show", "node"))
        return {name: known[name] for name in names if name in known}

    def reboot_asap(self, names: Sequence[str], reason: str) -> None:
        """Drain now, reboot through RebootProgram once the jobs end, resume when slurmd registers again."""
        self._run("scontrol", "reboot", "ASAP", "nextstate=RESUME", f"reason={reason}", ",".join(names))

    def cancel_reboot(self, names: Sequence[str]) -> None:
        self._run("scontrol", "cancel_reboot", ",".join(names))

    def resume(self, names: Sequence[str]) -> None:
        self._run("scontrol", "update", f"nodename={','.join(names)}", "state=RESUME")

    def run_on(self, node: str, command: str, timeout: float) -> tuple[bool, str]:
        """``command`` as a one-node Slurm job on ``node`` (``sh -c``); ok and the output's tail."""
        argv = [self._tool("srun"), "-N1", "-n1", f"--nodelist={node}", f"--time={max(1, int(timeout // 60))}"]
        argv += ["sh", "-c", command]
        try:
            result = proc.run(argv, timeout=timeout, check=False)
        except CommandError as exc:
            return False, exc.message
        output = " ".join(f"{result.stdout}\n{result.stderr}".split())[-300:]
        return result.returncode == 0, output or f"exit {result.returncode}"

"""A node's serial console log (the lab's QEMU file, a site's conserver log).

The stateless image prints markers on the kernel log, which reaches the
serial console: ``provision: ssh-host-key <type> <key>`` for each host key
of this boot (pinned for the join), ``provision: node ready (multi-user)``.
``ConsoleLog`` reads what a boot wrote after ``mark()``; a file that shrank
(QEMU truncates it when the machine starts) is read from its start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HOST_KEY = re.compile(r"provision: ssh-host-key (?P<type>[a-z0-9@.-]+) (?P<key>[A-Za-z0-9+/]+={0,3})(?=\s|$)")
_READY = re.compile(r"provision: node ready")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class HostKey:
    type: str
    key: str

    def known_hosts_line(self, alias: str) -> str:
        return f"{alias} {self.type} {self.key}"


class ConsoleLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def mark(self) -> None:
        """From now on, read only what is written after this point (a new boot)."""
        self.offset = self._size()

    def text(self) -> str:
        """What was written since ``mark()``, without terminal escapes and carriage returns."""
        if self._size() < self.offset:
            self.offset = 0  # the file was truncated: a new writer
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                raw = fh.read()
        except OSError:
            return ""
        return _ESCAPES.sub("", raw.decode(errors="replace").replace("\r", ""))

    def host_keys(self) -> list[HostKey]:
        seen: dict[str, HostKey] = {}
        for match in _HOST_KEY.finditer(self.text()):
            seen[match["type"]] = HostKey(match["type"], match["key"])  # the last of each type wins
        return list(seen.values())

    def ready(self) -> bool:
        return bool(_READY.search(self.text()))

    def tail(self, lines: int = 15) -> list[str]:
        return [line for line in self.text().splitlines() if line.strip()][-lines:]


__all__ = ["ConsoleLog", "HostKey"]

"""A node's serial console log (the lab's QEMU file, a site's conserver log).

The stateless image prints markers on the kernel log, which reaches the
serial console, a channel nobody on the provisioning network can write to:

    [    4.123456] provision: boot <boot_id>                  (/proc/sys/kernel/random/boot_id)
    [    4.234567] provision: ssh-host-key <type> <base64>    (one per host key made in this boot)
    [   19.876543] provision: node ready (multi-user)

A marker counts only when it is well formed and starts its line (after an
optional kernel timestamp): text typed after ``login:`` or logged by a
service mid-line is never a marker. Host keys count only after the latest
``provision: boot`` marker, and the first key of each type after it wins, so
a line printed later in the boot (when other people can make the console
print things) cannot replace the key the node announced first.

``ConsoleParser`` is the incremental parser (bytes in, complete lines only);
``ConsoleLog`` reads what a boot wrote after ``mark()`` (``node boot``) and
``ConsoleFollower`` follows a log for as long as it runs (the join service).
A file that shrank was truncated by a new writer (QEMU truncates it when the
machine starts): its boot is forgotten and it is read from its start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_TIMESTAMP = r"(?:\[\s*\d{1,10}\.\d{1,9}\] )?"
_BOOT = re.compile(
    rf"{_TIMESTAMP}provision: boot (?P<id>[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}})[ \t]*"
)
_HOST_KEY = re.compile(
    rf"{_TIMESTAMP}provision: ssh-host-key (?P<type>[a-z0-9@.-]{{1,64}}) (?P<key>[A-Za-z0-9+/=]+)[ \t]*"
)
_READY = re.compile(rf"{_TIMESTAMP}provision: node ready(?: \([a-z-]+\))?[ \t]*")
# Terminal escapes and control characters (not \n, which ends lines). A bare
# carriage return is dropped, not taken as a line start: text typed after a
# prompt cannot move itself to the start of a line.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x09\x0b-\x1f\x7f]")

#: Key types an OpenSSH server makes, and the length of the public point where it is fixed.
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
_MAX_LINE = 16384  # a longer "line" is noise; its markers are not read


def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The SSH wire strings of a public-key blob, or None when it is not exactly a list of them."""
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            return None
        (size,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4
        if pos + size > len(blob):
            return None
        out.append(blob[pos : pos + size])
        pos += size
    return out


def parse_public_key(key_type: str, key: str) -> bytes | None:
    """The blob of an OpenSSH public key (``<type> <base64>``) when well formed, else None."""
    if key_type not in KEY_TYPES:
        return None
    try:
        blob = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(blob).decode() != key:  # one spelling per key: canonical padding only
        return None
    parts = _ssh_strings(blob)
    if not parts or parts[0] != key_type.encode():
        return None
    if key_type == "ssh-ed25519":
        return blob if len(parts) == 2 and len(parts[1]) == 32 else None
    if key_type.startswith("ecdsa-sha2-"):
        return blob if len(parts) == 3 and parts[1] == key_type.removeprefix("ecdsa-sha2-").encode() else None
    return blob if len(parts) == 3 else None  # ssh-rsa: e, n


@dataclass(frozen=True)
class HostKey:
    type: str
    key: str

    def known_hosts_line(self, alias: str) -> str:
        return f"{alias} {self.type} {self.key}"

    @property
    def openssh(self) -> str:
        """``<type> <base64>``, as in a ``.pub`` file (an age ssh recipient)."""
        return f"{self.type} {self.key}"

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.key)

    @property
    def fingerprint(self) -> str:
        """``SHA256:…``, as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class ConsoleBoot:
    """What the console showed of one boot: its id (None: no marker read yet) and its host keys."""

    boot_id: str | None
    keys: tuple[HostKey, ...] = ()
    ready: bool = False

    def key(self, key_type: str) -> HostKey | None:
        return next((k for k in self.keys if k.type == key_type), None)


def clean_line(raw: bytes) -> str:
    """One console line as text: decoded, without terminal escapes and control characters."""
    return _ESCAPES.sub("", raw.decode(errors="replace"))


class ConsoleParser:
    """Reads console bytes as they come; only complete lines count.

    ``current`` is the latest boot. Keys and ``ready`` before the first boot
    marker belong to an anonymous boot (``boot_id`` None) that ``ConsoleLog``
    uses for images that print no boot marker; the join service never does.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._boot_id: str | None = None
        self._keys: dict[str, HostKey] = {}
        self._ready = False
        self.boot_ids: list[str] = []  # every boot seen, oldest first (bounded)

    @property
    def current(self) -> ConsoleBoot:
        return ConsoleBoot(self._boot_id, tuple(self._keys.values()), self._ready)

    def drop_partial(self) -> None:
        self._partial = b""

    @property
    def partial(self) -> bytes:
        """The last line, still unterminated."""
        return self._partial

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE:
            self._partial = self._partial[-_MAX_LINE:]
        for raw in lines:
            if len(raw) <= _MAX_LINE:
                self._line(clean_line(raw))

    def _line(self, line: str) -> None:
        if "provision: " not in line:
            return
        if boot := _BOOT.fullmatch(line):
            self._boot_id = boot["id"]
            self._keys = {}
            self._ready = False
            if boot["id"] not in self.boot_ids:
                self.boot_ids = [*self.boot_ids[-63:], boot["id"]]
        elif key := _HOST_KEY.fullmatch(line):
            if key["type"] not in self._keys and parse_public_key(key["type"], key["key"]) is not None:
                self._keys[key["type"]] = HostKey(key["type"], key["key"])  # the first of each type wins
        elif _READY.fullmatch(line):
            self._ready = True


def parse(data: bytes) -> ConsoleBoot:
    """The latest boot in console bytes (complete lines only)."""
    parser = ConsoleParser()
    parser.feed(data)
    return parser.current


class ConsoleLog:
    """What a node's console printed since ``mark()`` (``provision node boot``)."""

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

    def raw(self) -> bytes:
        if self._size() < self.offset:
            self.offset = 0  # the file was truncated: a new writer
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                return fh.read()
        except OSError:
            return b""

    def text(self) -> str:
        """What was written since ``mark()``, without terminal escapes and carriage returns."""
        return "\n".join(clean_line(line) for line in self.raw().split(b"\n"))

    def boot(self) -> ConsoleBoot:
        """The latest boot since ``mark()``; ``mark()`` itself starts a boot for images without a boot marker."""
        return parse(self.raw())

    def host_keys(self) -> list[HostKey]:
        return list(self.boot().keys)

    def ready(self) -> bool:
        return self.boot().ready

    def tail(self, lines: int = 15) -> list[str]:
        return [line for line in self.text().split("\n") if line.strip()][-lines:]


class ConsoleFollower:
    """Follows one console log for as long as the caller polls it (the join service).

    Reads the whole file at the first poll (the latest boot marker in it is
    the node's current boot), then only what was appended. A file that shrank
    was truncated by a new writer: its boots are forgotten. A file replaced by
    another one (log rotation) is read from its start with the boot kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.parser = ConsoleParser()
        self._offset = 0
        self._inode: tuple[int, int] | None = None
        self._last = b""  # the bytes just before the offset: a rewrite shows as a change there

    @property
    def current(self) -> ConsoleBoot:
        return self.parser.current

    def _unchanged(self, fh: BinaryIO) -> bool:
        if not self._last:
            return True
        fh.seek(self._offset - len(self._last))
        return fh.read(len(self._last)) == self._last

    def seen_boot(self, boot_id: str) -> bool:
        return boot_id in self.parser.boot_ids

    def poll(self, chunk: int = 1 << 20) -> bool:
        """Read what is new; True when anything was read."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                inode = (st.st_dev, st.st_ino)
                if self._inode is not None and inode != self._inode:
                    self._offset, self._last = 0, b""  # rotated: a new file, the same node still running
                    self.parser.drop_partial()
                elif st.st_size < self._offset or not self._unchanged(fh):
                    self.parser = ConsoleParser()  # truncated (and maybe written again): a new writer
                    self._offset, self._last = 0, b""
                self._inode = inode
                if st.st_size == self._offset:
                    return False
                fh.seek(self._offset)
                while data := fh.read(chunk):
                    self.parser.feed(data)
                    self._offset += len(data)
                    self._last = (self._last + data)[-64:]
                return True
        except OSError:
            return False


__all__ = [
    "KEY_TYPES",
    "ConsoleBoot",
    "ConsoleFollower",
    "ConsoleLog",
    "ConsoleParser",
    "HostKey",
    "clean_line",
    "parse",
    "parse_public_key",
]

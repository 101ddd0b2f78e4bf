"""A node's join bundle: the rendered files packed as a tar, encrypted per request.

``<bundles>/<node>/`` holds ``files/`` (paths relative to /) and
``manifest.json`` = ``{"files": [{"path", "owner", "group", "mode"}, ...],
"services": [...]}``. The tar holds exactly the manifest's files (owner and
group by name, the manifest's mode) and the manifest itself at
``MANIFEST_MEMBER``; it is packed in memory once and kept until a file of
the bundle changes. Each answer is the tar encrypted with age to the ssh-ed25519
host key pinned from the node's console for this boot.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyrage  # type: ignore[import-untyped]

from provision.console import HostKey
from provision.service.errors import BundleError

MANIFEST_MEMBER = "manifest.json"  # at the top of the tar, as the agent reads it
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
_SERVICE = re.compile(r"[A-Za-z0-9@_.:-]{1,128}")
_MAX_FILE = 16 << 20


@dataclass(frozen=True)
class BundleFile:
    path: str  # absolute, normalized
    owner: str
    group: str
    mode: int


@dataclass(frozen=True)
class Manifest:
    files: tuple[BundleFile, ...]
    services: tuple[str, ...]


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read the bundle manifest ({exc})", hint="render the bundle again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise BundleError(f"{path}: no files list", hint="render the bundle again")
    files = []
    for entry in data["files"]:
        if not isinstance(entry, dict):
            raise BundleError(f"{path}: a files entry is not a mapping", hint="render the bundle again")
        files.append(_file_entry(path, entry))
    services = data.get("services", [])
    if not isinstance(services, list) or not all(isinstance(s, str) and _SERVICE.fullmatch(s) for s in services):
        raise BundleError(f"{path}: services must be a list of unit names", hint="render the bundle again")
    return Manifest(tuple(files), tuple(services))


def _file_entry(manifest: Path, entry: dict[str, object]) -> BundleFile:
    raw_path, owner, group, mode = (entry.get(k) for k in ("path", "owner", "group", "mode"))
    pure = PurePosixPath(str(raw_path))
    if (
        not isinstance(raw_path, str)
        or not pure.is_absolute()
        or str(pure) != raw_path
        or ".." in pure.parts
        or pure == PurePosixPath("/")
    ):
        raise BundleError(f"{manifest}: path {raw_path!r} is not a normalized absolute path", hint="fix the manifest")
    if pure.parts[1] not in ("etc", "var") or (pure.parts[1] == "var" and pure.parts[2:3] != ("lib",)):
        # What the agent installs, the service packs: configuration and state, never /root, /usr, units, ...
        raise BundleError(f"{manifest}: {raw_path} is outside /etc and /var/lib", hint="fix the join roles' paths")
    if not (
        isinstance(owner, str) and _ACCOUNT.fullmatch(owner) and isinstance(group, str) and _ACCOUNT.fullmatch(group)
    ):
        raise BundleError(f"{manifest}: {raw_path}: bad owner or group", hint="write user and group names")
    if not (isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode)):
        # The agent unpacks the tar with exactly these permissions.
        raise BundleError(
            f"{manifest}: {raw_path}: mode {mode!r} is not an octal permission",
            hint='write e.g. "0400" (no setuid, setgid or sticky bit)',
        )
    return BundleFile(raw_path, owner, group, int(mode, 8))


class BundleStore:
    """Packed bundles by node, repacked when the node's bundle directory changes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple[tuple[int, int, int], ...], Manifest, bytes]] = {}
        self._recipients: dict[str, object] = {}

    def _stamp(self, node: str, manifest: Manifest | None = None) -> tuple[tuple[int, int, int], ...]:
        base = self.root / node
        paths = [base / "manifest.json"]
        if manifest is not None:
            paths += [base / "files" / f.path.lstrip("/") for f in manifest.files]
        stamps = []
        for path in paths:
            try:
                st = path.lstat()
            except OSError:
                stamps.append((0, 0, 0))
                continue
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def exists(self, node: str) -> bool:
        return (self.root / node / "manifest.json").is_file()

    def tar(self, node: str) -> bytes:
        """The node's bundle as an uncompressed tar, from the cache while nothing changed."""
        cached = self._cache.get(node)
        if cached is not None and self._stamp(node, cached[1]) == cached[0]:
            return cached[2]
        manifest = read_manifest(self.root / node / "manifest.json")
        stamp = self._stamp(node, manifest)
        packed = self._pack(node, manifest)
        self._cache[node] = (stamp, manifest, packed)
        return packed

    def _pack(self, node: str, manifest: Manifest) -> bytes:
        files_dir = self.root / node / "files"
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in manifest.files:
                source = files_dir / entry.path.lstrip("/")
                try:
                    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as exc:
                    raise BundleError(
                        f"{node}: {entry.path} is in the manifest but not a regular file under files/",
                        hint="render the bundle again",
                    ) from exc
                with os.fdopen(fd, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE:
                        raise BundleError(f"{node}: {entry.path} is not a regular file", hint="render the bundle again")
                    data = fh.read()
                tar.addfile(
                    _member(entry.path.lstrip("/"), len(data), entry.mode, entry.owner, entry.group), io.BytesIO(data)
                )
            meta = json.dumps(
                {
                    "files": [
                        {"path": f.path, "owner": f.owner, "group": f.group, "mode": f"{f.mode:04o}"}
                        for f in manifest.files
                    ],
                    "services": list(manifest.services),
                },
                indent=1,
            ).encode()
            tar.addfile(_member(MANIFEST_MEMBER, len(meta), 0o600, "root", "root"), io.BytesIO(meta))
        return out.getvalue()

    def encrypt(self, node: str, key: HostKey) -> bytes:
        """The node's bundle encrypted with age to ``key`` (its console-pinned ssh-ed25519 key)."""
        data = self.tar(node)
        recipient = self._recipients.get(key.openssh)
        if recipient is None:
            try:
                recipient = pyrage.ssh.Recipient.from_str(key.openssh)
            except pyrage.RecipientError as exc:
                raise BundleError(f"{node}: the pinned key is not an age recipient", hint=str(exc)) from exc
            if len(self._recipients) > 4096:
                self._recipients.clear()
            self._recipients[key.openssh] = recipient
        encrypted: bytes = pyrage.encrypt(data, [recipient])
        return encrypted


def _member(name: str, size: int, mode: int, owner: str, group: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.uid = info.gid = 0
    info.uname, info.gname = owner, group
    info.mtime = 0  # the same bundle packs to the same bytes
    return info

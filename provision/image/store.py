"""The image store: published images, one directory per version.

Layout::

    <store>/<name>/<version>/{vmlinuz,initrd.img,rootfs.squashfs,manifest.json}
    <store>/<name>/current -> <version>
    <store>/.build-<name>-<random>/      a build in progress (locked by its builder)

A build writes into a staging directory inside the store (same filesystem),
the store verifies every hash against the manifest, renames the directory
into place, then swaps ``current`` by renaming a new symlink over it. A
killed build therefore never touches ``current``; its staging directory is
removed by the next build or ``clean_stale()`` once its lock is free.

Boot backends use ``ImageStore(path).current(name)``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from provision.errors import ImageError
from provision.image.chroot import remove_tree
from provision.names import IMAGE_RULE, VERSION_RULE, is_exact_image_name, is_version

ARTEFACTS = {"kernel": "vmlinuz", "initrd": "initrd.img", "squashfs": "rootfs.squashfs"}
MANIFEST = "manifest.json"
CURRENT = "current"
STAGING_PREFIX = ".build-"
_VERSION = re.compile(r"^\d{8}-\d{6}(\.\d+)?$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageVersion:
    """One published version of an image: paths to its boot artefacts."""

    name: str
    version: str
    path: Path
    is_current: bool = False

    @property
    def kernel(self) -> Path:
        return self.path / ARTEFACTS["kernel"]

    @property
    def initrd(self) -> Path:
        return self.path / ARTEFACTS["initrd"]

    @property
    def squashfs(self) -> Path:
        return self.path / ARTEFACTS["squashfs"]

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self.name} {self.version}: unreadable manifest", hint="rebuild the image") from exc
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key, {}), dict) for key in ("kernel", "artefacts", "sizes", "stages")
        ):
            raise ImageError(f"{self.name} {self.version}: manifest is not a manifest object", hint="rebuild the image")
        return data

    def cmdline(self, squashfs_url: str) -> str:
        """The full kernel command line to boot this version, root from squashfs_url."""
        extra = self.read_manifest().get("kernel", {}).get("cmdline", "")
        return f"root=live:{squashfs_url} {extra if isinstance(extra, str) else ''}".strip()

    def verify(self) -> None:
        """Raise ImageError unless every artefact matches the manifest's sha256."""
        verify_dir(self.path, self.read_manifest())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "current": self.is_current,
            "path": str(self.path),
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "squashfs": str(self.squashfs),
            "manifest": str(self.manifest),
        }


def verify_dir(path: Path, manifest: dict[str, Any]) -> None:
    artefacts = manifest.get("artefacts") or {}
    for filename in ARTEFACTS.values():
        entry = artefacts.get(filename)
        target = path / filename
        if not entry or not target.is_file():
            raise ImageError(f"{path}: {filename} missing", hint="rebuild the image")
        actual = sha256_file(target)
        if actual != entry.get("sha256"):
            raise ImageError(f"{target}: sha256 mismatch (manifest {entry.get('sha256')}, file {actual})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Staging:
    """A build's private directory inside the store (locked while it lives)."""

    name: str
    path: Path
    lock: IO[str]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def out(self) -> Path:
        return self.path / "out"


def check_name(name: str) -> str:
    """An image name that may become a directory of the store (``provision.names``)."""
    if not is_exact_image_name(name):
        raise ImageError(f"image name {name!r} is not valid", hint=IMAGE_RULE)
    return name


def check_version(name: str, version: str) -> str:
    if not is_version(version):
        raise ImageError(f"{name}: version {version!r} is not valid", hint=VERSION_RULE)
    return version


class ImageStore:
    """Every path under ``root`` is built by ``_base``/``_version_dir``: names checked, kept inside."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _inside(self, path: Path, what: str) -> Path:
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise ImageError(f"{what}: {path} is outside the image store {root}", hint=IMAGE_RULE)
        return path

    def _base(self, name: str) -> Path:
        """The image's directory: the name checked, the path (symlinks resolved) inside the store."""
        return self._inside(self.root / check_name(name), f"image {name!r}")

    def _version_dir(self, name: str, version: str) -> Path:
        base = self._base(name)
        return self._inside(base / check_version(name, version), f"{name} {version!r}")

    # --- reading -----------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _current_version(self, name: str) -> str | None:
        link = self._base(name) / CURRENT
        if not link.is_symlink():
            return None
        version = os.readlink(link).rstrip("/").split("/")[-1]
        return version if is_version(version) else None

    def versions(self, name: str) -> list[ImageVersion]:
        base = self._base(name)
        if not base.is_dir():
            return []
        current = self._current_version(name)
        return [
            ImageVersion(name, p.name, p, is_current=p.name == current)
            for p in sorted(base.iterdir(), key=lambda p: p.name)
            if p.is_dir() and not p.is_symlink() and _VERSION.match(p.name)
        ]

    def get(self, name: str, version: str) -> ImageVersion:
        self._version_dir(name, version)
        for item in self.versions(name):
            if item.version == version:
                return item
        have = ", ".join(v.version for v in self.versions(name)) or "none"
        raise ImageError(f"{name}: no version {version!r} in {self.root}", hint=f"versions: {have}")

    def current(self, name: str) -> ImageVersion:
        version = self._current_version(name)
        if version is None or not self._version_dir(name, version).is_dir():
            raise ImageError(
                f"{name}: no published image in {self.root}", hint=f"run `provision image build {name}` first"
            )
        return ImageVersion(name, version, self._version_dir(name, version), is_current=True)

    # --- locking and staging -----------------------------------------------
    @contextmanager
    def _name_lock(self, name: str, *, create: bool = False) -> Iterator[None]:
        """The image's lock; only a publish creates the image's directory, after checking the name."""
        base = self._base(name)
        if create:
            base.mkdir(parents=True, exist_ok=True)
            self._base(name)  # a symlink planted meanwhile still may not lead out
        elif not base.is_dir():
            raise ImageError(f"{name}: no such image in {self.root}", hint="`provision image list` shows the images")
        with open(base / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def clean_stale(self) -> list[Path]:
        """Remove staging directories of builds that are no longer running."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in sorted(self.root.glob(f"{STAGING_PREFIX}*")):
            lock_path = path / ".lock"
            try:
                handle = open(lock_path, "a")  # noqa: SIM115 - held across the removal
            except OSError:
                handle = None
            try:
                if handle is not None:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a build is running there
                remove_tree(path)
                removed.append(path)
            finally:
                if handle is not None:
                    handle.close()
        return removed

    @contextmanager
    def staging(self, name: str) -> Iterator[Staging]:
        """A locked staging directory, removed on exit whatever happens."""
        check_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
        path.mkdir()
        lock = open(path / ".lock", "w")  # noqa: SIM115 - lives as long as the staging dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        staging = Staging(name, path, lock)
        staging.out.mkdir()
        try:
            yield staging
        finally:
            try:
                remove_tree(path)
            finally:
                lock.close()

    # --- writing -------------------------------------------------------------
    def new_version(self, name: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        existing = {v.version for v in self.versions(name)}
        version, n = stamp, 1
        while version in existing:
            version = f"{stamp}.{n}"
            n += 1
        return version

    def publish(self, staging: Staging, version: str, *, keep: int = 3) -> ImageVersion:
        """Verify staging.out against its manifest, move it into place, swap current."""
        name = check_name(staging.name)
        check_version(name, version)
        manifest = json.loads((staging.out / MANIFEST).read_text())
        verify_dir(staging.out, manifest)
        for item in staging.out.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        with self._name_lock(name, create=True):
            base = self._base(name)
            final = self._version_dir(name, version)
            if final.exists():
                raise ImageError(f"{name}: version {version} already exists", hint="build again (new version)")
            staging.out.chmod(0o755)
            os.rename(staging.out, final)
            _fsync_dir(base)
            self._point_current(name, version)
            self._prune(name, keep)
        return ImageVersion(name, version, final, is_current=True)

    def _point_current(self, name: str, version: str) -> None:
        check_version(name, version)
        base = self._base(name)
        tmp = base / f".{CURRENT}-{secrets.token_hex(4)}"
        tmp.symlink_to(version)
        os.replace(tmp, base / CURRENT)
        _fsync_dir(base)

    def _prune(self, name: str, keep: int) -> list[str]:
        versions = self.versions(name)
        removed = []
        excess = len(versions) - keep
        for item in versions:
            if excess <= 0:
                break
            if item.is_current:
                continue
            remove_tree(item.path)
            removed.append(item.version)
            excess -= 1
        return removed

    def prune(self, name: str, keep: int) -> list[str]:
        with self._name_lock(name):
            return self._prune(name, keep)

    def rollback(self, name: str, to: str | None = None) -> ImageVersion:
        """Point current at the version before it (or at ``to``)."""
        if to is not None:
            self._version_dir(name, to)
        with self._name_lock(name):
            current = self.current(name)
            versions = self.versions(name)
            if to is not None:
                target = self.get(name, to)
            else:
                older = [v for v in versions if v.version < current.version]
                if not older:
                    raise ImageError(
                        f"{name}: no version older than {current.version} to roll back to",
                        hint="`provision image list` shows the versions kept",
                    )
                target = older[-1]
            target.verify()
            self._point_current(name, target.version)
            return ImageVersion(name, target.version, target.path, is_current=True)

    def remove(self, name: str, version: str) -> None:
        self._version_dir(name, version)
        with self._name_lock(name):
            target = self.get(name, version)
            if target.is_current:
                raise ImageError(
                    f"{name}: {version} is the current version; refusing to remove it",
                    hint=f"roll back or build a newer version first (`provision image rollback {name}`)",
                )
            remove_tree(target.path)

"""What the built-in backend serves: hosts, image versions, the active version per image, boot tokens.

``registry.json`` (hosts and versions) and ``tokens.json`` (one-time boot
tokens, mode 0600) live in the state directory; every change happens under
an exclusive lock (``locked``) so that two CLIs never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provision.boot.base import BootHost, BootImage, check_image_name
from provision.boot.builtin.layout import Layout
from provision.errors import BootError
from provision.files import write_atomic
from provision.names import VERSION_RULE, is_version

__all__ = ["ImageVersionRecord", "Registry", "check_version", "is_version", "locked", "read_tokens", "save_tokens"]


def check_version(name: str, version: str) -> str:
    if not is_version(version):
        raise BootError(f"image {name}: version {version!r} is not valid", hint=VERSION_RULE)
    return version


def check_cmdline(cmdline: str, name: str) -> str:
    text = " ".join(str(cmdline or "").split())
    if "\n" in str(cmdline or "") or len(text) > 2048:
        raise BootError(
            f"image {name}: kernel command line must be one line under 2048 characters", hint="fix the image's cmdline"
        )
    return text


@dataclass(frozen=True)
class ImageVersionRecord:
    """One servable version of an image: files on this machine plus kernel extras."""

    version: str
    kernel: str
    initrds: tuple[str, ...]
    squashfs: str | None
    cmdline: str = ""

    @classmethod
    def of_files(
        cls,
        name: str,
        version: str,
        *,
        kernel: str | os.PathLike[str],
        initrds: tuple[str | os.PathLike[str], ...] | list[str | os.PathLike[str]],
        squashfs: str | os.PathLike[str] | None,
        cmdline: str = "",
    ) -> ImageVersionRecord:
        """A record with absolute paths and a checked command line."""
        return cls(
            check_version(name, version),
            str(Path(kernel).resolve()),
            tuple(str(Path(i).resolve()) for i in initrds),
            str(Path(squashfs).resolve()) if squashfs else None,
            check_cmdline(cmdline, name),
        )

    def boot_image(self, name: str) -> BootImage:
        return BootImage(
            name=name, kernel=self.kernel, initrds=self.initrds, squashfs=self.squashfs, cmdline=self.cmdline
        )

    def check_files(self, name: str) -> None:
        for path in (self.kernel, *self.initrds, *([self.squashfs] if self.squashfs else [])):
            if not Path(path).is_file():
                raise BootError(f"image {name} {self.version}: {path} does not exist", hint="publish the image again")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "initrds": list(self.initrds)}


@dataclass
class Registry:
    """Mutable run state: the hosts, every servable version, the version each image boots,
    and the nodes pinned to another version of their image (a rollout's canaries and waves)."""

    hosts: dict[str, BootHost] = field(default_factory=dict)
    versions: dict[str, dict[str, ImageVersionRecord]] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)  # host name -> version of its image

    @classmethod
    def load(cls, path: Path) -> Registry:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            hosts = {
                h["name"]: BootHost(**{**h, "macs": tuple(h["macs"]), "ips": tuple(h["ips"]), "tags": tuple(h["tags"])})
                for h in data.get("hosts", [])
            }
            versions = {
                check_image_name(name): {
                    check_version(name, v["version"]): ImageVersionRecord(
                        v["version"], v["kernel"], tuple(v["initrds"]), v.get("squashfs"), v.get("cmdline", "")
                    )
                    for v in vs
                }
                for name, vs in data.get("images", {}).items()
            }
            active = {check_image_name(k): check_version(k, v) for k, v in dict(data.get("active", {})).items()}
            pinned = {k: check_version(k, v) for k, v in dict(data.get("pinned", {})).items() if k in hosts}
            return cls(hosts, versions, active, pinned)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, BootError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise BootError(
                f"{path}: unreadable boot registry ({type(exc).__name__}: {reason})",
                hint="restore it or remove it and run `provision boot serve`",
            ) from exc

    def save(self, path: Path) -> None:
        data = {
            "hosts": [h.as_dict() for h in sorted(self.hosts.values(), key=lambda h: h.name)],
            "images": {n: [v.as_dict() for v in vs.values()] for n, vs in sorted(self.versions.items())},
            "active": dict(sorted(self.active.items())),
            "pinned": dict(sorted(self.pinned.items())),
        }
        write_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o644)


def read_tokens(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    except (OSError, ValueError, TypeError) as exc:
        raise BootError(
            f"{path}: unreadable boot tokens ({type(exc).__name__})",
            hint="remove it and run `provision node sync` (new tokens are made)",
        ) from exc
    return {str(k): str(v) for k, v in data.items()}


def save_tokens(path: Path, tokens: Mapping[str, str]) -> None:
    write_atomic(path, json.dumps(dict(sorted(tokens.items())), indent=2) + "\n", mode=0o600)


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[Registry]:
    """The registry, under an exclusive lock; saved when the block ends without error."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        registry = Registry.load(layout.registry_path)
        yield registry
        registry.save(layout.registry_path)

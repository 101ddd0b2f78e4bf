"""The bootstrap cache: a bootstrapped root filesystem, kept as a tar.

Keyed by every input of the bootstrap (distribution, release, mirrors,
package list, bootstrap tool and its version, the hooks) and by nothing else,
so that a rebuild after a role change extracts the tar instead of
downloading again. Written to a partial file and renamed, under a lock, so a
killed build never leaves a truncated entry behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from provision.image.definition import ImageDefinition
from provision.image.distro import Bootstrapper

# Bump when the way a cached tree is produced changes.
CACHE_FORMAT = 1
TAR_FLAGS = ("--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner")


def default_cache_dir() -> Path:
    env = os.environ.get("PROVISION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "provision"


@dataclass(frozen=True)
class CacheEntry:
    key: str
    tarball: Path
    hit: bool


class BootstrapCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()) / "bootstrap"

    def inputs(self, definition: ImageDefinition, bootstrapper: Bootstrapper) -> dict[str, object]:
        return {
            "format": CACHE_FORMAT,
            "distro": definition.distro.value,
            "release": definition.release,
            "tool": bootstrapper.tool,
            "tool_version": bootstrapper.tool_version(),
            "inputs": bootstrapper.cache_inputs(definition),
        }

    def key(self, definition: ImageDefinition, bootstrapper: Bootstrapper) -> str:
        blob = json.dumps(self.inputs(definition, bootstrapper), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_build(
        self, definition: ImageDefinition, bootstrapper: Bootstrapper, log: Callable[[str], None]
    ) -> CacheEntry:
        key = self.key(definition, bootstrapper)
        tarball = self.root / f"{key}.tar"
        with self._locked(key):
            if tarball.is_file():
                log(f"bootstrap cache hit {key[:12]}")
                return CacheEntry(key, tarball, hit=True)
            for stale in self.root.glob(f"{key}.partial-*"):
                stale.unlink(missing_ok=True)
            partial = self.root / f"{key}.partial-{os.getpid()}.tar"
            workdir = self.root / f"{key}.work-{os.getpid()}"
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                bootstrapper.bootstrap(definition, partial, workdir, log)
                (self.root / f"{key}.json").write_text(
                    json.dumps(self.inputs(definition, bootstrapper), indent=2, sort_keys=True) + "\n"
                )
                os.replace(partial, tarball)
            finally:
                partial.unlink(missing_ok=True)
                _rmtree(workdir)
            return CacheEntry(key, tarball, hit=False)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

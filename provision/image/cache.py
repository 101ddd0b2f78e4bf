"""The bootstrap cache: a bootstrapped root filesystem, kept as a directory.

Keyed by every input of the bootstrap (distribution, release, mirrors,
package list, bootstrap tool and its version, the hooks) and by nothing else,
so that a rebuild after a role change does not download again. A build never
writes into an entry: it mounts the entry read-only as the lower layer of an
overlay (``provision.image.rootfs``), so reuse costs no copy at all. Entries
are built in a partial directory and renamed, under a lock, so a killed build
never leaves a truncated entry behind.
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

from provision.image.chroot import remove_tree
from provision.image.definition import ImageDefinition
from provision.image.distro import Bootstrapper

# Bump when the way a cached tree is produced changes.
CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    env = os.environ.get("PROVISION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "provision"


@dataclass(frozen=True)
class CacheEntry:
    key: str
    tree: Path
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
        tree = self.root / key
        with self._locked(key):
            if (tree / "usr").is_dir():
                log(f"bootstrap cache hit {key[:12]}")
                return CacheEntry(key, tree, hit=True)
            for stale in [*self.root.glob(f"{key}.partial-*"), *self.root.glob(f"{key}.work-*")]:
                remove_tree(stale)
            partial = self.root / f"{key}.partial-{os.getpid()}"
            workdir = self.root / f"{key}.work-{os.getpid()}"
            workdir.mkdir(parents=True, exist_ok=True)
            try:
                bootstrapper.bootstrap(definition, partial, workdir, log)
                (self.root / f"{key}.json").write_text(
                    json.dumps(self.inputs(definition, bootstrapper), indent=2, sort_keys=True) + "\n"
                )
                os.rename(partial, tree)
            finally:
                remove_tree(partial)
                remove_tree(workdir)
            return CacheEntry(key, tree, hit=False)

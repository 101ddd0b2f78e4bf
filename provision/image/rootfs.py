"""A build's root filesystem: the cached bootstrap tree under a private overlay.

The cache entry is the overlay's read-only lower layer; everything the roles
change lands in the build's own upper layer inside the staging directory.
Reusing a bootstrap therefore copies nothing, and the cache entry can never be
modified by a build. Where overlayfs is unavailable (the store on NFS, say),
the tree is copied instead.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from provision import proc
from provision.errors import CommandError
from provision.image.chroot import unmount_all


class RootOverlay:
    def __init__(self, lower: Path, staging: Path) -> None:
        self.lower = lower.resolve()
        self.staging = staging.resolve()
        self.root = self.staging / "rootfs"
        self.mode = ""

    def __enter__(self) -> Path:
        upper, work = self.staging / "upper", self.staging / "work"
        for path in (upper, work, self.root):
            path.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        try:
            proc.run(["mount", "-t", "overlay", "overlay", "-o", options, self.root])
            self.mode = "overlay"
        except CommandError:
            proc.run(["cp", "-a", "--reflink=auto", f"{self.lower}/.", self.root], timeout=3600)
            self.mode = "copy"
        return self.root

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        unmount_all(self.root)

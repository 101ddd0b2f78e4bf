"""The compiler cache: ccache's directory, kept across builds and lent to the roles.

What the roles compile in an image (the NVIDIA module under DKMS: minutes of
one core) is the same from one build to the next as long as the sources, the
compiler and its flags are. The cache lives beside the bootstrap cache
(``default_cache_dir()/ccache``), one for every image: ccache keys each
result by the compiler, its arguments and the preprocessed source, so a
result is only reused for the same compilation.

``CompilerCache.mounted(root)`` bind-mounts it into the chroot for the roles
stage only, at ``/run/provision/ccache``: inside the chroot's own /run, a
tmpfs of the build, so that neither the cache nor its mount point is ever
part of the tree the secret scan reads and the squashfs packs. The roles
learn where it is from ``provision_image_ccache_dir``; the role that compiles
installs ccache for its build and removes it after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from provision import proc
from provision.errors import ImageError
from provision.image.cache import default_cache_dir
from provision.image.chroot import unmount_all

#: Where the roles find the cache inside the chroot (the chroot's /run is a tmpfs).
IN_CHROOT = "/run/provision/ccache"
#: ccache's size limit, written into the cache's ccache.conf when it is created (edit it there).
MAX_SIZE = "2G"


class CompilerCache:
    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or default_cache_dir()) / "ccache"

    def prepare(self) -> None:
        """Create the cache (root only: its results end up in images) with its configuration."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            conf = self.dir / "ccache.conf"
            if not conf.exists():
                conf.write_text(f"# provision image build's compiler cache\nmax_size = {MAX_SIZE}\n")
        except OSError as exc:
            raise ImageError(
                f"cannot use the compiler cache {self.dir}: {exc.strerror}",
                hint="point --cache-dir (or PROVISION_CACHE_DIR) at a writable local directory",
            ) from exc

    @contextmanager
    def mounted(self, root: Path) -> Iterator[str]:
        """The cache bind-mounted into the chroot at root (API filesystems mounted); yields its path there."""
        run_dir = root / "run"
        if not os.path.ismount(run_dir):
            raise ImageError(
                f"{run_dir} is not the build's tmpfs: the compiler cache would leave its mount point in the image",
                hint="mount the cache inside a Chroot block",
            )
        self.prepare()
        point = root / IN_CHROOT.lstrip("/")
        point.mkdir(parents=True, exist_ok=True)
        proc.run(["mount", "--bind", self.dir, point], hint="image builds run as root; the cache must be local")
        try:
            yield IN_CHROOT
        finally:
            unmount_all(point)

    def size_bytes(self) -> int:
        """What the cache holds (for the build's report)."""
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file() and not p.is_symlink())


__all__ = ["IN_CHROOT", "MAX_SIZE", "CompilerCache"]

"""Pack the root filesystem into a squashfs (xattrs kept: file capabilities)."""

from __future__ import annotations

import os
from pathlib import Path

from provision import proc
from provision.image.definition import ImageDefinition


def pack(root: Path, out: Path, definition: ImageDefinition) -> Path:
    out.unlink(missing_ok=True)
    proc.run(
        [
            "mksquashfs", root, out, "-noappend", "-xattrs", "-no-progress",
            *definition.squashfs.mksquashfs_args(),
            "-processors", str(os.cpu_count() or 1),
        ],
        timeout=3600,
        hint="apt-get install squashfs-tools",
    )  # fmt: skip
    out.chmod(0o644)
    return out


def tree_size(root: Path) -> int:
    """Apparent size of a tree in bytes, hard links counted once."""
    out = proc.run(["du", "-s", "--bytes", "--one-file-system", root]).stdout
    return int(out.split()[0])

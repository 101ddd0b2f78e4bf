"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, mode: int = 0o644) -> bool:
    """Write ``data`` beside ``path`` and rename it into place, with ``mode``.

    Returns False (and writes nothing) when the file already holds exactly
    ``data`` with that mode, so callers can tell whether anything changed.
    """
    target = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        if target.read_bytes() == raw and (target.stat().st_mode & 0o7777) == mode:
            return False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fchmod(out.fileno(), mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True

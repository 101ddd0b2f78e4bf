"""A root filesystem as a chroot: API filesystems mounted, always unmounted.

``Chroot(root)`` is a context manager that mounts /proc, /sys, a private /dev
(a tmpfs with the usual nodes, not the host's /dev: a stray ``rm -rf`` of a
build tree must never reach host devices), /dev/pts, /dev/shm and /run, puts
the host's resolv.conf in place for package downloads, and undoes all of it
on exit, on an exception, or on SIGTERM/SIGHUP (turned into an exception by
the build). ``isolate_mounts()`` moves the calling process into a private
mount namespace first when it can, so that even a SIGKILLed build leaves no
mount behind in the host's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import stat
import time
from pathlib import Path
from types import TracebackType

from provision import proc
from provision.errors import ImageError

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def isolate_mounts() -> bool:
    """Enter a private mount namespace (single-threaded callers only).

    Returns False (and changes nothing) when the kernel refuses, e.g. in a
    multi-threaded process; the build then relies on its unmount handling.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        log.debug("unshare(CLONE_NEWNS) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise ImageError(f"cannot make / private in the build's mount namespace: {os.strerror(ctypes.get_errno())}")
    return True


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(
    path: Path, mountinfo: Path = Path("/proc/self/mountinfo"), *, include_self: bool = True
) -> list[Path]:
    """Mount points below path (and at it, with include_self), deepest first."""
    base = os.path.realpath(path)
    found = []
    for line in mountinfo.read_text().splitlines():
        point = _unescape(line.split()[4])
        if (include_self and point == base) or point.startswith(base.rstrip("/") + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path, *, include_self: bool = True) -> None:
    """Unmount everything below path (and at it); lazily if busy; raise if any stays."""
    for point in mounts_under(path, include_self=include_self):
        result = proc.run(["umount", point], check=False)
        if result.returncode != 0:
            proc.run(["umount", "--lazy", point], check=False)
    left = mounts_under(path, include_self=include_self)
    if left:
        raise ImageError(f"could not unmount {left[0]}", hint=f"unmount it by hand: umount -l {left[0]}")


def processes_inside(root: Path) -> list[int]:
    """Processes whose root directory is ``root`` or below it (what runs in the chroot)."""
    base = str(root.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            target = os.readlink(entry / "root")
        except OSError:  # gone, or a kernel thread
            continue
        if target == base or target.startswith(base + "/"):
            found.append(int(entry.name))
    return found


def kill_inside(root: Path, wait: float = 10.0) -> list[int]:
    """SIGKILL what still runs in the chroot (a cancelled playbook's modules: dpkg, apt) and wait for it to go:
    nothing may write into the tree while it is unmounted and removed. Returns the pids killed."""
    killed = processes_inside(root)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while processes_inside(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to cross into a mount (unmounting first)."""
    if not path.exists():
        return
    unmount_all(path)
    proc.run(["rm", "-rf", "--one-file-system", path])


class Chroot:
    """Mount the API filesystems into root; undo on exit (exceptions included)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._mounted: list[Path] = []
        self._resolv_backup: Path | None = None
        self._resolv_placed = False

    def _mount(self, fstype: str, source: str, target: str, options: str | None = None) -> None:
        point = self.root / target.lstrip("/")
        if point.is_symlink():
            point.unlink()
        point.mkdir(parents=True, exist_ok=True)
        argv: list[str] = ["mount", "-t", fstype]
        if options:
            argv += ["-o", options]
        proc.run([*argv, source, point], hint="image builds run as root")
        self._mounted.append(point)

    def _populate_dev(self) -> None:
        dev = self.root / "dev"
        for name, (major, minor) in _DEVICES.items():
            node = dev / name
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, 0o666)
        for link, target in {
            "fd": "/proc/self/fd",
            "stdin": "/proc/self/fd/0",
            "stdout": "/proc/self/fd/1",
            "stderr": "/proc/self/fd/2",
            "ptmx": "pts/ptmx",
        }.items():
            (dev / link).symlink_to(target)

    def _place_resolv(self) -> None:
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            backup = self.root / "etc/resolv.conf.provision-build"
            os.replace(resolv, backup)
            self._resolv_backup = backup
        host = Path("/etc/resolv.conf")
        if host.exists():
            shutil.copyfile(host, resolv)
            self._resolv_placed = True

    def __enter__(self) -> Chroot:
        try:
            self._mount("proc", "proc", "/proc", "nosuid,nodev,noexec")
            self._mount("sysfs", "sysfs", "/sys", "ro,nosuid,nodev,noexec")
            self._mount("tmpfs", "tmpfs", "/dev", "mode=0755,nosuid,size=16m")
            self._populate_dev()
            self._mount("devpts", "devpts", "/dev/pts", "newinstance,ptmxmode=0666,mode=0620,gid=5")
            self._mount("tmpfs", "tmpfs", "/dev/shm", "mode=1777,nosuid,nodev")
            self._mount("tmpfs", "tmpfs", "/run", "mode=0755,nosuid,nodev")
            self._place_resolv()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        errors = []
        kill_inside(self.root)
        if self._resolv_placed:
            (self.root / "etc/resolv.conf").unlink(missing_ok=True)
            self._resolv_placed = False
        if self._resolv_backup is not None:
            # A symlink (e.g. to systemd-resolved's stub) is the distribution's
            # design and goes back; a regular file is the host's copy (mmdebstrap
            # copies it): a stateless image has none.
            if self._resolv_backup.is_symlink():
                os.replace(self._resolv_backup, self.root / "etc/resolv.conf")
            else:
                self._resolv_backup.unlink()
            self._resolv_backup = None
        for point in reversed(self._mounted):
            result = proc.run(["umount", point], check=False)
            if result.returncode != 0 and os.path.ismount(point):
                result = proc.run(["umount", "--lazy", point], check=False)
                if result.returncode != 0:
                    errors.append(point)
        self._mounted.clear()
        try:
            unmount_all(self.root, include_self=False)  # the root itself may be the build's overlay
        except ImageError:
            errors.append(self.root)
        if errors:
            raise ImageError(f"could not unmount {errors[0]}", hint=f"umount -l {errors[0]}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, argv: list[str], *, timeout: float | None = None, hint: str | None = None) -> str:
        return proc.run(["chroot", self.root, *argv], timeout=timeout, hint=hint).stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "image builds must run as root (bootstrap, chroot, mounts)", hint="run `sudo provision image build …`"
        )


__all__ = ["Chroot", "isolate_mounts", "mounts_under", "remove_tree", "require_root", "unmount_all"]

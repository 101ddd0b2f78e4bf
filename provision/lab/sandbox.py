"""A machine made of namespaces: the lab's control node runs in one.

A ``Sandbox`` is a set of Linux namespaces held open by one anchor process
(``sleep infinity``): a private mount namespace with its own ``/run`` (and any
other directories given, each a fresh tmpfs), its own hostname (UTS) and,
optionally, an existing network namespace. Daemons started with
:meth:`Sandbox.spawn` enter those namespaces with ``nsenter``, so they see the
standard paths (``/run/munge/munge.socket.2``) a real machine has without
touching the host's, and a second sandbox on the same host can hold a second
munged on the same path.

Why ``nsenter --net`` and not ``ip netns exec``: the latter remounts ``/sys``
for the namespace, which hides the host's cgroup mounts; slurmd then fails
"Unable to initialize cgroup plugin" (measured).

Run state lives on disk under ``state_dir`` (pid files, the anchor's mount
namespace id), so another process -- ``provision lab down`` -- can stop what
``lab up`` started. :meth:`Sandbox.stop` kills exactly the processes inside the
sandbox's own mount namespace: a pid is only killed while
``/proc/PID/ns/mnt`` is that namespace, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from provision.errors import ProvisionError
from provision.proc import NETNS_DIR, netns_exists, pid_alive, run, spawn

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
ANCHOR = "holder"

Argv = Sequence[str | os.PathLike[str]]


class RunOptions(TypedDict, total=False):
    """What ``Sandbox.run`` passes on to ``provision.proc.run`` (timeout: 60 s unless given)."""

    input: str | None
    check: bool
    timeout: float | None
    hint: str | None


class SandboxError(ProvisionError):
    """A sandbox could not be started, entered or stopped."""


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
    except FileNotFoundError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class Sandbox:
    """Namespaces for one lab machine; run state under ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        hostname: str,
        netns: str | None = None,
        private_dirs: Sequence[str] = (),
        make_dirs: Sequence[str] = (),
    ) -> None:
        if not _HOSTNAME.match(hostname):
            raise SandboxError(
                f"hostname {hostname!r} is not a valid host name", hint="use letters, digits and '-' (max 63)"
            )
        for d in (*private_dirs, *make_dirs):
            if not d.startswith("/") or d in ("/", "/proc", "/sys", "/dev") or ".." in d.split("/"):
                raise SandboxError(f"private directory {d!r} cannot be a tmpfs", hint="give absolute paths below /")
        self.state_dir = Path(state_dir)
        self.hostname = hostname
        self.netns = netns
        self.private_dirs = ("/run", *[d for d in private_dirs if d != "/run"])
        self.make_dirs = tuple(make_dirs)
        self.pid_dir = self.state_dir / "pids"
        self.log_dir = self.state_dir / "log"

    # -- state on disk -------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    @property
    def _ns_file(self) -> Path:
        return self.pid_dir / f"{ANCHOR}.mntns"

    def anchor_pid(self) -> int | None:
        """The anchor's pid while it runs in the recorded namespace, else None."""
        pid = _read_pid(self._pid_file(ANCHOR))
        if pid is None or not pid_alive(pid):
            return None
        try:
            recorded = self._ns_file.read_text().strip()
        except FileNotFoundError:
            return None
        return pid if _mnt_ns(pid) == recorded else None

    def running(self) -> bool:
        return self.anchor_pid() is not None

    def pid(self, name: str) -> int | None:
        """The pid of a daemon started with spawn() while it still runs in this sandbox."""
        pid = _read_pid(self._pid_file(name))
        ns = self._namespace()
        if pid is None or ns is None or not pid_alive(pid) or _mnt_ns(pid) != ns:
            return None
        return pid

    def _namespace(self) -> str | None:
        try:
            return self._ns_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def path(self, inside: str) -> Path:
        """A path inside the sandbox's private mounts, seen from the host."""
        pid = self.anchor_pid()
        if pid is None:
            raise SandboxError(f"sandbox {self.hostname} is not running", hint="start it first")
        return Path(f"/proc/{pid}/root") / inside.lstrip("/")

    # -- lifecycle -----------------------------------------------------
    def start(self, timeout: float = 10.0) -> int:
        """Create the namespaces; return the anchor's pid."""
        if self.running():
            raise SandboxError(
                f"sandbox {self.hostname} already runs (state in {self.state_dir})", hint="stop it first"
            )
        if self.netns is not None and not netns_exists(self.netns):
            raise SandboxError(
                f"network namespace {self.netns!r} does not exist", hint=f"create it: ip netns add {self.netns}"
            )
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        mounts = " && ".join(
            f"mkdir -p {shlex.quote(d)} && mount -t tmpfs -o mode=0755,size=64m tmpfs {shlex.quote(d)}"
            for d in self.private_dirs
        )
        mkdirs = "".join(f" && mkdir -p {shlex.quote(d)}" for d in self.make_dirs)
        script = f"set -e; {mounts}{mkdirs}; hostname {shlex.quote(self.hostname)}; exec sleep infinity"
        argv = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script]
        if self.netns is not None:
            argv = ["nsenter", f"--net={NETNS_DIR / self.netns}", *argv]
        proc = spawn(argv, log_path=self.log_dir / f"{ANCHOR}.log")
        host_ns = _mnt_ns(os.getpid())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{ANCHOR}.log").read_text().strip().splitlines()[-3:]
                raise SandboxError(
                    f"sandbox {self.hostname} failed to start: {' | '.join(tail) or f'exit {proc.returncode}'}",
                    hint="creating namespaces and tmpfs mounts needs root (CAP_SYS_ADMIN)",
                )
            try:
                exe = os.readlink(f"/proc/{proc.pid}/exe")
            except OSError:
                exe = ""
            ns = _mnt_ns(proc.pid)
            if exe.endswith("/sleep") and ns is not None and ns != host_ns:
                self._pid_file(ANCHOR).write_text(f"{proc.pid}\n")
                self._ns_file.write_text(f"{ns}\n")
                return proc.pid
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise SandboxError(f"sandbox {self.hostname} did not come up within {timeout:.0f} s")

    def _enter(self, argv: Argv) -> list[str]:
        pid = self.anchor_pid()
        if pid is None:
            raise SandboxError(f"sandbox {self.hostname} is not running", hint="start it first")
        return ["nsenter", f"--target={pid}", "--mount", "--uts", "--net", "--", *(os.fspath(a) for a in argv)]

    def spawn(self, name: str, argv: Argv, *, env: Mapping[str, str] | None = None) -> int:
        """Start a long-running (foreground) process inside; record NAME.pid; return its pid."""
        if not _NAME.match(name) or name == ANCHOR:
            raise SandboxError(f"process name {name!r} is not allowed", hint="use [a-z0-9_.-], not 'holder'")
        # nsenter without --pid/--fork execs the command: the pid is the daemon's.
        proc = spawn(self._enter(argv), log_path=self.log_dir / f"{name}.log", env=env)
        self._pid_file(name).write_text(f"{proc.pid}\n")
        # Until nsenter has entered the namespaces, the pid is still in the host's.
        ns = self._namespace()
        deadline = time.monotonic() + 5
        while proc.poll() is None and _mnt_ns(proc.pid) != ns and time.monotonic() < deadline:
            time.sleep(0.005)
        return proc.pid

    def run(
        self, argv: Argv, *, env: Mapping[str, str] | None = None, **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the sandbox and wait for it."""
        options.setdefault("timeout", 60)
        return run(self._enter(argv), env=env, **options)

    def processes(self) -> list[int]:
        """Every live process inside this sandbox's mount namespace (anchor included)."""
        ns = self._namespace()
        if ns is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _mnt_ns(int(entry.name)) == ns and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def stop(self, grace: float = 5.0) -> list[int]:
        """Stop every process in the sandbox, then the anchor; return the pids signalled.

        Daemons first (SIGTERM, then SIGKILL after ``grace`` seconds), the anchor
        last so the mount namespace and its tmpfs go with it. Safe to run twice.
        """
        ns = self._namespace()
        signalled: list[int] = []
        if ns is not None:
            anchor = _read_pid(self._pid_file(ANCHOR))
            daemons = [p for p in self.processes() if p != anchor]
            signalled += self._terminate(daemons, grace)
            rest = self.processes()
            signalled += self._terminate(rest, grace)
        for f in self.pid_dir.glob("*.pid") if self.pid_dir.is_dir() else ():
            f.unlink(missing_ok=True)
        self._ns_file.unlink(missing_ok=True)
        return signalled

    def _terminate(self, pids: list[int], grace: float) -> list[int]:
        ns = self._namespace()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                if _mnt_ns(pid) == ns:  # never a recycled pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(pid_alive(p) and _mnt_ns(p) == ns for p in pids):
                time.sleep(0.05)
            _reap(pids)
            if not any(pid_alive(p) and _mnt_ns(p) == ns for p in pids):
                break
        return pids


def _reap(pids: list[int]) -> None:
    """Collect exit statuses of our own children so they do not linger as zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

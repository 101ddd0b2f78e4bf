"""Is a node's sshd answering? A TCP connect and the ``SSH-`` banner, optionally inside a netns.

A network namespace is per thread on Linux: the probe runs in a short-lived
thread that enters the namespace (``setns``) first, so this process and its
other threads stay where they are. Entering a namespace needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

from provision.errors import ProvisionError
from provision.proc import NETNS_DIR, netns_exists

CLONE_NEWNET = 0x40000000


class ProbeError(ProvisionError):
    """A probe could not run at all (not: the node does not answer)."""


def _enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ProbeError(
                f"cannot enter network namespace {name}: {os.strerror(err)}", hint="run as root (CAP_SYS_ADMIN)"
            )
    finally:
        os.close(fd)


def _connect(host: str, port: int, timeout: float, banner: bytes | None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if banner is None:
                return True
            sock.settimeout(timeout)
            return sock.recv(64).startswith(banner)
    except OSError:
        return False


def ssh_answers(host: str, port: int = 22, *, netns: str | None = None, timeout: float = 2.0) -> bool:
    """True when ``host:port`` accepts a connection and greets with an SSH banner."""
    return tcp_answers(host, port, netns=netns, timeout=timeout, banner=b"SSH-")


def tcp_answers(
    host: str, port: int, *, netns: str | None = None, timeout: float = 2.0, banner: bytes | None = None
) -> bool:
    """True when ``host:port`` accepts a connection (and greets with ``banner``, when given)."""
    if netns is None:
        return _connect(host, port, timeout, banner)
    if not netns_exists(netns):
        raise ProbeError(f"network namespace {netns} does not exist", hint="check provision_boot_netns")
    result: list[bool] = []
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            _enter_netns(netns)
            result.append(_connect(host, port, timeout, banner))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=probe, name=f"probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if failure:
        raise failure[0]
    return bool(result and result[0])


__all__ = ["ProbeError", "ssh_answers", "tcp_answers"]

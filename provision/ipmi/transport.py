"""Datagrams and timers for many sessions in one thread.

One non-blocking UDP socket per address family carries every session of a
``Transport``; a reply is routed to its session by the BMC's address and port
(one session per BMC at a time: ``provision.ipmi.runner`` queues a second
operation on the same BMC behind the first). Timers live in one heap. A send
that fails (full buffer, unreachable network) is a lost datagram: the
session's retransmission deals with it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from provision.ipmi.session import Session, Timer

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 4 * 1024 * 1024  # asked for; the kernel caps it at net.core.rmem_max


def peer_key(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    return (sockaddr[0], sockaddr[1])


class Transport:
    """Sockets, a selector and a timer heap; ``poll`` runs one round of events."""

    def __init__(self, on_change: Callable[[Session], None] | None = None) -> None:
        self._selector = selectors.DefaultSelector()
        self._sockets: dict[int, socket.socket] = {}
        self._sessions: dict[tuple[str, int], Session] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self.on_change = on_change

    # -- the Link a session uses
    def send(self, session: Session, packet: bytes) -> None:
        sock = self._socket(socket.AF_INET6 if len(session.sockaddr) == 4 else socket.AF_INET)
        try:
            sock.sendto(packet, session.sockaddr)
        except OSError as exc:  # lost: the session retransmits
            log.debug("%s: send failed: %s", session.where, exc)

    def call_at(self, when: float, fn: Callable[[float], None]) -> Timer:
        timer = Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._counter), timer))
        return timer

    def changed(self, session: Session) -> None:
        if self.on_change is not None:
            self.on_change(session)

    # -- sessions
    def attach(self, session: Session) -> None:
        self._sessions[peer_key(session.sockaddr)] = session

    def detach(self, session: Session) -> None:
        key = peer_key(session.sockaddr)
        if self._sessions.get(key) is session:
            del self._sessions[key]

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self._selector.register(sock, selectors.EVENT_READ)
            self._sockets[family] = sock
        return sock

    # -- the loop
    def next_timeout(self, now: float) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(0.0, timers[0][0] - now)

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for datagrams, hand them out, then run the due timers."""
        if self._sockets:
            events = self._selector.select(timeout)
        else:
            events = []
            if timeout:
                time.sleep(timeout)
        now = time.monotonic()
        for key, _ in events:
            self._drain(key.fileobj, now)  # type: ignore[arg-type]
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.fn(now)

    def _drain(self, sock: socket.socket, now: float) -> None:
        sessions = self._sessions
        while True:
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("receive: %s", exc)
                return
            session = sessions.get((addr[0], addr[1]))
            if session is not None:
                session.receive(data, now)

    def close(self) -> None:
        for sock in self._sockets.values():
            self._selector.unregister(sock)
            sock.close()
        self._sockets.clear()
        self._selector.close()
        self._sessions.clear()
        self._timers.clear()


def resolve(host: str, port: int) -> tuple[Any, ...]:
    """The first UDP address of ``host`` (numeric addresses without a lookup); raises OSError."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            canonical = socket.inet_ntop(family, socket.inet_pton(family, host))  # as recvfrom reports it
        except OSError:
            continue
        return (canonical, port) if family == socket.AF_INET else (canonical, port, 0, 0)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {host}")
    return tuple(infos[0][4])

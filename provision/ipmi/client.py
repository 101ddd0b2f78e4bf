"""One BMC, one session, synchronous: what ``provision.bmc.IpmiClient`` runs on.

The same session state machine and transport as the fan-out, with one
session kept open between operations (``close_after=False``) and the loop
run until the current step is over. ``timeout`` bounds each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from provision.errors import BmcError
from provision.ipmi.errors import UNREACHABLE_HINT, BmcUnreachableError
from provision.ipmi.session import ANSWER_TIMEOUT, Operation, Session, State
from provision.ipmi.transport import Transport, resolve


class Client:
    """A logged-in RMCP+ session (raises BmcError subclasses); ``close()`` logs out."""

    def __init__(self, host: str, user: str, password: str, *, port: int = 623, timeout: float = 10.0) -> None:
        self.where = f"BMC {host}:{port}"
        self.timeout = timeout
        try:
            sockaddr = resolve(host, port)
        except OSError as exc:
            raise BmcUnreachableError(
                f"{self.where}: cannot resolve {host} ({exc.strerror or exc})", hint=UNREACHABLE_HINT
            ) from None
        self._transport = Transport()
        self._session = Session(
            self._transport,
            sockaddr,
            user,
            password,
            where=self.where,
            close_after=False,
            answer_timeout=min(ANSWER_TIMEOUT, timeout),
        )
        self._transport.attach(self._session)
        session = self._session
        try:
            session.start(time.monotonic())
            self._wait(lambda: session.done or session.finished)
            self._raise()
        except BaseException:
            self._transport.close()
            raise

    def __repr__(self) -> str:
        return f"Client({self.where})"

    @property
    def cipher_suite(self) -> int | None:
        suite = self._session.suite
        return suite.number if suite is not None and self._session.established else None

    def run(self, operation: Operation) -> Any:
        """Run one operation (a generator of requests, see provision.ipmi.session); its value."""
        session = self._session
        if session.state != State.IDLE:
            raise BmcUnreachableError(f"{self.where}: the session is closed", hint=UNREACHABLE_HINT)
        session.run(time.monotonic(), operation)
        self._wait(lambda: session.done)
        self._raise()
        return session.value

    def close(self) -> None:
        session = self._session
        try:
            session.close(time.monotonic())
            self._wait(lambda: session.finished, fail=False)
        finally:
            self._transport.close()

    def _wait(self, until: Callable[[], bool], *, fail: bool = True) -> None:
        deadline = time.monotonic() + self.timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                self._session.abort(now)
                if fail:
                    raise BmcUnreachableError(
                        f"{self.where}: no answer after {self.timeout:g} s", hint=UNREACHABLE_HINT
                    )
                return
            timeout = self._transport.next_timeout(now)
            self._transport.poll(min(deadline - now, 1.0 if timeout is None else timeout))

    def _raise(self) -> None:
        error: BmcError | None = self._session.error
        if error is not None:
            raise error

"""One RMCP+ session with one BMC, as a state machine driven by events.

A ``Session`` never blocks and owns no socket: the transport hands it the
datagrams that come from its BMC (``receive``) and wakes it when its timer
expires; it sends through the transport and arms its own timer. Many
sessions thus run in one thread, on one socket.

Life of a session::

    Get Channel Authentication Capabilities (IPMI 1.5 framing, as ipmitool
        and ipmipower: some BMCs open no session before it) ──► answer: a
        channel without IPMI v2.0 fails here; a refusal (completion code) is let pass
    Open Session Request (suite 17) ──► Open Session Response
        │ a status for unsupported algorithms (0x04-0x07, 0x10-0x12): propose suite 3 instead
        │ refused again: the BMC offers neither suite (BmcError, at once)
        │ the BMC chose suite 3 or 17 (whatever was proposed): follow it; anything else: refuse
    RAKP1 (Rm, operator role, user) ──► RAKP2: check the BMC's HMAC; on a mismatch
        (wrong password, or not the BMC) RAKP3 carries status 0x0F and no
        code, so that an impostor learns nothing to crack offline: BmcAuthError
    RAKP3 ──► RAKP4: check the ICV; keys K1/K2 derived (see crypto)
    [Set Session Privilege Level (operator) ──►]    for anything but reads at user level
    the operation's requests, one at a time ──► responses
    Close Session ──►                                 (the outcome is known before this)

An operation is a generator: it yields ``Request`` objects, receives each
``IpmiResponse`` and returns its value (or raises ``OperationError``). Every
request is retransmitted after ``retransmit`` seconds, then twice as long
(at most ``MAX_RETRANSMIT``), until ``answer_timeout`` without an answer:
then the session fails with BmcUnreachableError. A retransmitted command
keeps its IPMI sequence number (the BMC may recognise the duplicate) under a
new session sequence number. Handshake messages are sent again unchanged.

Authenticated replies pass a sliding window on their session sequence
numbers (``SequenceWindow``): a replayed or far out-of-window packet is
dropped even though its HMAC is good. HMACs are compared in constant time.
A step that times out after the BMC sent only datagrams we could not use
fails as a BmcError naming them, not as "no answer".
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from provision.errors import BmcError
from provision.ipmi import wire
from provision.ipmi.crypto import SUITE_3, SUITE_17, CipherSuite, Rakp, SessionKeys, suite_for
from provision.ipmi.errors import (
    AUTH_HINT,
    CIPHER_HINT,
    PRIVILEGE_HINT,
    UNREACHABLE_HINT,
    BmcAuthError,
    BmcUnreachableError,
    OperationError,
)
from provision.ipmi.wire import IpmiResponse

log = logging.getLogger(__name__)

RETRANSMIT = 1.0
MAX_RETRANSMIT = 2.0
ANSWER_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0

NETFN_APP = 0x06
CMD_SET_SESSION_PRIVILEGE = 0x3B
CMD_CLOSE_SESSION = 0x3C
RAKP_INVALID_ICV = wire.RMCP_INVALID_ICV
RMCP_INVALID_SESSION_ID = 0x02
SEQUENCE_WINDOW = 16
PROTOCOL_HINT = "the BMC answers in a way this client does not understand; run with --debug and report it"
_Answer = TypeVar("_Answer", bound=wire.HandshakeAnswer)


@dataclass(frozen=True)
class Request:
    netfn: int
    command: int
    data: bytes = b""
    what: str = ""  # for messages: "Get Chassis Status"


Operation = Generator[Request, IpmiResponse, Any]


class Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[float], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Link(Protocol):
    """What a session needs from its transport."""

    def send(self, session: Session, packet: bytes) -> None: ...

    def call_at(self, when: float, fn: Callable[[float], None]) -> Timer: ...

    def changed(self, session: Session) -> None:
        """The session has an outcome, became idle or finished."""


class SequenceWindow:
    """Session sequence numbers of authenticated replies (IPMI v2.0 section 6.12.13).

    A number is accepted once, up to ``size`` behind the highest seen or up
    to ``size`` ahead of it (lost replies); the first sets the start. Zero is
    never a valid number for an authenticated packet.
    """

    __slots__ = ("highest", "seen", "size")

    def __init__(self, size: int = SEQUENCE_WINDOW) -> None:
        self.size = size
        self.highest = 0
        self.seen = 0  # bit i: highest - i was received

    def accept(self, sequence: int) -> bool:
        if sequence == 0:
            return False
        if self.highest == 0:
            self.highest, self.seen = sequence, 1
            return True
        ahead = (sequence - self.highest) & 0xFFFFFFFF
        if 0 < ahead <= self.size:
            self.highest = sequence
            self.seen = ((self.seen << ahead) | 1) & ((1 << self.size) - 1)
            return True
        behind = (self.highest - sequence) & 0xFFFFFFFF
        if behind < self.size and not (self.seen >> behind) & 1:
            self.seen |= 1 << behind
            return True
        return False


class State(enum.Enum):
    NEW = "new"
    CAPABILITIES = "capabilities"
    OPENING = "opening"
    RAKP2 = "rakp2"
    RAKP4 = "rakp4"
    PRIVILEGE = "privilege"
    BUSY = "busy"  # waiting for an operation's response
    IDLE = "idle"  # logged in, no operation
    CLOSING = "closing"
    DONE = "done"


class Session:
    """One BMC session (see the module doc). The password is never shown."""

    def __init__(
        self,
        link: Link,
        sockaddr: tuple[Any, ...],
        user: str,
        password: str,
        *,
        where: str,
        privileged: bool = True,
        close_after: bool = True,
        retransmit: float = RETRANSMIT,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.link = link
        self.sockaddr = sockaddr
        self.where = where
        self.user = user.encode("utf-8")
        self._kuid = password.encode("utf-8")
        if len(self.user) > 16:
            raise BmcAuthError(f"{where}: user name longer than 16 bytes", hint=AUTH_HINT)
        if len(self._kuid) > 20:
            raise BmcAuthError(f"{where}: password longer than 20 bytes (the IPMI limit)", hint=AUTH_HINT)
        self.privileged = privileged
        self.close_after = close_after
        self.retransmit = retransmit
        self.answer_timeout = answer_timeout
        self.state = State.NEW
        self.suite: CipherSuite | None = None
        self.established = False
        # outcome of the current operation
        self.done = False  # an outcome is there (value or error)
        self.value: Any = None
        self.error: BmcError | None = None
        self._operation: Operation | None = None
        self._request: Request | None = None
        self._tag = 0
        self._console_sid = 0
        self._bmc_sid = 0
        self._rm = b""
        self._rakp: Rakp | None = None
        self._sik = b""
        self._keys: SessionKeys | None = None
        self._out_seq = 0
        self._rq_seq = 0
        self._packet = b""  # what the timer sends again (handshake); commands are re-encoded
        self._started = 0.0
        self._step_started = 0.0
        self._interval = retransmit
        self._timer: Timer | None = None
        self._step_timeout = answer_timeout
        self._step_what = ""  # what the current step waits for an answer to
        self._answered: list[str] = []  # steps the BMC answered
        self._unusable = ""  # the last datagram of this step we could not use
        self._refusals: list[str] = []  # cipher suites refused, with the status
        self._window = SequenceWindow()

    def __repr__(self) -> str:
        return f"Session({self.where}, {self.state.value}, suite={self.suite.number if self.suite else None})"

    # ------------------------------------------------------------------ driving

    def start(self, now: float, operation: Operation | None = None) -> None:
        """Log in, then run ``operation`` (if any)."""
        self._operation = operation
        self._started = now
        self._capabilities(now)

    def run(self, now: float, operation: Operation) -> None:
        """Run ``operation`` on an idle (logged-in) session."""
        if self.state != State.IDLE:
            raise RuntimeError(f"{self.where}: session is {self.state.value}, not idle")
        self.done, self.value, self.error = False, None, None
        self._operation = operation
        self._step(now, None)

    def close(self, now: float) -> None:
        """Close Session if logged in; finished at once otherwise."""
        if self.state in (State.DONE, State.CLOSING):
            return
        if self.established:
            self._close(now)
        else:
            self._finish()

    def abort(self, now: float) -> None:
        """Give up now: one Close Session without waiting (the BMC frees the slot), then done."""
        if self.state == State.DONE:
            return
        if self.established and self.state != State.CLOSING:
            self._rq_seq = (self._rq_seq + 1) & 0x3F
            self._send_command(Request(NETFN_APP, CMD_CLOSE_SESSION, self._bmc_sid.to_bytes(4, "little")))
        self._finish()

    def receive(self, raw: bytes, now: float) -> None:
        if self.state in (State.DONE, State.IDLE, State.NEW):
            return
        try:
            if self.state == State.CAPABILITIES:
                self._got_capabilities(raw, now)
                return
            packet = wire.parse_packet(raw)
            if packet is None:
                if wire.session_less_message(raw) is None:  # not a late capabilities answer
                    self._ignore(f"a {len(raw)}-byte datagram that is no RMCP+ packet")
                return
            kind = packet.payload_type
            if kind == wire.PAYLOAD_IPMI:
                self._got_ipmi(packet, now)
            elif self.state == State.OPENING and kind == wire.PAYLOAD_OPEN_RESPONSE:
                self._got_open_response(packet.payload, now)
            elif self.state == State.RAKP2 and kind == wire.PAYLOAD_RAKP2:
                self._got_rakp2(packet.payload, now)
            elif self.state == State.RAKP4 and kind == wire.PAYLOAD_RAKP4:
                self._got_rakp4(packet.payload, now)
        except BmcError as exc:
            self._fail(exc, now)

    def _on_timer(self, now: float) -> None:
        if self.state in (State.DONE, State.IDLE, State.NEW):
            return
        waited = now - self._step_started
        if waited >= self._step_timeout - 1e-6:
            if self.state == State.CLOSING:
                log.debug("%s: no answer to Close Session", self.where)
                self._finish()
                return
            self._fail(self._timeout_error(now), now)
            return
        if self._request is not None:
            self._send_command(self._request)
        else:
            self.link.send(self, self._packet)
        self._interval = min(self._interval * 2, MAX_RETRANSMIT)
        self._arm(min(now + self._interval, self._step_started + self._step_timeout))

    def _timeout_error(self, now: float) -> BmcError:
        what = f" to {self._step_what}" if self._step_what else ""
        after = f"after {now - self._started:.1f} s"
        if self._unusable:
            return BmcError(
                f"{self.where}: no usable answer{what} {after}; the BMC sent {self._unusable}", hint=PROTOCOL_HINT
            )
        if self._answered:
            return BmcUnreachableError(
                f"{self.where}: no answer{what} {after} (it answered {', '.join(self._answered)})",
                hint=UNREACHABLE_HINT,
            )
        return BmcUnreachableError(f"{self.where}: no answer{what} {after}", hint=UNREACHABLE_HINT)

    def _ignore(self, what: str) -> None:
        """A datagram from the BMC that this step cannot use (kept for the timeout's message)."""
        log.debug("%s: ignored %s", self.where, what)
        self._unusable = what

    def _heard(self) -> None:
        """The BMC answered the current step."""
        if self._step_what and self._step_what not in self._answered:
            self._answered.append(self._step_what)

    # ------------------------------------------------------------------ sending

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.link.call_at(when, self._on_timer)

    def _begin_step(self, now: float, what: str, timeout: float | None = None) -> None:
        self._step_started = now
        self._step_what = what
        self._unusable = ""
        self._interval = self.retransmit
        self._step_timeout = timeout if timeout is not None else self.answer_timeout
        self._arm(now + min(self._interval, self._step_timeout))

    def _send_handshake(self, payload_type: int, payload: bytes, now: float, what: str) -> None:
        self._request = None
        self._packet = wire.build_packet(payload_type, 0, 0, payload, None)
        self.link.send(self, self._packet)
        self._begin_step(now, what)

    def _send_command(self, request: Request) -> None:
        assert self._keys is not None
        self._out_seq = (self._out_seq + 1) & 0xFFFFFFFF or 1
        message = wire.ipmi_request(request.netfn, request.command, self._rq_seq, request.data)
        self.link.send(self, wire.build_packet(wire.PAYLOAD_IPMI, self._bmc_sid, self._out_seq, message, self._keys))

    def _command(self, request: Request, now: float, timeout: float | None = None) -> None:
        self._rq_seq = (self._rq_seq + 1) & 0x3F
        self._request = request
        self._send_command(request)
        self._begin_step(now, request.what, timeout)

    # ------------------------------------------------------------------ handshake

    def _ours(self, answer: _Answer | None, payload: bytes, what: str) -> _Answer | None:
        """The answer if it answers our current message (a short error answer carries no session id), else None."""
        if answer is None:
            self._ignore(f"a malformed {what} ({len(payload)} bytes)")
            return None
        return answer if answer.tag == self._tag and answer.console_sid in (None, self._console_sid) else None

    def _capabilities(self, now: float) -> None:
        self.state = State.CAPABILITIES
        self._request = None
        self._rq_seq = (self._rq_seq + 1) & 0x3F
        self._packet = wire.build_v15_packet(wire.channel_auth_capabilities_request(self._rq_seq, wire.PRIV_OPERATOR))
        self.link.send(self, self._packet)
        self._begin_step(now, "Get Channel Authentication Capabilities")

    def _got_capabilities(self, raw: bytes, now: float) -> None:
        message = wire.session_less_message(raw)
        response = wire.parse_ipmi_response(message) if message is not None else None
        if (
            response is None
            or response.netfn != NETFN_APP + 1
            or response.command != wire.CMD_GET_CHANNEL_AUTH_CAPABILITIES
        ):
            self._ignore(f"a {len(raw)}-byte datagram that answers no Get Channel Authentication Capabilities")
            return
        if response.seq != self._rq_seq:
            return  # an answer to an earlier attempt
        self._heard()
        capabilities = wire.parse_channel_auth_capabilities(response.data) if not response.code else None
        if capabilities is not None and not capabilities.ipmi_v2:
            raise BmcError(
                f"{self.where}: the BMC's LAN channel does not offer IPMI v2.0 (RMCP+) sessions",
                hint="enable IPMI over LAN v2.0 (RMCP+, cipher suite 17 or 3) on the BMC",
            )
        if response.code:  # e.g. a BMC that refuses the IPMI v2.0 bit: the Open Session tells
            log.debug(
                "%s: Get Channel Authentication Capabilities: %s", self.where, wire.completion_code(response.code)
            )
        self._open(now, SUITE_17)

    def _open(self, now: float, suite: CipherSuite) -> None:
        self.state = State.OPENING
        self.suite = suite
        self._tag = (self._tag + 1) & 0xFF
        self._console_sid = int.from_bytes(os.urandom(4), "little") or 1
        payload = wire.open_session_request(self._tag, wire.PRIV_OPERATOR, self._console_sid, suite.algorithms)
        self._send_handshake(wire.PAYLOAD_OPEN_REQUEST, payload, now, f"Open Session (cipher suite {suite.number})")

    def _got_open_response(self, payload: bytes, now: float) -> None:
        response = self._ours(wire.parse_open_session_response(payload), payload, "Open Session Response")
        if response is None:
            return
        self._heard()
        if response.status:
            assert self.suite is not None
            text = wire.rmcp_status(response.status)
            if response.status in wire.RMCP_UNSUPPORTED_ALGORITHM:
                self._refusals.append(f"suite {self.suite.number}: {text}")
                if self.suite is SUITE_17:
                    log.debug("%s: cipher suite 17 refused (%s); proposing 3", self.where, text)
                    self._open(now, SUITE_3)
                    return
                raise BmcError(
                    f"{self.where}: the BMC refuses cipher suites 17 and 3, the only ones accepted "
                    f"({'; '.join(self._refusals)})",
                    hint=CIPHER_HINT,
                )
            raise BmcError(f"{self.where}: session refused: {text}")
        suite = suite_for(response.algorithms)
        if suite is None:
            raise BmcError(
                "{}: BMC chose cipher algorithms auth={} integrity={} confidentiality={}, "
                "not cipher suite 3 or 17".format(self.where, *response.algorithms),
                hint=CIPHER_HINT,
            )
        if self.suite is not None and suite is not self.suite:
            log.debug("%s: proposed cipher suite %d, the BMC chose %d", self.where, self.suite.number, suite.number)
        self.suite = suite
        self._bmc_sid = response.bmc_sid
        self._rm = os.urandom(16)
        self._tag = (self._tag + 1) & 0xFF
        self.state = State.RAKP2
        role = wire.NAME_ONLY_LOOKUP | wire.PRIV_OPERATOR
        self._send_handshake(
            wire.PAYLOAD_RAKP1, wire.rakp1(self._tag, self._bmc_sid, self._rm, role, self.user), now, "RAKP message 1"
        )

    def _got_rakp2(self, payload: bytes, now: float) -> None:
        message = self._ours(wire.parse_rakp2(payload), payload, "RAKP message 2")
        if message is None:
            return
        if message.status:
            if message.status == RMCP_INVALID_SESSION_ID:  # a stale exchange; wait for the retransmission
                self._ignore(f"RAKP message 2 with status {wire.rmcp_status(message.status)}")
                return
            self._heard()
            text = wire.rmcp_status(message.status)
            if message.status in (0x09, 0x0A, 0x0B):
                raise BmcAuthError(f"{self.where}: authentication failed ({text} for operator)", hint=PRIVILEGE_HINT)
            if message.status in (0x0C, 0x0D):
                raise BmcAuthError(f"{self.where}: authentication failed ({text})", hint=AUTH_HINT)
            raise BmcError(f"{self.where}: RAKP2: {text}")
        assert self.suite is not None
        rakp = Rakp(
            suite=self.suite,
            console_sid=self._console_sid,
            bmc_sid=self._bmc_sid,
            rm=self._rm,
            rc=message.rc,
            guid=message.guid,
            role=wire.NAME_ONLY_LOOKUP | wire.PRIV_OPERATOR,
            user=self.user,
        )
        self._heard()
        if not hmac.compare_digest(rakp.rakp2_code(self._kuid), message.code):
            # Tell the BMC (it frees the session) with an error status and no
            # key exchange code: a peer that is not the BMC gets nothing made
            # from the password. Then give up: no retry can fix a password.
            self._tag = (self._tag + 1) & 0xFF
            self.link.send(
                self,
                wire.build_packet(
                    wire.PAYLOAD_RAKP3, 0, 0, wire.rakp3(self._tag, RAKP_INVALID_ICV, self._bmc_sid), None
                ),
            )
            raise BmcAuthError(
                f"{self.where}: authentication failed (the BMC's RAKP2 code does not match: "
                "incorrect password, or not the BMC)",
                hint=AUTH_HINT,
            )
        self._rakp = rakp
        self._sik = rakp.sik(self._kuid)
        self._tag = (self._tag + 1) & 0xFF
        self.state = State.RAKP4
        payload3 = wire.rakp3(self._tag, 0, self._bmc_sid, rakp.rakp3_code(self._kuid))
        self._send_handshake(wire.PAYLOAD_RAKP3, payload3, now, "RAKP message 3")

    def _got_rakp4(self, payload: bytes, now: float) -> None:
        message = self._ours(wire.parse_rakp4(payload), payload, "RAKP message 4")
        if message is None:
            return
        self._heard()
        if message.status:
            text = wire.rmcp_status(message.status)
            if message.status == RAKP_INVALID_ICV:
                raise BmcAuthError(f"{self.where}: authentication failed (RAKP4: {text})", hint=AUTH_HINT)
            raise BmcError(f"{self.where}: RAKP4: {text}")
        assert self._rakp is not None and self.suite is not None
        if not hmac.compare_digest(self._rakp.rakp4_icv(self._sik), message.icv[: self.suite.icv_length]):
            raise BmcAuthError(
                f"{self.where}: authentication failed (RAKP4 integrity check value does not match; BMC key Kg?)",
                hint=AUTH_HINT,
            )
        self._keys = SessionKeys.derive(self.suite, self._sik)
        self.established = True
        self._out_seq = 0
        log.debug("%s: logged in (cipher suite %d)", self.where, self.suite.number)
        if self.privileged:
            self.state = State.PRIVILEGE
            self._command(
                Request(
                    NETFN_APP, CMD_SET_SESSION_PRIVILEGE, bytes([wire.PRIV_OPERATOR]), "Set Session Privilege Level"
                ),
                now,
            )
            return
        self._logged_in(now)

    def _logged_in(self, now: float) -> None:
        self._request = None
        if self._timer is not None:
            self._timer.cancel()
        if self._operation is None:
            self.state = State.IDLE
            self.done = True
            self.link.changed(self)
            return
        self._step(now, None)

    # ------------------------------------------------------------------ commands

    def _got_ipmi(self, packet: wire.Packet, now: float) -> None:
        if self._keys is None or self._request is None or packet.session_id != self._console_sid:
            return
        plain = wire.open_packet(packet, self._keys)
        if plain is None:
            self._ignore("a packet that fails the session's integrity check")
            return
        if not self._window.accept(packet.sequence):
            self._ignore(f"a packet with session sequence number {packet.sequence}, outside the window (replayed?)")
            return
        response = wire.parse_ipmi_response(plain)
        request = self._request
        if (
            response is None
            or response.netfn != request.netfn + 1
            or response.command != request.command
            or response.seq != self._rq_seq
        ):
            return
        self._request = None
        self._heard()
        if self.state == State.CLOSING:
            self._finish()
        elif self.state == State.PRIVILEGE:
            if response.code:
                raise BmcAuthError(
                    f"{self.where}: the BMC refuses operator privilege ({wire.completion_code(response.code)})",
                    hint=PRIVILEGE_HINT,
                )
            self._logged_in(now)
        elif self.state == State.BUSY:
            self._step(now, response)

    def _step(self, now: float, response: IpmiResponse | None) -> None:
        operation = self._operation
        assert operation is not None
        try:
            request = next(operation) if response is None else operation.send(response)
        except StopIteration as stop:
            self._succeed(stop.value, now)
            return
        except OperationError as exc:
            self._fail(BmcError(f"{self.where}: {exc.message}", hint=exc.hint), now)
            return
        except Exception as exc:  # an answer the operation did not expect: this BMC fails, not the loop
            self._fail(BmcError(f"{self.where}: unexpected answer ({type(exc).__name__}: {exc})"), now)
            return
        self.state = State.BUSY
        self._command(request, now)

    # ------------------------------------------------------------------ ending

    def _succeed(self, value: Any, now: float) -> None:
        self.done, self.value, self.error = True, value, None
        self._operation = None
        self._after_operation(now)

    def _fail(self, error: BmcError, now: float) -> None:
        self.done, self.value, self.error = True, None, error
        self._operation = None
        if isinstance(error, BmcUnreachableError):
            self.abort(now)  # a Close Session would wait for nothing: send one, do not wait
            return
        self._after_operation(now)

    def _after_operation(self, now: float) -> None:
        if self.close_after:
            if self.established:
                self._close(now)
            else:
                self._finish()
                return
        else:
            self.state = State.IDLE if self.established else State.DONE
            self._request = None
            if self._timer is not None:
                self._timer.cancel()
        self.link.changed(self)

    def _close(self, now: float) -> None:
        self.state = State.CLOSING
        request = Request(NETFN_APP, CMD_CLOSE_SESSION, self._bmc_sid.to_bytes(4, "little"), "Close Session")
        self._command(request, now, timeout=min(CLOSE_TIMEOUT, self.answer_timeout))

    def _finish(self) -> None:
        self.state = State.DONE
        self.established = False
        self._request = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.link.changed(self)

    @property
    def finished(self) -> bool:
        return self.state == State.DONE

"""provision.ipmi: the RMCP+ wire format and keys against pyghmi's implementation, then real UDP.

The unit tests hand our messages to pyghmi's client code (run here, not
copied) and pyghmi's messages to ours: a shared mistake in both is possible
only where pyghmi agrees with the virtual BMCs, ipmitool and FreeIPMI, which
the integration tests below and tests/test_vbmc.py check.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from provision.errors import BmcError
from provision.fanout import Result
from provision.ipmi import wire
from provision.ipmi.client import Client
from provision.ipmi.crypto import SUITE_3, SUITE_17, CipherSuite, Rakp, SessionKeys, aes_pad, suite_for
from provision.ipmi.errors import AUTH_HINT, CIPHER_HINT, BmcAuthError, BmcUnreachableError
from provision.ipmi.runner import Task, run_tasks
from provision.ipmi.session import Operation, Request, SequenceWindow
from provision.lab.vbmc import VbmcFleet, VbmcSpec, free_udp_ports

PASSWORD = "ipmi-Lan-pw-4417"


def pyghmi_session() -> Any:
    """A bare pyghmi client Session (no socket, no I/O thread) to call its message methods on."""
    from pyghmi.ipmi.private import session as pyghmi

    return object.__new__(pyghmi.Session)


# --------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize("length", range(40))
def test_aes_pad_is_pyghmis(length: int) -> None:
    from pyghmi.ipmi.private.session import _aespad

    assert aes_pad(length) == bytes(_aespad(bytearray(length)))
    assert (length + len(aes_pad(length))) % 16 == 0


def test_checksum_is_pyghmis() -> None:
    from pyghmi.ipmi.private.session import _checksum

    for data in (b"", b"\x20\x18", bytes(range(200)), os.urandom(50)):
        assert wire.checksum(data) == _checksum(*data)
        assert (sum(data) + wire.checksum(data)) % 256 == 0


def test_ipmi_request_is_pyghmis() -> None:
    s = pyghmi_session()
    s.seqlun, s.rqlun, s.rqaddr, s.servermode, s.tabooseq, s.request_entry = 5, 0, 0x81, False, {}, []
    theirs = s._make_ipmi_payload(0x00, 0x08, data=bytearray([5, 0xE0, 4, 0, 0, 0]))
    assert wire.ipmi_request(0x00, 0x08, 5, bytes([5, 0xE0, 4, 0, 0, 0])) == bytes(theirs)


def test_ipmi_response_parsing_checks_checksums() -> None:
    header = bytes([0x81, 0x01 << 2])
    body = bytes([0x20, 7 << 2, 0x01, 0x00, 0x21, 0x10, 0x40])
    message = header + bytes([wire.checksum(header)]) + body + bytes([wire.checksum(body)])
    parsed = wire.parse_ipmi_response(message)
    assert parsed == wire.IpmiResponse(netfn=1, seq=7, command=1, code=0, data=b"\x21\x10\x40")
    assert wire.parse_ipmi_response(message[:-1] + bytes([message[-1] ^ 1])) is None
    assert wire.parse_ipmi_response(message[:5]) is None


def test_suites_are_only_3_and_17() -> None:
    assert suite_for((3, 4, 1)) is SUITE_17
    assert suite_for((1, 1, 1)) is SUITE_3
    for chosen in [(0, 0, 0), (1, 0, 0), (1, 1, 0), (3, 4, 0), (2, 2, 1)]:
        assert suite_for(chosen) is None


@pytest.mark.parametrize(("suite", "hashlib_fn"), [(SUITE_17, hashlib.sha256), (SUITE_3, hashlib.sha1)])
def test_rakp_and_keys_agree_with_pyghmis_client(suite: CipherSuite, hashlib_fn: Callable[..., Any]) -> None:
    """pyghmi's RAKP2 check, RAKP3, SIK/K1/K2 and RAKP4 check, fed with our values."""
    user, password = b"admin", PASSWORD.encode()
    console_sid, bmc_sid, tag = 0x11223344, 0xA0B0C0D0, 9
    rm, rc, guid = os.urandom(16), os.urandom(16), os.urandom(16)
    role = wire.NAME_ONLY_LOOKUP | wire.PRIV_OPERATOR
    rakp = Rakp(suite, console_sid, bmc_sid, rm, rc, guid, role, user)

    s = pyghmi_session()
    sent: list[Any] = []
    s.sessioncontext, s.rmcptag, s.localsid, s.pendingsessionid = "EXPECTINGRAKP2", tag, console_sid, bmc_sid
    s.randombytes, s.userid, s.password, s.kg = rm, user, password, password
    s.nameonly, s.privlevel, s.autopriv, s.logontries = 16, 3, False, 1
    s.currhashlib, s.currhashlen, s.attemptedhash = hashlib_fn, suite.icv_length, 256 if suite is SUITE_17 else 1
    s.send_payload = lambda payload, payload_type: sent.append((bytes(bytearray(payload)), payload_type))
    s.onlogon = lambda response: sent.append(response)
    s._req_priv_level = lambda: sent.append("established")

    rakp2 = bytes([tag, 0, 0, 0]) + console_sid.to_bytes(4, "little") + rc + guid + rakp.rakp2_code(password)
    s._got_rakp2(bytearray(rakp2))
    assert sent == [(wire.rakp3(tag + 1, 0, bmc_sid, rakp.rakp3_code(password)), 0x14)], "pyghmi refused our RAKP2 code"
    sik = rakp.sik(password)
    keys = SessionKeys.derive(suite, sik)
    assert (s.sik, s.k1, s.aeskey) == (sik, keys.k1, keys.aes_key)
    assert wire.parse_rakp2(rakp2) == wire.Rakp2(tag, 0, console_sid, rc, guid, rakp.rakp2_code(password))

    rakp4 = bytes([tag + 1, 0, 0, 0]) + console_sid.to_bytes(4, "little") + rakp.rakp4_icv(sik)
    s._got_rakp4(bytearray(rakp4))
    assert sent[-1] == "established" and s.sessioncontext == "ESTABLISHED", sent


def _established_pyghmi(suite: CipherSuite, keys: SessionKeys, localsid: int, bmc_sid: int) -> Any:
    s = pyghmi_session()
    s.k1, s.aeskey, s.currhashlen = keys.k1, keys.aes_key, suite.icv_length
    s.currhashlib = hashlib.sha256 if suite is SUITE_17 else hashlib.sha1
    s.localsid, s.sessionid, s.sequencenumber, s.remseqnumber = localsid, bmc_sid, 7, None
    s.integrityalgo, s.confalgo, s.ipmiversion, s.authtype = 1, "aes", 2.0, 6
    s.lastpayload, s.pendingpayloads, s._customkeepalives = None, [], None
    s._crypto_backend = None
    return s


@pytest.mark.parametrize("suite", [SUITE_17, SUITE_3])
@pytest.mark.parametrize("length", [0, 1, 7, 14, 15, 16, 31, 40])
def test_packets_round_trip_with_pyghmi(suite: CipherSuite, length: int) -> None:
    keys = SessionKeys.derive(suite, os.urandom(32))
    s = _established_pyghmi(suite, keys, localsid=0x01020304, bmc_sid=0x0A0B0C0D)
    message = os.urandom(length)

    # ours -> pyghmi: integrity pad, AuthCode, IV, AES pad
    got: list[bytes] = []
    s._parse_ipmi_payload = lambda payload: got.append(bytes(payload))
    packet = wire.build_packet(wire.PAYLOAD_IPMI, 0x01020304, 42, message, keys)
    s._handle_ipmi2_packet(bytearray(packet))
    assert got == [message]

    # pyghmi -> ours
    s._xmit_packet = lambda *args, **kwargs: None
    s.send_payload(payload=bytearray(message) or bytearray(b"\0"), payload_type=0, retry=False)
    parsed = wire.parse_packet(bytes(s.netpacket))
    assert parsed is not None and (parsed.session_id, parsed.encrypted, parsed.authenticated) == (
        0x0A0B0C0D,
        True,
        True,
    )
    assert wire.open_packet(parsed, keys) == (message or b"\0")

    # a flipped bit anywhere fails the integrity check
    for position in (5, 16, len(packet) - 1):
        broken = bytearray(packet)
        broken[position] ^= 0x01
        reparsed = wire.parse_packet(bytes(broken))
        assert reparsed is None or wire.open_packet(reparsed, keys) is None


def test_open_session_request_layout() -> None:
    payload = wire.open_session_request(3, wire.PRIV_OPERATOR, 0xDEADBEEF, SUITE_17.algorithms)
    assert len(payload) == 32
    assert payload[:8] == bytes([3, 3, 0, 0]) + struct.pack("<I", 0xDEADBEEF)
    assert (payload[12], payload[20], payload[28]) == (3, 4, 1)
    assert (payload[8], payload[16], payload[24]) == (0, 1, 2)


def test_secrets_never_in_repr() -> None:
    keys = SessionKeys.derive(SUITE_17, b"s" * 32)
    assert keys.k1.hex() not in repr(keys) and keys.aes_key.hex() not in repr(keys)
    task = Task("n1", "127.0.0.1", 623, "admin", lambda: PASSWORD, lambda: iter(()))
    assert PASSWORD not in repr(task)


# --------------------------------------------------------------------------
# Real UDP: virtual BMCs (pyghmi's server in other processes) and fakes

GOOD = [f"g{i:02d}" for i in range(24)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VbmcFleet]:
    ports = iter(free_udp_ports(len(GOOD) + 3))
    specs = [VbmcSpec(name, next(ports), "admin", PASSWORD) for name in GOOD]
    specs += [
        VbmcSpec("dead", next(ports), "admin", PASSWORD, fault="unreachable"),
        VbmcSpec("wrongpw", next(ports), "admin", "not-" + PASSWORD),
        VbmcSpec("slow", next(ports), "admin", PASSWORD, fault="slow", delay=0.3),
    ]
    with VbmcFleet(specs, tmp_path_factory.mktemp("vbmc"), per_process=8) as running:
        yield running


def port(fleet: VbmcFleet, name: str) -> int:
    return next(s.port for s in fleet.specs if s.name == name)


def status() -> Operation:
    response = yield Request(0x00, 0x01, b"", "Get Chassis Status")
    return "on" if response.data[0] & 1 else "off"


def task(name: str, port: int, password: str = PASSWORD, operation: Callable[[], Operation] = status) -> Task:
    return Task(name, "127.0.0.1", port, "admin", lambda: password, operation, privileged=False)


@pytest.mark.integration
def test_one_loop_many_bmcs_in_order(fleet: VbmcFleet) -> None:
    names = [*GOOD, "wrongpw", *GOOD[:3]]  # the same BMC twice: one after the other
    seen: list[str] = []
    outcomes = run_tasks([task(n, port(fleet, n)) for n in names], fanout=8, on_outcome=lambda o: seen.append(o.node))
    assert [o.node for o in outcomes] == names
    assert sorted(seen) == sorted(names)
    assert [o.value for o in outcomes if o.ok] == ["off"] * (len(GOOD) + 3)
    bad = outcomes[len(GOOD)]
    assert (bad.result, bad.kind, bad.hint) == (Result.FAILED, "BmcAuthError", AUTH_HINT)
    assert "authentication failed" in (bad.error or "") and PASSWORD not in (bad.error or "")


@pytest.mark.integration
def test_a_dead_bmc_does_not_slow_the_others(fleet: VbmcFleet) -> None:
    names = ["dead", *GOOD]
    started = time.monotonic()
    outcomes = run_tasks([task(n, port(fleet, n)) for n in names], fanout=4, answer_timeout=1.5, retransmit=0.3)
    elapsed = time.monotonic() - started
    dead, good = outcomes[0], outcomes[1:]
    assert all(o.ok for o in good)
    assert max(o.seconds for o in good) < 1.0
    assert dead.kind == "BmcUnreachableError" and "no answer" in (dead.error or "")
    assert 1.4 < dead.seconds < 2.5 and elapsed < 3.0


@pytest.mark.integration
def test_unreachable_bmc_is_retried_with_backoff(fleet: VbmcFleet) -> None:
    (outcome,) = run_tasks(
        [task("dead", port(fleet, "dead"))], answer_timeout=0.4, retransmit=0.1, retries=2, backoff=0.1
    )
    assert (outcome.result, outcome.kind, outcome.attempts) == (Result.FAILED, "BmcUnreachableError", 3)
    assert outcome.seconds >= 3 * 0.4 + 0.1 + 0.2


@pytest.mark.integration
def test_deadline_reports_a_timeout(fleet: VbmcFleet) -> None:
    outcomes = run_tasks([task("dead", port(fleet, "dead")), task("slow", port(fleet, "slow"))], timeout=1.0)
    assert outcomes[0].result == Result.TIMEOUT and outcomes[0].kind == "Timeout"
    dead = port(fleet, "dead")
    assert outcomes[0].error == f"BMC 127.0.0.1:{dead}: no result within 1 s"  # names the BMC to check
    assert "provision_bmc_address" in (outcomes[0].hint or "")
    assert 0.9 < outcomes[0].seconds < 1.5
    assert outcomes[1].ok  # 0.3 s per command: within the deadline


@pytest.mark.integration
def test_a_refused_command_is_a_bmc_error_with_the_completion_code(fleet: VbmcFleet) -> None:
    def unknown() -> Operation:
        response = yield Request(0x06, 0x99, b"", "Unknown")
        if response.code:
            from provision.ipmi.errors import OperationError

            raise OperationError(f"Unknown refused: {wire.completion_code(response.code)}")
        return None

    (outcome,) = run_tasks([task("g00", port(fleet, "g00"), operation=unknown)])
    assert (
        outcome.kind == "BmcError"
        and outcome.error == f"BMC 127.0.0.1:{port(fleet, 'g00')}: Unknown refused: invalid command"
    )


class LossyProxy:
    """UDP between the client and one BMC, dropping every other datagram the client sends."""

    def __init__(self, bmc_port: int) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.bmc = ("127.0.0.1", bmc_port)
        self.client: tuple[str, int] | None = None
        self.seen = 0
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.front, selectors.EVENT_READ)
            selector.register(self.back, selectors.EVENT_READ)
            while not self.stop.is_set():
                for key, _ in selector.select(0.05):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    data, addr = sock.recvfrom(4096)
                    if sock is self.front:
                        self.client = addr
                        self.seen += 1
                        if self.seen % 2:
                            self.dropped += 1
                            continue
                        self.back.sendto(data, self.bmc)
                    elif self.client is not None:
                        self.front.sendto(data, self.client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.front.close()
        self.back.close()


@pytest.mark.integration
def test_lost_datagrams_are_retransmitted(fleet: VbmcFleet) -> None:
    proxy = LossyProxy(port(fleet, "g01"))
    try:
        (outcome,) = run_tasks([task("g01", proxy.port)], retransmit=0.1, answer_timeout=2.0)
    finally:
        proxy.close()
    assert outcome.ok and outcome.value == "off", outcome.error
    assert proxy.dropped >= 4  # open, RAKP1, RAKP3, the command: each sent twice


V2_CAPABILITIES = bytes([1, 0x80, 0x04, 0x02, 0, 0, 0, 0])  # channel 1, IPMI v2.0 extended data: RMCP+


def capabilities_answer(request: bytes, data: bytes = V2_CAPABILITIES, code: int = 0) -> bytes:
    """The IPMI 1.5 framed answer to a Get Channel Authentication Capabilities request (the whole datagram)."""
    message = request[14:]
    header = bytes([0x81, (wire.NETFN_APP + 1) << 2])
    body = bytes([0x20, message[4], wire.CMD_GET_CHANNEL_AUTH_CAPABILITIES, code]) + data
    answer = header + bytes([wire.checksum(header)]) + body + bytes([wire.checksum(body)])
    return wire.build_v15_packet(answer)


class FakeBmc:
    """Answers Get Channel Authentication Capabilities, every Open Session Request with ``reply(request
    payload)`` and, given ``rakp1``, every RAKP message 1 with ``rakp1(request payload)``. Keeps what came in."""

    def __init__(
        self,
        reply: Callable[[bytes], bytes],
        rakp1: Callable[[bytes], bytes] | None = None,
        capabilities: Callable[[bytes], bytes | None] = capabilities_answer,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.rakp1 = rakp1
        self.capabilities = capabilities
        self.proposals: list[tuple[int, int, int]] = []
        self.received: list[wire.Packet] = []  # RMCP+ packets
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            if data[4:5] == bytes([wire.AUTH_NONE]):  # session-less, IPMI 1.5 framing
                answer = self.capabilities(data)
                if answer is not None:
                    self.sock.sendto(answer, addr)
                continue
            packet = wire.parse_packet(data)
            if packet is None:
                continue
            self.received.append(packet)
            if packet.payload_type == wire.PAYLOAD_OPEN_REQUEST:
                payload = packet.payload
                self.proposals.append((payload[12], payload[20], payload[28]))
                answer = self.reply(payload)
                self.sock.sendto(wire.build_packet(wire.PAYLOAD_OPEN_RESPONSE, 0, 0, answer, None), addr)
            elif packet.payload_type == wire.PAYLOAD_RAKP1 and self.rakp1 is not None:
                answer = self.rakp1(packet.payload)
                self.sock.sendto(wire.build_packet(wire.PAYLOAD_RAKP2, 0, 0, answer, None), addr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def _open_response(algorithms: tuple[int, int, int]) -> Callable[[bytes], bytes]:
    def reply(request: bytes) -> bytes:
        auth, integrity, conf = algorithms
        return (
            bytes([request[0], 0, 4, 0])
            + request[4:8]
            + b"\x01\x02\x03\x04"
            + bytes([0, 0, 0, 8, auth, 0, 0, 0, 1, 0, 0, 8, integrity, 0, 0, 0, 2, 0, 0, 8, conf, 0, 0, 0])
        )

    return reply


@pytest.mark.integration
def test_a_bmc_choosing_cipher_suite_0_is_refused() -> None:
    fake = FakeBmc(_open_response((0, 0, 0)))
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=3)
    finally:
        fake.close()
    assert "not cipher suite 3 or 17" in info.value.message and info.value.hint == CIPHER_HINT
    assert fake.proposals == [(3, 4, 1)]


@pytest.mark.integration
@pytest.mark.parametrize("status", [0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0x12])
@pytest.mark.parametrize("short", [True, False], ids=["tag+status", "with-session-id"])
def test_unsupported_algorithms_lead_to_suite_3_then_a_clear_refusal(status: int, short: bool) -> None:
    """ipmi_sim and OpenBMC's netipmid answer SHA-256 with 0x04 in two bytes; others 0x11 in eight."""
    fake = FakeBmc(lambda request: bytes([request[0], status]) + (b"" if short else bytes(2) + request[4:8]))
    started = time.monotonic()
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=3)
    finally:
        fake.close()
    assert time.monotonic() - started < 0.5  # it answered: no waiting for "no answer"
    assert "refuses cipher suites 17 and 3" in info.value.message and info.value.hint == CIPHER_HINT
    assert f"(0x{status:02x})" in info.value.message and "no answer" not in info.value.message
    assert fake.proposals == [(3, 4, 1), (1, 1, 1)]


@pytest.mark.integration
def test_another_refusal_is_reported_at_once() -> None:
    fake = FakeBmc(lambda request: bytes([request[0], 0x01]))  # insufficient resources
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=3)
    finally:
        fake.close()
    assert info.value.message.endswith("session refused: insufficient resources to create a session (0x01)")
    assert fake.proposals == [(3, 4, 1)]


@pytest.mark.integration
def test_a_channel_without_ipmi_v2_is_refused_before_any_session() -> None:
    fake = FakeBmc(
        _open_response((3, 4, 1)), capabilities=lambda r: capabilities_answer(r, bytes([1, 0x80, 4, 1, 0, 0, 0, 0]))
    )
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=3)
    finally:
        fake.close()
    assert "does not offer IPMI v2.0 (RMCP+)" in info.value.message and fake.proposals == []


@pytest.mark.integration
def test_a_refused_capabilities_request_still_opens_a_session() -> None:
    fake = FakeBmc(lambda request: bytes([request[0], 0x11]), capabilities=lambda r: capabilities_answer(r, b"", 0xCC))
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=3)
    finally:
        fake.close()
    assert "refuses cipher suites 17 and 3" in info.value.message and len(fake.proposals) == 2


@pytest.mark.integration
def test_answers_we_cannot_use_are_named_not_called_no_answer() -> None:
    fake = FakeBmc(lambda request: bytes([request[0], 0]) + bytes(3))  # status 0 in 5 bytes: malformed
    try:
        with pytest.raises(BmcError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=1.5)
    finally:
        fake.close()
    assert not isinstance(info.value, BmcUnreachableError)
    assert "no usable answer to Open Session (cipher suite 17)" in info.value.message
    assert "a malformed Open Session Response (5 bytes)" in info.value.message


@pytest.mark.integration
def test_silence_after_an_answer_says_what_was_answered() -> None:
    fake = FakeBmc(_open_response((3, 4, 1)))  # never answers RAKP1
    try:
        with pytest.raises(BmcUnreachableError) as info:
            Client("127.0.0.1", "admin", PASSWORD, port=fake.port, timeout=1.0)
    finally:
        fake.close()
    message = info.value.message
    assert "no answer to RAKP message 1" in message and "it answered Get Channel Authentication Capabilities" in message


def test_sequence_window_rejects_replays_and_far_numbers() -> None:
    window = SequenceWindow(16)
    assert not window.accept(0)  # never valid for an authenticated packet
    assert window.accept(5) and not window.accept(5)  # the first sets the start; a replay is refused
    assert window.accept(7) and window.accept(6) and not window.accept(6)  # late but new: once
    assert window.accept(23) and not window.accept(23 + 17)  # at most 16 ahead
    assert not window.accept(7) and not window.accept(23 - 16)  # seen / fell out of the window
    assert window.accept(23 - 15)  # within the window, never seen
    wrap = SequenceWindow(16)
    assert wrap.accept(0xFFFFFFFE) and wrap.accept(1) and not wrap.accept(0xFFFFFFFE)


def test_short_error_answers_are_parsed() -> None:
    assert wire.parse_open_session_response(b"\x07\x04") == wire.OpenSessionResponse(7, 4, None)
    assert wire.parse_open_session_response(b"\x07\x00") is None  # success needs the whole answer
    assert wire.parse_rakp2(b"\x08\x0d") == wire.Rakp2(8, 0x0D, None)
    assert wire.parse_rakp4(b"\x09\x0f") == wire.Rakp4(9, 0x0F, None)
    assert wire.parse_open_session_response(b"\x07") is None


def test_rakp3_with_an_error_status_carries_no_code() -> None:
    assert wire.rakp3(5, wire.RMCP_INVALID_ICV, 0x01020304, b"c" * 32) == bytes([5, 0x0F, 0, 0, 4, 3, 2, 1])
    assert wire.rakp3(5, 0, 0x01020304, b"c" * 20).endswith(b"c" * 20)


@pytest.mark.integration
def test_client_errors_and_repr_hold_no_password(fleet: VbmcFleet) -> None:
    with pytest.raises(BmcAuthError) as info:
        Client("127.0.0.1", "admin", PASSWORD, port=port(fleet, "wrongpw"), timeout=3)
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value.args)
    client = Client("127.0.0.1", "admin", PASSWORD, port=port(fleet, "g02"))
    try:
        assert client.cipher_suite == 17
        assert client.run(status()) == "off"
        assert PASSWORD not in repr(client) and PASSWORD not in repr(client._session)
    finally:
        client.close()
    with pytest.raises(BmcUnreachableError):
        client.run(status())


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 40])
def test_aes_cbc_over_one_ecb_context_is_aes_cbc(length: int) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    keys = SessionKeys.derive(SUITE_3, os.urandom(20))
    for _ in range(3):  # the contexts carry no state from one message to the next
        payload, iv = os.urandom(length), os.urandom(16)
        encryptor = Cipher(algorithms.AES(keys.aes_key), modes.CBC(iv)).encryptor()
        expected = iv + encryptor.update(payload + aes_pad(length)) + encryptor.finalize()
        assert keys.encrypt(payload, iv) == expected
        assert keys.decrypt(expected) == payload


@pytest.mark.integration
def test_an_operation_that_breaks_fails_its_node_only(fleet: VbmcFleet) -> None:
    def broken() -> Operation:
        response = yield Request(0x00, 0x01, b"", "Get Chassis Status")
        return response.data[99]  # IndexError

    outcomes = run_tasks([task("g03", port(fleet, "g03"), operation=broken), task("g04", port(fleet, "g04"))])
    assert outcomes[0].kind == "BmcError" and "unexpected answer (IndexError" in (outcomes[0].error or "")
    assert outcomes[1].ok

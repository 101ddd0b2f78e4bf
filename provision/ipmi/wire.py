"""IPMI v2.0 LAN wire format: RMCP+ packets and the messages they carry.

Pure functions over bytes, no I/O (section 13.6, 13.8, 13.17-13.23, table
13-8). An RMCP+ packet is::

    RMCP header 06 00 ff 07 | auth type 06 | payload type | session id (LE32)
    | session sequence (LE32) | payload length (LE16) | payload
    [| integrity pad ff.. | pad length | next header 07 | AuthCode]

with bit 7 of the payload type for an encrypted payload and bit 6 for an
authenticated packet. The handshake messages (Open Session, RAKP 1-4) travel
in the clear with session id 0; after RAKP4 every message is encrypted and
authenticated with the session's keys. The payload of an IPMI message
(payload type 0) is the LAN message of section 13.8: rsAddr, netFn/LUN,
checksum, rqAddr, rqSeq/LUN, command, data, checksum.

Before any session, Get Channel Authentication Capabilities travels in the
IPMI 1.5 framing (table 13-4: RMCP header | auth type 00 | session sequence
(LE32) 0 | session id (LE32) 0 | length (8 bits) | message), as ipmitool and
ipmipower send it. Error answers to the handshake may be as short as the
message tag and status (OpenIPMI's ipmi_sim, OpenBMC's netipmid send two
bytes): they are read, not dropped.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from provision.ipmi.crypto import SessionKeys

RMCP_HEADER = b"\x06\x00\xff\x07"
AUTH_RMCP_PLUS = 0x06
PAYLOAD_IPMI = 0x00
PAYLOAD_OPEN_REQUEST = 0x10
PAYLOAD_OPEN_RESPONSE = 0x11
PAYLOAD_RAKP1 = 0x12
PAYLOAD_RAKP2 = 0x13
PAYLOAD_RAKP3 = 0x14
PAYLOAD_RAKP4 = 0x15
ENCRYPTED = 0x80
AUTHENTICATED = 0x40

BMC_ADDRESS = 0x20  # rsAddr: the BMC
CONSOLE_SWID = 0x81  # rqAddr: remote console software id (table 5-4)

# Requested privilege levels (table 6-?) and the RAKP1 role's name-only lookup bit.
PRIV_USER = 2
PRIV_OPERATOR = 3
PRIV_ADMINISTRATOR = 4
NAME_ONLY_LOOKUP = 0x10

# RMCP+ and RAKP message status codes (table 13-15).
RMCP_STATUS = {
    0x01: "insufficient resources to create a session",
    0x02: "invalid session id",
    0x03: "invalid payload type",
    0x04: "invalid authentication algorithm",
    0x05: "invalid integrity algorithm",
    0x06: "no matching authentication payload",
    0x07: "no matching integrity payload",
    0x08: "inactive session id",
    0x09: "invalid role",
    0x0A: "unauthorized role or privilege level requested",
    0x0B: "insufficient resources to create a session at the requested role",
    0x0C: "invalid name length",
    0x0D: "unauthorized name",
    0x0E: "unauthorized GUID",
    0x0F: "invalid integrity check value",
    0x10: "invalid confidentiality algorithm",
    0x11: "no cipher suite match with proposed security algorithms",
    0x12: "illegal or unrecognized parameter",
}
RMCP_NO_CIPHER_SUITE_MATCH = 0x11
RMCP_INVALID_ICV = 0x0F
# The statuses a BMC gives to algorithms (a cipher suite) it does not support:
# invalid authentication / integrity algorithm, no matching authentication /
# integrity payload, invalid confidentiality algorithm, no cipher suite match,
# illegal or unrecognized parameter (the SHA-256 algorithm numbers to a BMC
# that predates them).
RMCP_UNSUPPORTED_ALGORITHM = frozenset({0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0x12})

# Completion codes (table 5-2).
COMPLETION_CODES = {
    0xC0: "node busy",
    0xC1: "invalid command",
    0xC2: "command invalid for given LUN",
    0xC3: "timeout while processing command",
    0xC4: "out of space",
    0xC5: "reservation canceled or invalid",
    0xC6: "request data truncated",
    0xC7: "request data length invalid",
    0xC8: "request data field length limit exceeded",
    0xC9: "parameter out of range",
    0xCA: "cannot return number of requested data bytes",
    0xCB: "requested sensor, data, or record not present",
    0xCC: "invalid data field in request",
    0xCD: "command illegal for specified sensor or record type",
    0xCE: "command response could not be provided",
    0xCF: "cannot execute duplicated request",
    0xD0: "SDR repository in update mode",
    0xD1: "device in firmware update mode",
    0xD2: "BMC initialization in progress",
    0xD3: "destination unavailable",
    0xD4: "insufficient privilege level",
    0xD5: "command not supported in present state",
    0xD6: "command sub-function disabled or unavailable",
    0xFF: "unspecified error",
}


def rmcp_status(code: int) -> str:
    """The status's meaning and number: "invalid authentication algorithm (0x04)"."""
    return f"{RMCP_STATUS.get(code, 'RMCP+ status')} (0x{code:02x})"


def completion_code(code: int) -> str:
    return COMPLETION_CODES.get(code, f"completion code 0x{code:02x}")


def checksum(data: bytes) -> int:
    """The two's complement checksum of IPMI messages (data + checksum == 0 mod 256)."""
    return -sum(data) & 0xFF


# --------------------------------------------------------------------------
# IPMI LAN messages (section 13.8)


@dataclass(frozen=True)
class IpmiResponse:
    netfn: int  # the response's netFn (request netFn + 1)
    seq: int
    command: int
    code: int  # completion code
    data: bytes


def ipmi_request(netfn: int, command: int, seq: int, data: bytes = b"") -> bytes:
    header = bytes([BMC_ADDRESS, netfn << 2])
    body = bytes([CONSOLE_SWID, (seq & 0x3F) << 2, command]) + data
    return header + bytes([checksum(header)]) + body + bytes([checksum(body)])


def parse_ipmi_response(message: bytes) -> IpmiResponse | None:
    """A response message to this console, or None if malformed (length or checksum)."""
    if len(message) < 8 or checksum(message[:2]) != message[2] or checksum(message[3:-1]) != message[-1]:
        return None
    return IpmiResponse(
        netfn=message[1] >> 2, seq=message[4] >> 2, command=message[5], code=message[6], data=bytes(message[7:-1])
    )


# --------------------------------------------------------------------------
# IPMI 1.5 framing, for the session-less Get Channel Authentication Capabilities

AUTH_NONE = 0x00
NETFN_APP = 0x06
CMD_GET_CHANNEL_AUTH_CAPABILITIES = 0x38
CURRENT_CHANNEL = 0x0E
WANT_IPMI_V2_DATA = 0x80  # channel byte bit 7: "get IPMI v2.0+ extended data"


def build_v15_packet(message: bytes) -> bytes:
    """A session-less IPMI 1.5 packet (auth type none, session 0) carrying ``message``."""
    return RMCP_HEADER + struct.pack("<BIIB", AUTH_NONE, 0, 0, len(message)) + message


def session_less_message(raw: bytes) -> bytes | None:
    """The IPMI message of a session-less reply, IPMI 1.5 or RMCP+ framed (session id 0, clear); else None."""
    if len(raw) < 14 or raw[:4] != RMCP_HEADER:
        return None
    if raw[4] == AUTH_NONE:
        length = raw[13]
        return raw[14 : 14 + length] if 14 + length <= len(raw) else None
    packet = parse_packet(raw)
    if packet is None or packet.payload_type != PAYLOAD_IPMI or packet.session_id or packet.encrypted:
        return None
    return packet.payload


def channel_auth_capabilities_request(seq: int, privilege: int) -> bytes:
    return ipmi_request(
        NETFN_APP, CMD_GET_CHANNEL_AUTH_CAPABILITIES, seq, bytes([WANT_IPMI_V2_DATA | CURRENT_CHANNEL, privilege])
    )


@dataclass(frozen=True)
class ChannelAuthCapabilities:
    """Table 22-15, the part that tells whether the channel speaks RMCP+."""

    extended: bool  # byte 2 bit 7: the answer carries IPMI v2.0 extended capabilities
    ipmi_v2: bool  # byte 4 bit 1: the channel supports IPMI v2.0 (RMCP+) sessions


def parse_channel_auth_capabilities(data: bytes) -> ChannelAuthCapabilities | None:
    """The response data (after the completion code), or None if too short."""
    if len(data) < 4:
        return None
    extended = bool(data[1] & 0x80)
    return ChannelAuthCapabilities(extended=extended, ipmi_v2=extended and bool(data[3] & 0x02))


# --------------------------------------------------------------------------
# RMCP+ packets (table 13-8)


@dataclass(frozen=True)
class Packet:
    """A received RMCP+ packet, not yet authenticated."""

    payload_type: int  # without the encrypted/authenticated bits
    encrypted: bool
    authenticated: bool
    session_id: int
    sequence: int
    payload: bytes  # as sent: encrypted if ``encrypted``
    raw: bytes


def parse_packet(raw: bytes) -> Packet | None:
    """The header of an RMCP+ packet, or None for anything else (IPMI 1.5, ASF, short)."""
    if len(raw) < 16 or raw[:4] != RMCP_HEADER or raw[4] != AUTH_RMCP_PLUS:
        return None
    kind = raw[5]
    session_id, sequence, length = struct.unpack_from("<IIH", raw, 6)
    if 16 + length > len(raw):
        return None
    return Packet(
        payload_type=kind & 0x3F,
        encrypted=bool(kind & ENCRYPTED),
        authenticated=bool(kind & AUTHENTICATED),
        session_id=session_id,
        sequence=sequence,
        payload=raw[16 : 16 + length],
        raw=raw,
    )


def build_packet(payload_type: int, session_id: int, sequence: int, payload: bytes, keys: SessionKeys | None) -> bytes:
    """An RMCP+ packet; with ``keys``, encrypted (AES-CBC-128) and authenticated."""
    if keys is None:
        return (
            RMCP_HEADER
            + struct.pack("<BBIIH", AUTH_RMCP_PLUS, payload_type, session_id, sequence, len(payload))
            + payload
        )
    body = keys.encrypt(payload)
    packet = RMCP_HEADER + struct.pack(
        "<BBIIH", AUTH_RMCP_PLUS, payload_type | ENCRYPTED | AUTHENTICATED, session_id, sequence, len(body)
    )
    packet += body
    pad = (4 - (len(packet) - 2) % 4) % 4  # Auth Type .. Next Header: a multiple of 4 bytes
    packet += b"\xff" * pad + bytes([pad, 0x07])
    return packet + keys.auth_code(packet[4:])


def open_packet(packet: Packet, keys: SessionKeys) -> bytes | None:
    """The plain payload of an authenticated (and encrypted) packet, or None if it fails the checks."""
    if not (packet.authenticated and packet.encrypted):
        return None  # a session's messages must be both: anything else is refused
    icv_length = keys.suite.icv_length
    raw = packet.raw
    if len(raw) < 16 + len(packet.payload) + 2 + icv_length:
        return None
    if not hmac.compare_digest(keys.auth_code(raw[4:-icv_length]), raw[-icv_length:]):
        return None
    try:
        return keys.decrypt(packet.payload)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Session establishment messages (section 13.17-13.23)


def open_session_request(tag: int, privilege: int, console_sid: int, algorithms: tuple[int, int, int]) -> bytes:
    auth, integrity, confidentiality = algorithms
    return (
        bytes([tag, privilege, 0, 0])
        + console_sid.to_bytes(4, "little")
        + bytes([0, 0, 0, 8, auth, 0, 0, 0])
        + bytes([1, 0, 0, 8, integrity, 0, 0, 0])
        + bytes([2, 0, 0, 8, confidentiality, 0, 0, 0])
    )


@dataclass(frozen=True)
class HandshakeAnswer:
    """What every answer of the RMCP+ handshake starts with."""

    tag: int
    status: int
    console_sid: int | None  # None: a short error answer


def _answer_head(payload: bytes, ok_length: int) -> tuple[int, int, int | None] | None:
    """Tag, status and console session id of a handshake answer; None when it is cut short.

    An error answer may stop after tag and status; a success must hold ``ok_length`` bytes.
    """
    if len(payload) < 2 or (payload[1] == 0 and len(payload) < max(8, ok_length)):
        return None
    return payload[0], payload[1], int.from_bytes(payload[4:8], "little") if len(payload) >= 8 else None


@dataclass(frozen=True)
class OpenSessionResponse(HandshakeAnswer):
    bmc_sid: int = 0
    algorithms: tuple[int, int, int] = (0, 0, 0)  # what the BMC chose


def parse_open_session_response(payload: bytes) -> OpenSessionResponse | None:
    head = _answer_head(payload, 36)
    if head is None or head[1] != 0:  # cut short, or an error answer: no body
        return OpenSessionResponse(*head) if head else None
    return OpenSessionResponse(*head, int.from_bytes(payload[8:12], "little"), (payload[16], payload[24], payload[32]))


def rakp1(tag: int, bmc_sid: int, rm: bytes, role: int, user: bytes) -> bytes:
    return bytes([tag, 0, 0, 0]) + bmc_sid.to_bytes(4, "little") + rm + bytes([role, 0, 0, len(user)]) + user


@dataclass(frozen=True)
class Rakp2(HandshakeAnswer):
    rc: bytes = b""
    guid: bytes = b""
    code: bytes = b""


def parse_rakp2(payload: bytes) -> Rakp2 | None:
    head = _answer_head(payload, 40)
    if head is None or head[1] != 0:  # cut short, or an error answer: no body
        return Rakp2(*head) if head else None
    return Rakp2(*head, bytes(payload[8:24]), bytes(payload[24:40]), bytes(payload[40:]))


def rakp3(tag: int, status: int, bmc_sid: int, code: bytes = b"") -> bytes:
    """RAKP message 3; with an error status it carries no key exchange authentication code."""
    return bytes([tag, status, 0, 0]) + bmc_sid.to_bytes(4, "little") + (b"" if status else code)


@dataclass(frozen=True)
class Rakp4(HandshakeAnswer):
    icv: bytes = b""


def parse_rakp4(payload: bytes) -> Rakp4 | None:
    head = _answer_head(payload, 8)
    return Rakp4(*head, bytes(payload[8:])) if head else None

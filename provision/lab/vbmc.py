"""Virtual BMCs: real IPMI v2.0 (RMCP+) LAN endpoints on loopback.

Each virtual BMC is one UDP port speaking the real wire protocol, built on
pyghmi's BMC server classes, so ``ipmitool -I lanplus`` and FreeIPMI talk to
it as they would to a rack's BMCs. Several BMCs share one process and one
select loop (pyghmi's); a ``VbmcFleet`` runs groups of them in separate
processes and tests read their state back from the BMC side (one JSON file per
BMC, rewritten atomically on every change).

What pyghmi's stock server lacks and this module adds:

* **Cipher suites 3 and 17, negotiated.** pyghmi's server answers every Open
  Session Request with suite 3 (HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) whatever
  the console proposed, and lists only suite 3 in Get Channel Cipher Suites.
  Here the BMC honours the console's proposal when it names an enabled suite
  (17: RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128; or 3), refuses anything
  else with RMCP+ status 0x11 (no cipher suite match) as the spec asks, and
  lists every enabled suite. Suites without integrity or confidentiality (0,
  1, 2) are never offered. ``lax_suites=True`` restores pyghmi's stock
  behaviour (answer suite 3 to any proposal) so that clients can be tested
  against BMCs that behave like that.
* Unknown user names get RAKP2 status 0x0D; a bad RAKP3 gets RAKP4 status 0x0F.
* Boot flags keep their persistent and UEFI bits; a one-time override is
  consumed when the machine boots (power on, reset, cycle).
* Faults on demand: ``unreachable`` (drops every packet), ``slow`` (each
  reply is delayed; the delay holds the process's loop, so the fleet gives
  slow BMCs a process of their own), and a wrong password is simply a BMC
  whose password differs from the inventory's.

The machine behind a BMC is a ``Machine``: anything with ``start()``,
``stop()``, ``reset()`` and ``is_running`` (attribute, property or method);
optional ``shutdown()`` (ACPI soft off; else ``stop()``) and
``set_boot_device(device, persistent, uefi)``. ``QemuMachine`` adapts
``provision.lab.vm.Machine`` (the BMC's boot device picks what QEMU boots);
``SimulatedMachine`` is a power flag for tests. The fleet's processes run
simulated machines unless a served spec carries a ``"machine"`` (a
``MachineSpec`` as JSON, see ``machine_spec_to_json``: the virtual rack does
that); a process can also build QEMU-backed BMCs itself::

    bmc = vbmc.create(spec, machine=vbmc.QemuMachine(vm.Machine(machine_spec)), state_dir=d)
    vbmc.serve_forever()          # one select loop for every BMC of the process
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from provision.catalog import IMPORT_ROOT
from provision.files import write_atomic
from provision.proc import spawn

log = logging.getLogger(__name__)

# Cipher suites: (authentication, integrity, confidentiality) algorithm numbers
# (IPMI 2.0 tables 13-17, 13-18, 13-19) and the hash they use.
SUITES: dict[int, tuple[tuple[int, int, int], Callable[..., Any], int]] = {
    3: ((1, 1, 1), hashlib.sha1, 12),  # RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128
    17: ((3, 4, 1), hashlib.sha256, 16),  # RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128
}
DEFAULT_SUITES = (17, 3)
PASSWORD_ENV = "PROVISION_VBMC_PASSWORD"

# Boot device selector (boot flags parameter 5, data 2 bits 5:2).
BOOT_DEVICE_CODES = {"none": 0, "pxe": 1, "disk": 2, "safe": 3, "diag": 4, "cdrom": 5, "bios": 6, "floppy": 15}
BOOT_DEVICE_NAMES = {v: k for k, v in BOOT_DEVICE_CODES.items()}

RMCP_NO_CIPHER_MATCH = 0x11
RMCP_UNAUTHORIZED_NAME = 0x0D
RMCP_INVALID_ICV = 0x0F
CC_NOT_IN_PRESENT_STATE = 0xD5


@runtime_checkable
class Machine(Protocol):
    """What a virtual BMC drives. ``provision.lab.vm.Machine`` fits."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reset(self) -> None: ...


def machine_running(machine: Machine) -> bool:
    value = getattr(machine, "is_running", False)
    return bool(value() if callable(value) else value)


class SimulatedMachine:
    """A machine that is only a power flag (for tests and benchmarks)."""

    def __init__(self, running: bool = False) -> None:
        self.running = running
        self.boots = 0

    @property
    def is_running(self) -> bool:
        return self.running

    def start(self) -> None:
        self.running = True
        self.boots += 1

    def stop(self) -> None:
        self.running = False

    def reset(self) -> None:
        self.boots += 1


class QemuMachine:
    """Adapts ``provision.lab.vm.Machine`` (QEMU) to a virtual BMC.

    The BMC's boot device chooses ``start(boot=...)``: pxe boots from the
    network, disk from the disk, anything else the machine's own default.
    QEMU fixes the boot order at start, so a reset that must boot another
    device than the running one is a stop and a start.
    """

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.boot: str | None = None
        self.started_with: str | None = None

    def set_boot_device(self, device: str, persistent: bool, uefi: bool) -> None:
        self.boot = device if device in ("pxe", "disk") else None

    def _boot_from(self) -> Any:
        from provision.lab.vm import BootFrom

        return {"pxe": BootFrom.NETWORK, "disk": BootFrom.DISK}.get(self.boot or "")

    @property
    def is_running(self) -> bool:
        return machine_running(self.machine)

    def start(self) -> None:
        self.machine.start(self._boot_from())
        self.started_with = self.boot

    def stop(self) -> None:
        self.machine.stop()

    def reset(self) -> None:
        if self.boot is not None and self.boot != self.started_with:
            self.machine.stop()
            self.start()
        else:
            self.machine.reset()


@dataclass(frozen=True)
class VbmcSpec:
    """One virtual BMC. ``fault``: None, "unreachable" or "slow"."""

    name: str
    port: int
    user: str
    password: str = field(repr=False)
    address: str = "127.0.0.1"
    power: str = "off"
    fault: str | None = None
    delay: float = 0.0
    suites: tuple[int, ...] = DEFAULT_SUITES
    lax_suites: bool = False

    def __post_init__(self) -> None:
        if self.fault not in (None, "unreachable", "slow"):
            raise ValueError(f"{self.name}: unknown fault {self.fault!r} (use unreachable or slow)")
        unknown = set(self.suites) - set(SUITES)
        if unknown:
            raise ValueError(f"{self.name}: unsupported cipher suites {sorted(unknown)} (supported: 3, 17)")


def state_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def read_state(state_dir: Path, name: str) -> dict[str, Any]:
    """The state a virtual BMC last wrote (power, boot flags, history)."""
    data: dict[str, Any] = json.loads(state_path(state_dir, name).read_text())
    return data


# --------------------------------------------------------------------------
# The server side, on pyghmi's classes (imported lazily: the client side of
# the project must not pull the server in).


def install_recv_fix(pyghmi_session: Any) -> None:
    """Make pyghmi's socket reads non-blocking per call, not per socket.

    pyghmi's I/O loop reads with ``sock.setblocking(0); sock.recvfrom()``
    while a sender calls ``sock.setblocking(1); sock.sendto()`` on the same
    socket: when the two interleave, the read blocks on an empty socket and
    every BMC of the process stalls until a packet happens to arrive.
    Reading with MSG_DONTWAIT gives the non-blocking read pyghmi intends
    whatever the socket's mode. Nothing on the wire changes.
    """
    if getattr(pyghmi_session, "_provision_recv_fix", False):
        return

    def _io_recvfrom(mysocket: socket.socket, size: int) -> tuple[bytes, Any] | None:
        try:
            return mysocket.recvfrom(size, socket.MSG_DONTWAIT)
        except OSError:
            return None

    pyghmi_session._io_recvfrom = _io_recvfrom
    pyghmi_session._provision_recv_fix = True


def _server_classes() -> tuple[type[Any], type[Any]]:
    import pyghmi.ipmi.bmc as pyghmi_bmc
    import pyghmi.ipmi.private.constants as constants
    import pyghmi.ipmi.private.serversession as serversession
    import pyghmi.ipmi.private.session as ipmisession

    install_recv_fix(ipmisession)

    class NegotiatingServerSession(serversession.ServerSession):  # type: ignore[misc]
        """pyghmi's RMCP+ server session, with suite 3/17 negotiation."""

        bmc: VirtualBmc
        kg: bytes | None
        k1: bytes | None
        Rm: bytearray
        confalgo: Any
        integrityalgo: Any
        remseqnumber: int | None
        _rakp2_reply: bytes
        _rakp3_code: bytes
        _rakp4_reply: bytes

        def process_pktqueue(self) -> None:
            if self.bmc.spec.fault == "unreachable":
                self.pktqueue.clear()
                return
            super().process_pktqueue()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # sends the Open Session Response
            self._open_reply = bytes(self.netpacket)

        def _resend(self, packet: bytes, tag: int | None = None) -> None:
            """Send a cached handshake message again, answering the request's message tag."""
            if tag is not None:
                copy = bytearray(packet)
                copy[16] = tag  # the first payload byte, after the 16-byte RMCP+ header
                packet = bytes(copy)
            ipmisession._io_sendto(self.socket, packet, self.sockaddr)

        def _forget(self) -> None:
            handlers = ipmisession.Session.bmc_handlers.get(self.sockaddr, {})
            if handlers.get(self.bmc.port) is self:
                del handlers[self.bmc.port]
            if not handlers:
                ipmisession.Session.bmc_handlers.pop(self.sockaddr, None)

        def close_server_session(self) -> None:
            self._forget()

        def sessionless_data(self, data: Any, sockaddr: Any) -> None:
            self.bmc.sessionless_data(data, sockaddr)

        def _handle_ipmi_packet(self, data: bytearray, sockaddr: Any = None, qent: Any = None) -> Any:
            # Session-less requests (IPMI 1.5 framing, or RMCP+ framing with
            # session id 0: Get Channel Authentication Capabilities, Get
            # Channel Cipher Suites) from a console that has a session here
            # are answered as such. pyghmi's server drops the RMCP+ ones and,
            # for the others, forgets every session of that console address
            # on every BMC of the process (then crashes on packets already
            # queued for them), which breaks consoles that retransmit.
            sessionless = data[4] in (0, 2) or (data[4] == 6 and data[5] & 0x3F == 0 and data[6:10] == b"\0\0\0\0")
            if sessionless:
                self.bmc.sessionless_data(data, sockaddr)
                return None
            return super()._handle_ipmi_packet(data, sockaddr=sockaddr, qent=qent)

        # The handshake answers are idempotent: a retransmitted request (the
        # console timed out while this process was busy) gets the same answer
        # again (under the retransmission's message tag: FreeIPMI changes the
        # tag on each retry) instead of a new session or new keys.
        def _got_rmcp_openrequest(self, data: bytearray) -> None:
            if bytes(data[4:8]) == bytes(self.clientsessionid):
                self._resend(self._open_reply, tag=data[0])
                return
            # A new console session from the same address and port.
            NegotiatingServerSession(
                self.authdata, self.kg, self.sockaddr, self.socket, bytearray(data), self.uuid, bmc=self.bmc
            )

        def create_open_session_response(self, request: bytearray) -> bytearray:
            tag = request[0]
            self.clientsessionid = bytearray(request[4:8])
            self.managedsessionid = os.urandom(4)
            self.privlevel = 4
            proposed = (request[12], request[20], request[28]) if len(request) >= 32 else None
            suite = self.bmc.choose_suite(proposed)
            if suite is None:
                self.suite = None
                return bytearray([tag, RMCP_NO_CIPHER_MATCH, 0, 0]) + self.clientsessionid
            self.suite = suite
            (auth, integrity, conf), self.currhashlib, self.currhashlen = SUITES[suite]
            return (
                bytearray([tag, 0, self.privlevel, 0])
                + self.clientsessionid
                + self.managedsessionid
                + bytearray([0, 0, 0, 8, auth, 0, 0, 0, 1, 0, 0, 8, integrity, 0, 0, 0, 2, 0, 0, 8, conf, 0, 0, 0])
            )

        def _handshake(self, payload: bytearray, payload_type: str) -> bytes:
            """Send a handshake message (never integrity-protected); return its bytes."""
            packet = (
                bytearray(b"\x06\x00\xff\x07\x06")
                + bytearray([constants.payload_types[payload_type]])
                + bytearray(8)
                + struct.pack("<H", len(payload))
                + payload
            )
            self._resend(bytes(packet))
            return bytes(packet)

        def _got_rakp1(self, data: bytearray) -> None:
            if getattr(self, "suite", None) is None or bytes(data[4:8]) != bytes(self.managedsessionid):
                return
            if hasattr(self, "_rakp2_reply") and bytes(data[8:24]) == bytes(self.Rm):
                self._resend(self._rakp2_reply, tag=data[0])
                return
            # A first RAKP1, or a console starting the exchange over with a
            # new random number: the session is (again) not established.
            self.confalgo = 0
            self.integrityalgo = 0
            self.k1 = None
            self.__dict__.pop("_rakp4_reply", None)
            tag = data[0]
            self.Rm = data[8:24]
            self.rolem = data[24]
            self.maxpriv = self.rolem & 0b111
            self.username = bytes(data[28 : 28 + data[27]])
            password = self.bmc.authdata.get(self.username.decode("utf-8", "replace"))
            if not self.username or password is None:
                self._handshake(bytearray([tag, RMCP_UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid, "rakp2")
                return
            self.uuiddata = self.uuid.bytes
            self.Rc = os.urandom(16)
            self.kuid = password.encode("utf-8")
            if self.kg is None:
                self.kg = self.kuid
            hmacdata = (
                self.clientsessionid
                + self.managedsessionid
                + self.Rm
                + self.Rc
                + self.uuiddata
                + bytearray([self.rolem, len(self.username)])
                + self.username
            )
            authcode = hmac.new(self.kuid, bytes(hmacdata), self.currhashlib).digest()
            message = bytearray([tag, 0, 0, 0]) + self.clientsessionid + self.Rc + self.uuiddata + authcode
            self._rakp2_reply = self._handshake(message, "rakp2")

        def _got_rakp3(self, data: bytearray) -> None:
            if getattr(self, "suite", None) is None or not hasattr(self, "Rc"):
                return
            if bytes(data[4:8]) != bytes(self.managedsessionid) or data[1] != 0:
                return  # not ours, or the console rejected RAKP2 (e.g. wrong password)
            if hasattr(self, "_rakp4_reply") and bytes(data[8:]) == self._rakp3_code:
                self._resend(self._rakp4_reply, tag=data[0])
                return
            tag = data[0]
            namepart = struct.pack("2B", self.rolem, len(self.username)) + self.username
            expected = hmac.new(self.kuid, bytes(self.Rc + self.clientsessionid) + namepart, self.currhashlib).digest()
            if bytes(data[8:]) != expected:
                self._handshake(bytearray([tag, RMCP_INVALID_ICV, 0, 0]) + self.clientsessionid, "rakp4")
                return
            self.sik = hmac.new(self.kg or self.kuid, bytes(self.Rm + self.Rc) + namepart, self.currhashlib).digest()
            self.k1 = hmac.new(self.sik, b"\x01" * 20, self.currhashlib).digest()
            self.k2 = hmac.new(self.sik, b"\x02" * 20, self.currhashlib).digest()
            self.aeskey = self.k2[0:16]
            self.localsid = struct.unpack("<I", self.managedsessionid)[0]
            self.ipmicallback = self.handle_client_request
            icv = hmac.new(self.sik, bytes(self.Rm + self.managedsessionid + self.uuiddata), self.currhashlib).digest()[
                : self.currhashlen
            ]
            self._rakp3_code = expected
            self._rakp4_reply = self._handshake(bytearray([tag, 0, 0, 0]) + self.clientsessionid + icv, "rakp4")
            self.confalgo = "aes"
            self.integrityalgo = self.suite
            self.sequencenumber = 1
            self.remseqnumber = None
            self.sessionid = struct.unpack("<I", bytes(self.clientsessionid))[0]

        def handle_client_request(self, request: dict[str, Any]) -> None:
            if request["netfn"] == 6 and request["command"] == 0x3B and not hasattr(self, "clientpriv"):
                self.clientpriv = 4
            super().handle_client_request(request)

    class VirtualBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
        """One virtual BMC on ``spec.address:spec.port``."""

        def __init__(self, spec: VbmcSpec, machine: Machine | None = None, state_dir: Path | None = None) -> None:
            super().__init__({spec.user: spec.password}, port=spec.port, address=spec.address)
            self.spec = spec
            self.machine: Machine = machine or SimulatedMachine(running=spec.power == "on")
            self.state_dir = state_dir
            self.bootdev = "none"
            self.boot_valid = False
            self.boot_persistent = False
            self.boot_uefi = False
            self.history: list[str] = []
            self.write_state()

        # -- state, read back by tests
        def state(self) -> dict[str, Any]:
            return {
                "name": self.spec.name,
                "port": self.spec.port,
                "power": "on" if machine_running(self.machine) else "off",
                "bootdev": self.bootdev if self.boot_valid else "none",
                "persistent": self.boot_persistent,
                "uefi": self.boot_uefi,
                "history": list(self.history),
            }

        def write_state(self) -> None:
            if self.state_dir is None:
                return
            write_atomic(state_path(self.state_dir, self.spec.name), json.dumps(self.state()), mode=0o600)

        def record(self, event: str) -> None:
            self.history.append(event)
            self.write_state()

        # -- negotiation
        def choose_suite(self, proposed: tuple[int, int, int] | None) -> int | None:
            enabled = self.spec.suites
            if self.spec.lax_suites:
                return 3 if 3 in enabled else enabled[0]
            if proposed is None:
                return enabled[0]
            for suite in enabled:
                if SUITES[suite][0] == proposed:
                    return suite
            return None

        def cipher_records(self, index: int) -> bytearray:
            """Get Channel Cipher Suites record data, 16 bytes per list index."""
            suites = [3] if self.spec.lax_suites else list(self.spec.suites)
            records = bytearray()
            for suite in suites:
                auth, integrity, conf = SUITES[suite][0]
                records += bytearray([0xC0, suite, auth, 0x40 | integrity, 0x80 | conf])
            return records[index * 16 : index * 16 + 16]

        def send_cipher_suites(
            self, myaddr: int, mylun: int, clientaddr: int, clientlun: int, clientseq: int, data: Any, sockaddr: Any
        ) -> None:
            index = data[22] & 0x3F if len(data) > 22 else 0
            chunk = self.cipher_records(index)
            ipmihdr = bytearray([clientaddr, clientlun | (7 << 2)])
            ipmihdr.append(ipmisession._checksum(*ipmihdr))
            body = bytearray([myaddr, mylun | clientseq << 2, 0x54, 0x00, 0x01]) + chunk
            body.append(ipmisession._checksum(*body))
            message = ipmihdr + body
            header = bytearray(b"\x06\x00\xff\x07\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00")
            header += struct.pack("<H", len(message))
            ipmisession._io_sendto(self.serversocket, header + message, sockaddr)

        def sessionless_data(self, data: Any, sockaddr: Any) -> None:
            if self.spec.fault == "unreachable":
                return
            raw = bytearray(data)
            if len(raw) >= 22 and raw[0] == 6 and raw[2:4] == b"\xff\x07" and raw[4] == 6 and raw[5] == 16:
                NegotiatingServerSession(
                    self.authdata, self.kg, sockaddr, self.serversocket, raw[16:], self.uuid, bmc=self
                )
                return
            super().sessionless_data(data, sockaddr)

        # -- power
        def _slow(self) -> None:
            if self.spec.fault == "slow" and self.spec.delay:
                time.sleep(self.spec.delay)

        def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
            self._slow()
            if request["netfn"] == 6 and request["command"] == 0x54:  # Get Channel Cipher Suites, in session
                index = request["data"][2] & 0x3F if len(request["data"]) > 2 else 0
                session.send_ipmi_response(data=bytearray([1]) + self.cipher_records(index))
                return
            super().handle_raw_request(request, session)

        def get_power_state(self) -> str:
            return "on" if machine_running(self.machine) else "off"

        def _boot(self) -> None:
            setter = getattr(self.machine, "set_boot_device", None)
            if setter is not None:
                setter(self.bootdev if self.boot_valid else "none", self.boot_persistent, self.boot_uefi)
            self.record(f"boot:{self.bootdev if self.boot_valid else 'none'}")
            if self.boot_valid and not self.boot_persistent:
                self.boot_valid = False  # a one-time override is consumed by the boot

        def power_on(self) -> int:
            if not machine_running(self.machine):
                self._boot()
                self.machine.start()
            self.record("on")
            return 0

        def power_off(self) -> int:
            if machine_running(self.machine):
                self.machine.stop()
            self.record("off")
            return 0

        def power_shutdown(self) -> int:
            if not machine_running(self.machine):
                return CC_NOT_IN_PRESENT_STATE
            shutdown = getattr(self.machine, "shutdown", None)
            (shutdown or self.machine.stop)()
            self.record("soft")
            return 0

        def power_cycle(self) -> int:
            if not machine_running(self.machine):
                return CC_NOT_IN_PRESENT_STATE
            self.machine.stop()
            self._boot()
            self.machine.start()
            self.record("cycle")
            return 0

        def power_reset(self) -> int:
            if not machine_running(self.machine):
                return CC_NOT_IN_PRESENT_STATE
            self._boot()
            self.machine.reset()
            self.record("reset")
            return 0

        def pulse_diag(self) -> int:
            self.record("diag")
            return 0

        def cold_reset(self) -> int:
            return 0

        # -- boot flags (Get/Set System Boot Options, parameter 5)
        def get_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
            if request["data"][0] & 0x7F != 5:
                session.send_ipmi_response(code=0x80)  # parameter not supported
                return
            flags = 0
            if self.boot_valid:
                flags = 0x80 | (0x40 if self.boot_persistent else 0) | (0x20 if self.boot_uefi else 0)
            device = BOOT_DEVICE_CODES.get(self.bootdev, 0) if self.boot_valid else 0
            session.send_ipmi_response(data=[1, 5, flags, device << 2, 0, 0, 0])

        def set_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
            data = request["data"]
            selector = data[0] & 0x7F
            if selector in (0, 3, 4):  # set in progress, valid-bit clearing, boot info ack
                session.send_ipmi_response()
                return
            if selector != 5 or len(data) < 3:
                session.send_ipmi_response(code=0x80)
                return
            device = BOOT_DEVICE_NAMES.get((data[2] >> 2) & 0x0F)
            if device is None:
                session.send_ipmi_response(code=0xCC)
                return
            self.boot_valid = bool(data[1] & 0x80) and device != "none"
            self.boot_persistent = bool(data[1] & 0x40)
            self.boot_uefi = bool(data[1] & 0x20)
            self.bootdev = device if self.boot_valid else "none"
            self.record(f"bootdev:{self.bootdev}")
            session.send_ipmi_response()

    return NegotiatingServerSession, VirtualBmc


def create(spec: VbmcSpec, machine: Machine | None = None, state_dir: Path | None = None) -> Any:
    """Bind one virtual BMC in this process (serve it with ``serve_forever``)."""
    _, virtual_bmc = _server_classes()
    return virtual_bmc(spec, machine=machine, state_dir=state_dir)


def serve_forever() -> None:
    """Serve every virtual BMC of this process (one select loop for all)."""
    import pyghmi.ipmi.private.session as ipmisession

    while True:
        ipmisession.Session.wait_for_rsp(timeout=30)


# --------------------------------------------------------------------------
# Running groups of virtual BMCs in other processes


def _spec_to_json(spec: VbmcSpec) -> dict[str, Any]:
    return {**asdict(spec), "suites": list(spec.suites)}


def machine_spec_to_json(spec: Any) -> dict[str, Any]:
    """A ``provision.lab.vm.MachineSpec`` as JSON data (the ``"machine"`` key of a served BMC spec)."""
    data = asdict(spec)
    data["nics"] = [asdict(nic) for nic in spec.nics]
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def machine_spec_from_json(data: dict[str, Any]) -> Any:
    """The inverse of :func:`machine_spec_to_json`."""
    from provision.lab.vm import Accel, BootFrom, MachineSpec, Nic

    paths = ("workdir", "kernel", "initrd", "disk")
    fields: dict[str, Any] = {k: (Path(v) if k in paths and v is not None else v) for k, v in data.items()}
    fields["nics"] = tuple(Nic(**nic) for nic in data.get("nics", ()))
    fields["boot"] = BootFrom(data.get("boot", BootFrom.NETWORK))
    fields["accel"] = Accel(data["accel"]) if data.get("accel") else None
    return MachineSpec(**fields)


def _serve_stdin(state_dir: Path) -> int:
    """Child side of VbmcFleet: specs (with passwords) arrive on stdin as JSON.

    An item may carry ``"machine"`` (a ``MachineSpec`` as JSON): that BMC then
    drives a QEMU machine (``QemuMachine``) started from this process; SIGTERM
    pulls the plug on every running machine before the process exits.
    """
    machines: list[Any] = []

    def _terminate(*_: object) -> None:
        for machine in machines:
            try:
                machine.stop()
            except Exception:  # exiting anyway; the caller kills leftovers by pid
                log.exception("stopping a machine failed")
        os._exit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        bmcs = []
        for item in json.load(sys.stdin):
            machine_data = item.pop("machine", None)
            spec = VbmcSpec(**{**item, "suites": tuple(item["suites"])})
            machine = None
            if machine_data is not None:
                from provision.lab.vm import Machine as QemuVm

                machine = QemuMachine(QemuVm(machine_spec_from_json(machine_data)))
                machines.append(machine)
            bmcs.append(create(spec, machine=machine, state_dir=state_dir))
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"ready {len(bmcs)}", flush=True)
    serve_forever()
    return 0


def serve_process(items: list[dict[str, Any]], state_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m provision.lab.vbmc --serve-stdin`` in its own session and hand it ``items``.

    ``items`` are specs as JSON data, passwords included: they go through
    stdin, never argv. Read the process's first line with :func:`ready_line`.
    """
    argv = [sys.executable, "-m", "provision.lab.vbmc", "--serve-stdin", "--state-dir", str(state_dir)]
    env = {"PYTHONPATH": str(IMPORT_ROOT)}
    proc = spawn(argv, log_path=log_path, env=env, pipe=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(items).encode())
    proc.stdin.close()
    return proc


def ready_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """The first line a served process prints (``ready N`` or ``error: ...``); "" if none by ``deadline``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return proc.stdout.readline().decode(errors="replace").strip() if ready else ""


class VbmcFleet:
    """Virtual BMCs in separate processes; a context manager.

    ``per_process`` BMCs share a process (and its select loop); a BMC with
    the ``slow`` fault gets a process of its own so that its delay holds up
    no other BMC. Each process is started by :func:`serve_process` and logs
    to ``state_dir/vbmc.log``.
    """

    def __init__(self, specs: Iterable[VbmcSpec], state_dir: Path, *, per_process: int = 100) -> None:
        self.specs = list(specs)
        self.state_dir = Path(state_dir)
        self.per_process = per_process
        self.processes: list[subprocess.Popen[bytes]] = []

    def groups(self) -> list[list[VbmcSpec]]:
        slow = [[s] for s in self.specs if s.fault == "slow"]
        rest = [s for s in self.specs if s.fault != "slow"]
        return [rest[i : i + self.per_process] for i in range(0, len(rest), self.per_process)] + slow

    def start(self, timeout: float = 60.0) -> VbmcFleet:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        groups = self.groups()
        for group in groups:
            items = [_spec_to_json(s) for s in group]
            self.processes.append(serve_process(items, self.state_dir, self.state_dir / "vbmc.log"))
        deadline = time.monotonic() + timeout
        for group, proc in zip(groups, self.processes, strict=True):
            line = ready_line(proc, deadline)
            if not line.startswith("ready"):
                self.stop()
                why = line or f"not ready after {timeout} s"
                raise RuntimeError(f"virtual BMCs {group[0].name}..: {why} (see {self.state_dir / 'vbmc.log'})")
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout:
                proc.stdout.close()
        self.processes = []

    def state(self, name: str) -> dict[str, Any]:
        return read_state(self.state_dir, name)

    def __enter__(self) -> VbmcFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(count: int, address: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_DGRAM) -> list[int]:
    """``count`` ports (UDP by default, or ``socket.SOCK_STREAM``) free on ``address`` right now (the kernel picks)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind((address, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_udp_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    return free_ports(count, address)


def make_specs(
    count: int, *, base_port: int, user: str, password: str, prefix: str = "node", power: str = "off"
) -> list[VbmcSpec]:
    width = max(2, len(str(count)))
    return [
        VbmcSpec(name=f"{prefix}{i + 1:0{width}d}", port=base_port + i, user=user, password=password, power=power)
        for i in range(count)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m provision.lab.vbmc``: N virtual BMCs until SIGTERM or Ctrl-C.

    The password comes from the environment variable PROVISION_VBMC_PASSWORD
    (never from argv).
    """
    parser = argparse.ArgumentParser(prog="python -m provision.lab.vbmc", description=main.__doc__)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=16230)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--prefix", default="node")
    parser.add_argument("--power", choices=("on", "off"), default="off")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--serve-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stdin:
        return _serve_stdin(args.state_dir)
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        print(f"error: set {PASSWORD_ENV} to the virtual BMCs' password", file=sys.stderr)
        return 1
    specs = make_specs(
        args.count, base_port=args.base_port, user=args.user, password=password, prefix=args.prefix, power=args.power
    )
    fleet = VbmcFleet(specs, args.state_dir, per_process=args.per_process).start()
    print(
        f"{len(specs)} virtual BMCs on 127.0.0.1:{specs[0].port}-{specs[-1].port}, state in {args.state_dir}",
        flush=True,
    )
    try:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.poll() is None for p in fleet.processes):
            time.sleep(1)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        fleet.stop()


__all__ = [
    "DEFAULT_SUITES",
    "Machine",
    "QemuMachine",
    "SimulatedMachine",
    "VbmcFleet",
    "VbmcSpec",
    "create",
    "free_udp_ports",
    "machine_spec_from_json",
    "machine_spec_to_json",
    "make_specs",
    "read_state",
    "serve_forever",
]

if __name__ == "__main__":
    sys.exit(main())

"""BMC control: power and boot device, one node at a time.

``BmcClient`` is the interface; ``IpmiClient`` implements it on pyghmi's
``Command`` over IPMI v2.0 LAN (RMCP+, "lanplus") and a later issue adds a
Redfish client behind the same interface. ``connect(node.bmc)`` picks the
implementation from the inventory's ``provision_bmc_protocol``. Fanning an
operation out over a rack is provision.fanout's job; this module does one BMC.

Cipher suites. The client proposes suite 17 (RAKP-HMAC-SHA256,
HMAC-SHA256-128, AES-CBC-128) and accepts suite 3 (the SHA-1 equivalents);
never a suite without integrity and confidentiality (0, 1, 2...). Stock
pyghmi proposes 17, falls back to 3 when the BMC *rejects* 17, but takes for
granted that a BMC which *accepts* the Open Session Request chose what was
proposed. Some BMCs (pyghmi's own server among them) answer a 17 proposal
with suite 3's algorithms; pyghmi then hashes RAKP2 with SHA-256 and fails
(``struct.error``). ``NegotiatingSession`` reads the algorithms the BMC
chose from the Open Session Response, as the spec intends: suite 3 or 17
proceed with that suite's hashes, anything else is refused. No pyghmi code
is patched: the fix is a subclass used only by this client.

Operations use the standard chassis commands (Get Chassis Status, Chassis
Control, Get/Set System Boot Options), as FreeIPMI's ipmipower does, without
pyghmi's OEM probe (one Get Device ID round trip per session).

Three more pyghmi 1.6.19 defects are worked around here, none on the wire:

* its I/O thread reads with ``setblocking(0); recvfrom()`` while senders call
  ``setblocking(1)`` on the same socket: a read can then block and stall
  every session of the process ("Session no longer connected" with many
  threads; virtual BMC processes that stop answering). ``install_recv_fix``
  reads with MSG_DONTWAIT instead;
* a session being set up is registered under str credentials and removed
  under bytes, so a second connection to the same BMC in one process got the
  first, logged-out session back; the entry is dropped after login;
* pyghmi's I/O thread and session tables are module state: a forked fan-out
  worker resets them (``os.register_at_fork``).

Timing: a BMC that does not answer fails login after pyghmi's own retry
schedule (about 5 s); the fan-out's per-node --timeout bounds everything else.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

from provision.errors import BmcError
from provision.fanout import FanoutOptions, Outcome, default_processes, fan_out
from provision.inventory import Bmc, BmcProtocol, Node

log = logging.getLogger(__name__)

AUTH_HINT = (
    "check provision_bmc_user and provision_bmc_password (vault) or the variable named by "
    "provision_bmc_password_env for this node"
)


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"


class PowerAction(StrEnum):
    STATUS = "status"
    ON = "on"
    OFF = "off"  # hard: cut power now
    SOFT = "soft"  # ACPI shutdown request to the OS
    CYCLE = "cycle"
    RESET = "reset"

    @property
    def destructive(self) -> bool:
        return self in (PowerAction.OFF, PowerAction.SOFT, PowerAction.CYCLE, PowerAction.RESET)


class BootDevice(StrEnum):
    PXE = "pxe"
    DISK = "disk"
    BIOS = "bios"
    CDROM = "cdrom"
    NONE = "none"  # no override: the firmware's own boot order


# Boot device selector, boot flags parameter 5 data 2 bits 5:2 (IPMI 2.0 table 28-14).
_BOOT_CODES = {BootDevice.NONE: 0, BootDevice.PXE: 1, BootDevice.DISK: 2, BootDevice.CDROM: 5, BootDevice.BIOS: 6}
_BOOT_NAMES = {v: k for k, v in _BOOT_CODES.items()}
# Chassis Control directives (table 28-4).
_CHASSIS_CONTROL = {
    PowerAction.OFF: 0,
    PowerAction.ON: 1,
    PowerAction.CYCLE: 2,
    PowerAction.RESET: 3,
    PowerAction.SOFT: 5,
}
CC_NOT_IN_PRESENT_STATE = 0xD5


@dataclass(frozen=True)
class BootSetting:
    device: BootDevice
    persistent: bool = False
    uefi: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "persistent": self.persistent, "uefi": self.uefi}


class BmcAuthError(BmcError):
    """The BMC refused the credentials."""


class BmcUnreachableError(BmcError):
    """The BMC did not answer."""


class BmcClient(ABC):
    """One BMC: power and boot device. Use as a context manager."""

    address: str

    @abstractmethod
    def power_status(self) -> PowerState: ...

    @abstractmethod
    def power(self, action: PowerAction) -> PowerState:
        """Carry out ``action``; return the state the node is in or heads to."""

    @abstractmethod
    def set_boot_device(self, device: BootDevice, *, persistent: bool = False, uefi: bool = False) -> BootSetting: ...

    @abstractmethod
    def boot_device(self) -> BootSetting: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> BmcClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(bmc: Bmc, *, timeout: float = 10.0) -> BmcClient:
    """A logged-in client for ``bmc``, by its protocol (raises BmcError)."""
    if bmc.protocol == BmcProtocol.IPMI:
        return IpmiClient(bmc.address, bmc.user, bmc.password.reveal(), port=bmc.port, timeout=timeout)
    raise BmcError(
        f"BMC protocol {bmc.protocol} is not implemented yet",
        hint="set provision_bmc_protocol: ipmi for this node (Redfish support is planned)",
    )


# --------------------------------------------------------------------------
# IPMI on pyghmi


def _pyghmi() -> tuple[Any, Any, Any]:
    import pyghmi.exceptions as pyghmi_exc
    import pyghmi.ipmi.command as pyghmi_command
    import pyghmi.ipmi.private.session as pyghmi_session

    install_recv_fix(pyghmi_session)
    return pyghmi_exc, pyghmi_command, pyghmi_session


def install_recv_fix(pyghmi_session: Any) -> None:
    """Make pyghmi's socket reads non-blocking per call, not per socket.

    pyghmi's I/O thread reads with ``sock.setblocking(0); sock.recvfrom()``
    while the thread that sends calls ``sock.setblocking(1); sock.sendto()``
    on the same socket. When the two interleave, the I/O thread's recvfrom
    blocks on an empty socket and every session of the process stalls until
    a packet happens to arrive: the "Session no longer connected" failures
    seen with many concurrent sessions (client) and the virtual BMC
    processes that stopped answering under load (server). Reading with
    MSG_DONTWAIT gives the non-blocking read pyghmi intends whatever the
    socket's mode. Nothing on the wire changes.
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


def _reset_pyghmi_after_fork() -> None:
    """Give a forked child a fresh pyghmi: no inherited I/O thread or sessions.

    pyghmi keeps its I/O thread, sockets, session tables and locks at module
    level. A child forked from a process that already used pyghmi would wait
    forever on an I/O thread that does not exist in it; the fan-out's worker
    processes start from a clean slate instead.
    """
    mod: Any = sys.modules.get("pyghmi.ipmi.private.session")
    if mod is None or mod.iothread is None:
        return
    for sock in mod.iosockets:
        with contextlib.suppress(OSError):
            sock.close()
    mod.iothread = None
    mod.iothreadready = False
    mod.iothreadwaiters = []
    mod.ioqueue = collections.deque()
    mod.sessionqueue = collections.deque()
    mod.iosockets = []
    mod.selectdeadline = 0
    mod.myself = None
    mod.KEEPALIVE_SESSIONS = threading.RLock()
    mod.WAITING_SESSIONS = threading.RLock()
    session = mod.Session
    session.bmc_handlers = {}
    session.waiting_sessions = {}
    session.initting_sessions = {}
    session.keepalive_sessions = {}
    session.peeraddr_to_nodes = {}
    session.iterwaiters = []
    session.socketpool = {}
    session.socketchecking = None


# pyghmi shares one session among all users of the same BMC and credentials
# in a process, so one user's logout breaks the others': clients of the same
# BMC take turns within a process.
_BMC_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_BMC_LOCKS_GUARD = threading.Lock()


def _bmc_lock(address: str, port: int) -> threading.Lock:
    with _BMC_LOCKS_GUARD:
        return _BMC_LOCKS.setdefault((address, port), threading.Lock())


def _after_fork_in_child() -> None:
    global _BMC_LOCKS_GUARD
    _BMC_LOCKS.clear()
    _BMC_LOCKS_GUARD = threading.Lock()
    _reset_pyghmi_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

_NEGOTIATING_SESSION: type[Any] | None = None

# Algorithms (authentication, integrity, confidentiality) per accepted suite.
ACCEPTED_SUITES = {17: ((3, 4, 1), hashlib.sha256, 16), 3: ((1, 1, 1), hashlib.sha1, 12)}


def negotiating_session_class() -> type[Any]:
    """pyghmi's Session, reading the suite the BMC chose (see module doc)."""
    global _NEGOTIATING_SESSION
    if _NEGOTIATING_SESSION is not None:
        return _NEGOTIATING_SESSION
    _, _, pyghmi_session = _pyghmi()

    base: Any = pyghmi_session.Session

    class NegotiatingSession(base):  # type: ignore[misc]
        cipher_suite: int | None = None
        sessioncontext: str | None

        def _got_rmcp_response(self, data: bytearray) -> Any:
            if self.sessioncontext == "OPENSESSION" and len(data) >= 36 and data[0] == self.rmcptag and data[1] == 0:
                chosen = (data[16], data[24], data[32])
                for suite, (algorithms, hashlib_fn, hashlen) in ACCEPTED_SUITES.items():
                    if chosen == algorithms:
                        self.cipher_suite = suite
                        self.attemptedhash = 256 if suite == 17 else 1
                        self.currhashlib = hashlib_fn
                        self.currhashlen = hashlen
                        break
                else:
                    self.sessioncontext = "FAILED"
                    self.onlogon(
                        {
                            "error": "BMC chose cipher algorithms auth={} integrity={} confidentiality={}, "
                            "not cipher suite 3 or 17".format(*chosen)
                        }
                    )
                    return -9
            return super()._got_rmcp_response(data)

    _NEGOTIATING_SESSION = NegotiatingSession
    return NegotiatingSession


class IpmiClient(BmcClient):
    """IPMI v2.0 over LAN with pyghmi: one RMCP+ session, closed by close()."""

    def __init__(self, address: str, user: str, password: str, *, port: int = 623, timeout: float = 10.0) -> None:
        self.address = address
        self.port = port
        self.timeout = timeout
        self._cmd: Any = None
        self._lock = _bmc_lock(address, port)
        self._lock.acquire()
        try:
            self._login(address, user, password, port)
        except BaseException:
            self._lock.release()
            raise

    def _login(self, address: str, user: str, password: str, port: int) -> None:
        pyghmi_exc, pyghmi_command, _ = _pyghmi()
        session_class = negotiating_session_class()
        where = f"BMC {address}:{port}"
        started = time.monotonic()
        try:
            cmd = pyghmi_command.Command.__new__(pyghmi_command.Command)
            # What Command.__init__ sets for a synchronous LAN session, with
            # our session class in place of pyghmi's.
            cmd.onlogon = None
            cmd.bmc = address
            cmd._sdrcachedir = None
            cmd._sdr = None
            cmd._oem = None
            cmd._oemknown = False
            cmd._netchannel = None
            cmd._ipv6support = None
            cmd.certverify = None
            cmd.kwargs = {}
            cmd.ipmi_session = session_class(bmc=address, userid=user, password=password, port=port, keepalive=False)
        except pyghmi_exc.IpmiException as exc:
            raise _translate(exc, where, time.monotonic() - started) from None
        except OSError as exc:
            raise BmcUnreachableError(f"{where}: {exc.strerror or exc}", hint="check provision_bmc_address") from None
        finally:
            # pyghmi registers a session being set up under its str
            # credentials but removes it under their encoded form, so the
            # entry outlives the login and the next connection to this BMC in
            # this process would get the stale (logged-out) session back.
            session_class.initting_sessions.pop((address, user, password, port, None), None)
        self._cmd = cmd
        self._where = where
        log.debug("%s: logged in (cipher suite %s)", where, getattr(cmd.ipmi_session, "cipher_suite", "?"))

    @property
    def cipher_suite(self) -> int | None:
        return getattr(self._cmd.ipmi_session, "cipher_suite", None) if self._cmd else None

    def _raw(self, netfn: int, command: int, data: tuple[int, ...] | list[int] = ()) -> dict[str, Any]:
        pyghmi_exc, _, _ = _pyghmi()
        started = time.monotonic()
        try:
            response: dict[str, Any] = self._cmd.raw_command(netfn=netfn, command=command, data=data)
        except pyghmi_exc.IpmiException as exc:
            raise _translate(exc, self._where, time.monotonic() - started) from None
        return response

    def _check(self, response: dict[str, Any], what: str) -> dict[str, Any]:
        if "error" in response:
            code = response.get("code", 0)
            if code == 0xFFFF or response["error"] == "timeout":
                raise BmcUnreachableError(f"{self._where}: no answer to {what}", hint="check the BMC's network")
            raise BmcError(f"{self._where}: {what} refused: {response['error']} (0x{code:02x})")
        return response

    def power_status(self) -> PowerState:
        response = self._check(self._raw(0x00, 0x01), "Get Chassis Status")
        return PowerState.ON if response["data"][0] & 1 else PowerState.OFF

    def power(self, action: PowerAction) -> PowerState:
        if action == PowerAction.STATUS:
            return self.power_status()
        response = self._raw(0x00, 0x02, [_CHASSIS_CONTROL[action]])
        code = response.get("code", 0)
        if code == CC_NOT_IN_PRESENT_STATE and action in (PowerAction.CYCLE, PowerAction.RESET):
            # The node is off: cycle/reset mean "boot it" (ipmipower --on-if-off).
            log.info("%s: %s while off: powering on", self._where, action)
            self._check(self._raw(0x00, 0x02, [_CHASSIS_CONTROL[PowerAction.ON]]), "Chassis Control (on)")
            return PowerState.ON
        if code == CC_NOT_IN_PRESENT_STATE and action == PowerAction.SOFT:
            return PowerState.OFF  # already off
        self._check(response, f"Chassis Control ({action})")
        return PowerState.OFF if action in (PowerAction.OFF, PowerAction.SOFT) else PowerState.ON

    def set_boot_device(self, device: BootDevice, *, persistent: bool = False, uefi: bool = False) -> BootSetting:
        # Parameter 3 (boot flag valid bit clearing): keep the flag valid
        # until the next boot, not only 60 s (bit 3: no clear on timeout).
        self._check(self._raw(0x00, 0x08, (3, 0x08)), "Set System Boot Options (valid bit clearing)")
        flags = 0
        if device != BootDevice.NONE:
            flags = 0x80 | (0x40 if persistent else 0) | (0x20 if uefi else 0)
        data = (5, flags, _BOOT_CODES[device] << 2, 0, 0, 0)
        self._check(self._raw(0x00, 0x08, data), "Set System Boot Options (boot flags)")
        return BootSetting(device, persistent=persistent and device != BootDevice.NONE, uefi=uefi)

    def boot_device(self) -> BootSetting:
        response = self._check(self._raw(0x00, 0x09, (5, 0, 0)), "Get System Boot Options")
        data = response["data"]
        if len(data) < 4 or data[1] & 0x80 or not data[2] & 0x80:
            return BootSetting(BootDevice.NONE)
        code = (data[3] >> 2) & 0x0F
        device = _BOOT_NAMES.get(code)
        if device is None:
            raise BmcError(f"{self._where}: unknown boot device selector {code}")
        return BootSetting(device, persistent=bool(data[2] & 0x40), uefi=bool(data[2] & 0x20))

    def close(self) -> None:
        if self._cmd is None:
            return
        pyghmi_exc, _, _ = _pyghmi()
        try:
            with contextlib.suppress(pyghmi_exc.IpmiException, OSError, KeyError):
                self._cmd.ipmi_session.logout()
        finally:
            self._cmd = None
            self._lock.release()


def _translate(exc: Exception, where: str, seconds: float) -> BmcError:
    """pyghmi's exception text, as a typed error (it never holds the password)."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "password" in lowered or "unauthorized name" in lowered or ("rakp" in lowered and "integrity" in lowered):
        return BmcAuthError(f"{where}: authentication failed ({text})", hint=AUTH_HINT)
    if "cipher" in lowered:
        return BmcError(f"{where}: {text}", hint="enable cipher suite 17 or 3 on the BMC (never 0)")
    if "timeout" in lowered or "no longer connected" in lowered or text in ("None", "IpmiException"):
        return BmcUnreachableError(
            f"{where}: no answer after {seconds:.1f} s",
            hint="check provision_bmc_address/provision_bmc_port and that the BMC is on the network",
        )
    return BmcError(f"{where}: {text}")


# --------------------------------------------------------------------------
# One operation over many nodes (the CLI's and the boot command's entry)


def _require_bmc(node: Node) -> Bmc:
    if node.bmc is None:
        raise BmcError(
            f"{node.name}: no BMC in the inventory",
            hint="set provision_bmc_address and provision_bmc_user for this node",
        )
    return node.bmc


def node_power(node: Node, action: PowerAction, *, timeout: float = 10.0) -> dict[str, Any]:
    """Carry out a power action on one node; a JSON-safe result."""
    with connect(_require_bmc(node), timeout=timeout) as client:
        if action == PowerAction.STATUS:
            return {"power": str(client.power_status())}
        return {"power": str(client.power(action)), "action": str(action)}


def node_bootdev(
    node: Node, device: BootDevice, *, persistent: bool = False, uefi: bool = False, timeout: float = 10.0
) -> dict[str, Any]:
    """Set the next boot device of one node, then read it back."""
    with connect(_require_bmc(node), timeout=timeout) as client:
        client.set_boot_device(device, persistent=persistent, uefi=uefi)
        return client.boot_device().as_dict()


def node_bootdev_get(node: Node, *, timeout: float = 10.0) -> dict[str, Any]:
    with connect(_require_bmc(node), timeout=timeout) as client:
        return client.boot_device().as_dict()


def fanout_options(count: int, **kwargs: Any) -> FanoutOptions:
    """Fan-out settings for BMC work: retry unreachable BMCs, processes by size."""
    kwargs.setdefault("processes", default_processes(count))
    kwargs.setdefault("retry_on", (BmcUnreachableError,))
    return FanoutOptions(**kwargs)


def power_nodes(
    nodes: Sequence[Node], action: PowerAction, options: FanoutOptions | None = None, **hooks: Any
) -> list[Outcome]:
    opts = options or fanout_options(len(nodes))
    per_call = opts.timeout or 10.0
    return fan_out(
        nodes, lambda n: node_power(n, action, timeout=per_call), name=lambda n: n.name, options=opts, **hooks
    )


def bootdev_nodes(
    nodes: Sequence[Node],
    device: BootDevice,
    *,
    persistent: bool = False,
    uefi: bool = False,
    options: FanoutOptions | None = None,
    **hooks: Any,
) -> list[Outcome]:
    opts = options or fanout_options(len(nodes))
    per_call = opts.timeout or 10.0
    return fan_out(
        nodes,
        lambda n: node_bootdev(n, device, persistent=persistent, uefi=uefi, timeout=per_call),
        name=lambda n: n.name,
        options=opts,
        **hooks,
    )

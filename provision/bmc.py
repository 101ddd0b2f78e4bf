"""BMC control over many nodes: power and boot device.

Over many nodes (``power_nodes``, ``bootdev_nodes``, ``bootdev_get_nodes``)
there is no per-node client: every session of a batch runs in one thread on
one socket (provision.ipmi.runner), a few packets and a few HMACs per node,
so a rack's worth of BMCs is answered in about the time the slowest one
takes. provision.fanout still cuts the work into batches (``--batch``,
``--batch-wait``) and, if asked, worker processes. The inventory's
``provision_bmc_protocol`` picks the protocol per node, so a rack may mix
them: IPMI v2.0 LAN (RMCP+, "lanplus") nodes of a batch run in that event
loop, Redfish nodes (provision.redfish, over sushy) in a thread pool beside
it, each with at most ``--fanout`` in flight and the same timeout, retries
and per-node ``Outcome``.

The operations are the standard chassis commands (Get Chassis Status,
Chassis Control, Get/Set System Boot Options), as FreeIPMI's ipmipower uses,
written once as generators of IPMI requests (``power_operation``...).
Cipher suite 17 is proposed, suite 3 accepted (when the BMC refuses suite
17's algorithms with any such status, or answers a suite 17 proposal with
suite 3's algorithms, as pyghmi's server does); nothing else, never suite 0.
Sessions ask for operator privilege, enough for every operation here.
``bootdev_nodes`` reads the boot device back and fails a node whose BMC
reports another setting than the one it acknowledged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from provision.errors import BmcError
from provision.fanout import FanoutOptions, Outcome, fan_out_batches, run_limits
from provision.inventory import Bmc, BmcProtocol, Node
from provision.ipmi.errors import AUTH_HINT, BmcAuthError, BmcUnreachableError, OperationError
from provision.ipmi.runner import Task, run_tasks
from provision.ipmi.session import Operation, Request
from provision.ipmi.wire import IpmiResponse, completion_code

if TYPE_CHECKING:
    from provision.redfish import RedfishClient

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_HINT",
    "BmcAuthError",
    "BmcUnreachableError",
    "BootDevice",
    "BootSetting",
    "PowerAction",
    "PowerState",
    "bootdev_get_nodes",
    "bootdev_nodes",
    "fanout_options",
    "power_nodes",
]


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


# --------------------------------------------------------------------------
# The operations, as IPMI requests

NETFN_CHASSIS = 0x00
CMD_GET_CHASSIS_STATUS = 0x01
CMD_CHASSIS_CONTROL = 0x02
CMD_SET_SYSTEM_BOOT_OPTIONS = 0x08
CMD_GET_SYSTEM_BOOT_OPTIONS = 0x09


def _check(response: IpmiResponse, what: str) -> IpmiResponse:
    if response.code:
        raise OperationError(f"{what} refused: {completion_code(response.code)} (0x{response.code:02x})")
    return response


def power_status_operation() -> Generator[Request, IpmiResponse, PowerState]:
    what = "Get Chassis Status"
    response = _check((yield Request(NETFN_CHASSIS, CMD_GET_CHASSIS_STATUS, b"", what)), what)
    if not response.data:
        raise OperationError(f"{what}: empty answer")
    return PowerState.ON if response.data[0] & 1 else PowerState.OFF


def power_operation(action: PowerAction) -> Generator[Request, IpmiResponse, PowerState]:
    """Carry out ``action``; the state the node is in or heads to."""
    if action == PowerAction.STATUS:
        return (yield from power_status_operation())
    what = f"Chassis Control ({action})"
    response = yield Request(NETFN_CHASSIS, CMD_CHASSIS_CONTROL, bytes([_CHASSIS_CONTROL[action]]), what)
    if response.code == CC_NOT_IN_PRESENT_STATE and action in (PowerAction.CYCLE, PowerAction.RESET):
        # The node is off: cycle/reset mean "boot it" (ipmipower --on-if-off).
        log.info("%s while off: powering on", action)
        what = "Chassis Control (on)"
        _check(
            (yield Request(NETFN_CHASSIS, CMD_CHASSIS_CONTROL, bytes([_CHASSIS_CONTROL[PowerAction.ON]]), what)), what
        )
        return PowerState.ON
    if response.code == CC_NOT_IN_PRESENT_STATE and action == PowerAction.SOFT:
        return PowerState.OFF  # already off
    _check(response, what)
    return PowerState.OFF if action in (PowerAction.OFF, PowerAction.SOFT) else PowerState.ON


def set_boot_operation(
    device: BootDevice, *, persistent: bool = False, uefi: bool = False
) -> Generator[Request, IpmiResponse, BootSetting]:
    # Parameter 3 (boot flag valid bit clearing): keep the flag valid
    # until the next boot, not only 60 s (bit 3: no clear on timeout).
    what = "Set System Boot Options (valid bit clearing)"
    _check((yield Request(NETFN_CHASSIS, CMD_SET_SYSTEM_BOOT_OPTIONS, bytes([3, 0x08]), what)), what)
    flags = 0
    if device != BootDevice.NONE:
        flags = 0x80 | (0x40 if persistent else 0) | (0x20 if uefi else 0)
    data = bytes([5, flags, _BOOT_CODES[device] << 2, 0, 0, 0])
    what = "Set System Boot Options (boot flags)"
    _check((yield Request(NETFN_CHASSIS, CMD_SET_SYSTEM_BOOT_OPTIONS, data, what)), what)
    return BootSetting(device, persistent=persistent and device != BootDevice.NONE, uefi=uefi)


def boot_device_operation() -> Generator[Request, IpmiResponse, BootSetting]:
    what = "Get System Boot Options"
    data = _check((yield Request(NETFN_CHASSIS, CMD_GET_SYSTEM_BOOT_OPTIONS, bytes([5, 0, 0]), what)), what).data
    # Flags byte all zero with a device selector: a BMC that implements no
    # flags (OpenIPMI's ipmi_sim) and boots the selector; read it as once, legacy.
    no_flags = len(data) >= 4 and data[2] == 0 and (data[3] >> 2) & 0x0F
    if len(data) < 4 or data[1] & 0x80 or not (data[2] & 0x80 or no_flags):
        return BootSetting(BootDevice.NONE)
    code = (data[3] >> 2) & 0x0F
    device = _BOOT_NAMES.get(code)
    if device is None:
        raise OperationError(f"unknown boot device selector {code}")
    return BootSetting(device, persistent=bool(data[2] & 0x40), uefi=bool(data[2] & 0x20))


# --------------------------------------------------------------------------
# One operation over many nodes (the CLI's and the boot command's entry)


def _require_bmc(node: Node) -> Bmc:
    if node.bmc is None:
        raise BmcError(
            f"{node.name}: no BMC in the inventory",
            hint="set provision_bmc_address and provision_bmc_user for this node",
        )
    return node.bmc


def _power_result(action: PowerAction, state: PowerState) -> dict[str, Any]:
    if action == PowerAction.STATUS:
        return {"power": str(state)}
    return {"power": str(state), "action": str(action)}


def fanout_options(count: int, **kwargs: Any) -> FanoutOptions:
    """Fan-out settings for BMC work: retry unreachable BMCs; one process (see ``power_nodes``)."""
    kwargs.setdefault("processes", 1)
    kwargs.setdefault("retry_on", (BmcUnreachableError,))
    return FanoutOptions(**kwargs)


def _fan_out(
    nodes: Sequence[Node],
    operation: Callable[[], Operation],
    redfish_job: Callable[[RedfishClient], Any],
    *,
    privileged: bool,
    options: FanoutOptions | None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_batch_wait: Callable[[int, float], None] | None = None,
) -> list[Outcome]:
    """Every node's BMC: IPMI ``operation`` in one event loop per batch, ``redfish_job`` in threads beside it."""
    opts = options or fanout_options(len(nodes))

    def task(node: Node) -> Task:
        try:
            bmc = _require_bmc(node)
        except BmcError as exc:
            return Task(node.name, "", 0, "", str, operation, error=exc)
        return Task(node.name, bmc.address, bmc.port, bmc.user, bmc.password.reveal, operation, privileged=privileged)

    def run_batch(
        indexes: list[int], fanout: int, report: Callable[[Outcome], None] | None
    ) -> list[tuple[int, Outcome]]:
        redfish = [i for i in indexes if (b := nodes[i].bmc) is not None and b.protocol == BmcProtocol.REDFISH]
        ipmi = [i for i in indexes if i not in set(redfish)]
        lock = threading.Lock()

        def locked(outcome: Outcome) -> None:
            if report is not None:
                with lock:
                    report(outcome)

        got: list[tuple[int, Outcome]] = []
        thread = None
        if redfish:
            from provision.redfish import run_clients

            def redfish_batch() -> None:
                items = [(nodes[i].name, nodes[i].bmc) for i in redfish]
                clients = [(name, bmc) for name, bmc in items if bmc is not None]
                outcomes = run_clients(clients, redfish_job, **run_limits(opts, fanout), on_outcome=locked)
                got.extend(zip(redfish, outcomes, strict=True))

            thread = threading.Thread(target=redfish_batch, name="redfish-batch")
            thread.start()
        if ipmi:
            outcomes = run_tasks([task(nodes[i]) for i in ipmi], **run_limits(opts, fanout), on_outcome=locked)
            got.extend(zip(ipmi, outcomes, strict=True))
        if thread is not None:
            thread.join()
        return got

    return fan_out_batches(
        len(nodes),
        run_batch,
        name_of=lambda i: nodes[i].name,
        options=opts,
        on_outcome=on_outcome,
        on_batch_wait=on_batch_wait,
    )


def _mapped(operation: Generator[Request, IpmiResponse, Any], result: Callable[[Any], Any]) -> Operation:
    value = yield from operation
    return result(value)


def power_nodes(
    nodes: Sequence[Node], action: PowerAction, options: FanoutOptions | None = None, **hooks: Any
) -> list[Outcome]:
    """``action`` on every node: one Outcome per node (value ``{"power": ..., "action": ...}``), in order."""

    def redfish_job(client: RedfishClient) -> dict[str, Any]:
        from provision import redfish

        return _power_result(action, PowerState(redfish.power(client, str(action))))

    return _fan_out(
        nodes,
        lambda: _mapped(power_operation(action), lambda state: _power_result(action, state)),
        redfish_job,
        privileged=action != PowerAction.STATUS,  # Get Chassis Status is a user-level command
        options=options,
        **hooks,
    )


def bootdev_nodes(
    nodes: Sequence[Node],
    device: BootDevice,
    *,
    persistent: bool = False,
    uefi: bool = False,
    persistent_will_do: bool = False,
    options: FanoutOptions | None = None,
    **hooks: Any,
) -> list[Outcome]:
    """Set the next boot device of every node and read it back (value: ``BootSetting.as_dict()``).

    ``persistent_will_do``: a BMC that keeps a one-time setting as persistent (some Redfish BMCs, sushy-emulator)
    is fine — what ``node boot`` needs of a stateless node, which network-boots every time anyway.
    """

    def operation() -> Operation:
        wanted = yield from set_boot_operation(device, persistent=persistent, uefi=uefi)
        setting = yield from boot_device_operation()
        problem = _not_kept(wanted, setting, device, persistent_will_do)
        if problem:
            raise OperationError(problem, hint=KEPT_HINT)
        return setting.as_dict()

    def redfish_job(client: RedfishClient) -> dict[str, Any]:
        from provision import redfish

        wanted = _setting(redfish.set_boot(client, str(device), persistent=persistent, uefi=uefi))
        setting = _setting(redfish.read_boot(client))
        problem = _not_kept(wanted, setting, device, persistent_will_do)
        if problem:
            raise BmcError(f"{client.where}: {problem}", hint=KEPT_HINT)
        return setting.as_dict()

    return _fan_out(nodes, operation, redfish_job, privileged=True, options=options, **hooks)


KEPT_HINT = "the BMC does not keep this boot setting: check its firmware's boot options (or its web UI)"


def _not_kept(wanted: BootSetting, setting: BootSetting, device: BootDevice, persistent_will_do: bool) -> str:
    """Why the setting read back is not the one acknowledged ("" when it is, or close enough)."""
    if setting == wanted or device == BootDevice.NONE == setting.device:
        return ""
    if persistent_will_do and setting == BootSetting(wanted.device, persistent=True, uefi=wanted.uefi):
        return ""
    return f"boot device reads back as {_describe(setting)} after setting {_describe(wanted)}"


def _setting(override: Any) -> BootSetting:
    """A provision.redfish.BootOverride as a BootSetting."""
    return BootSetting(BootDevice(override.device), persistent=override.persistent, uefi=override.uefi)


def _describe(setting: BootSetting) -> str:
    if setting.device == BootDevice.NONE:
        return "none"
    return (
        f"{setting.device} ({'persistent' if setting.persistent else 'once'}, {'UEFI' if setting.uefi else 'legacy'})"
    )


def bootdev_get_nodes(nodes: Sequence[Node], options: FanoutOptions | None = None, **hooks: Any) -> list[Outcome]:
    """Read every node's boot device setting (value: ``BootSetting.as_dict()``)."""

    def redfish_job(client: RedfishClient) -> dict[str, Any]:
        from provision import redfish

        return _setting(redfish.read_boot(client)).as_dict()

    return _fan_out(
        nodes,
        lambda: _mapped(boot_device_operation(), BootSetting.as_dict),
        redfish_job,
        privileged=True,
        options=options,
        **hooks,
    )

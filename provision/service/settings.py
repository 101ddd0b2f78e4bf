"""The join service's settings: typed and frozen, read once from the site."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from provision.errors import InventoryError
from provision.inventory import Site

DEFAULT_PORT = 8740
NONCE_TTL = 60.0  # seconds a challenge stays valid (protocol)
NONCES_PER_NODE = 4  # outstanding challenges per node; the oldest goes first
# The report's challenge, sent with the bundle: it outlives the node's service
# restarts (the agent waits up to 120 s per unit), then it needs a new challenge.
REPORT_NONCE_TTL = 600.0
REPORT_NONCE_HEADER = "X-Provision-Report-Nonce"
EVENTS_KEPT = 1000  # the bounded event list (memory and the status file)


class JoinMode(StrEnum):
    """How booted nodes join (``provision_join_mode``)."""

    AGENT = "agent"  # each node's agent fetches its bundle from the join service at every boot
    PUSH = "push"  # `provision node join` pushes playbooks/join.yml over SSH (no service)


class JoinTrust(StrEnum):
    """What a node's identity for a boot rests on (``provision_join_trust``)."""

    CONSOLE = "console"  # the host key the node printed on its console this boot (default)
    # Opt-in, weaker, for sites without console logs: a single-use boot token in the node's
    # iPXE script (served only to the address dnsmasq leases it), rotated at every use.
    TOKEN = "token"


@dataclass(frozen=True)
class JoinSettings:
    address: str  # provision_join_address (default: provision_boot_address, else the network's first host)
    port: int  # provision_join_port (8740)
    state_dir: Path  # <provision_state_dir>/service
    console_poll: float = 0.5  # provision_join_console_poll: seconds between console reads
    mode: JoinMode = JoinMode.AGENT  # provision_join_mode
    managed: bool = True  # provision_join_service_managed: provision starts it with the boot server
    trust: JoinTrust = JoinTrust.CONSOLE  # provision_join_trust
    status_interval: float = 1.0  # seconds between status-file writes (when something changed)

    @property
    def bundles_dir(self) -> Path:
        """``bundles/<node>/{files/,manifest.json}``, rendered by the join playbook."""
        return self.state_dir / "bundles"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def url(self) -> str:
        """What the nodes are told (kernel command line ``provision.join=``)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @classmethod
    def from_site(cls, site: Site) -> JoinSettings:
        return cls.from_vars(site.settings.backend_vars(), site.state_dir)

    @classmethod
    def from_vars(cls, variables: Mapping[str, Any], state_dir: Path) -> JoinSettings:
        """From the site's variables (``SiteSettings.backend_vars()``); raises InventoryError naming a bad one."""
        get = variables.get
        network = get("provision_network")
        address = _address(get("provision_join_address"), "provision_join_address")
        if address is None:
            address = _address(get("provision_boot_address"), "provision_boot_address")
        if address is None and network:
            try:
                address = str(ipaddress.ip_network(str(network), strict=False).network_address + 1)
            except ValueError as exc:
                raise InventoryError(
                    f"provision_network: {network!r} is not a CIDR", hint="write e.g. 10.10.0.0/16"
                ) from exc
        if address is None:
            raise InventoryError(
                "provision_join_address: not set, and no provision_boot_address or provision_network to default from",
                hint="set provision_join_address to this node's address on the provisioning network",
            )
        port = _number(get("provision_join_port", DEFAULT_PORT), "provision_join_port", int, 1, 65535)
        poll = _number(get("provision_join_console_poll", 0.5), "provision_join_console_poll", float, 0.05, 60)
        mode = _choice(
            variables, "provision_join_mode", JoinMode.AGENT, "join mode",
            "use agent (nodes fetch their bundle at every boot) or push (provision node join over SSH)",
        )  # fmt: skip
        trust = _choice(
            variables, "provision_join_trust", JoinTrust.CONSOLE, "trust policy",
            "use console (the default) or token (opt-in, for sites without console logs)",
        )  # fmt: skip
        from provision.boot.base import config_flag

        return cls(
            address=address,
            port=int(port),
            state_dir=Path(state_dir) / "service",
            console_poll=float(poll),
            mode=mode,
            managed=config_flag(variables, "provision_join_service_managed", True),
            trust=trust,
        )


_E = TypeVar("_E", bound=StrEnum)


def _choice(variables: Mapping[str, Any], key: str, default: _E, what: str, hint: str) -> _E:
    """A closed-set setting (a StrEnum member), ``default`` when unset."""
    raw = variables.get(key) or default
    try:
        return type(default)(str(raw).lower())
    except ValueError:
        raise InventoryError(f"{key}: {raw!r} is not a {what}", hint=hint) from None


def _address(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError as exc:
        raise InventoryError(f"{key}: {value!r} is not an IP address", hint=f"write {key} as e.g. 10.10.0.1") from exc


def _number(value: Any, key: str, kind: type[int] | type[float], low: float, high: float) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError) as exc:
        raise InventoryError(f"{key}: {value!r} is not a number", hint=f"write {key} as a number") from exc
    if not low <= number <= high:
        raise InventoryError(f"{key}: {value!r} is out of range", hint=f"use {low}-{high}")
    return number

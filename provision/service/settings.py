"""The join service's settings: typed and frozen, read once from the site."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import InventoryError
from provision.inventory import Site

DEFAULT_PORT = 8740
NONCE_TTL = 60.0  # seconds a challenge stays valid (protocol)
NONCES_PER_NODE = 4  # outstanding challenges per node; the oldest goes first
EVENTS_KEPT = 1000  # the bounded event list (memory and the status file)


@dataclass(frozen=True)
class JoinSettings:
    address: str  # provision_join_address (default: provision_boot_address, else the network's first host)
    port: int  # provision_join_port (8740)
    state_dir: Path  # <provision_state_dir>/service
    console_poll: float = 0.5  # provision_join_console_poll: seconds between console reads
    status_interval: float = 1.0  # seconds between status-file writes (when something changed)

    @property
    def bundles_dir(self) -> Path:
        """``bundles/<node>/{files/,manifest.json}``, rendered by the join playbook."""
        return self.state_dir / "bundles"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @classmethod
    def from_site(cls, site: Site) -> JoinSettings:
        get = site.settings.get
        address = _address(get("provision_join_address"), "provision_join_address")
        if address is None:
            address = _address(get("provision_boot_address"), "provision_boot_address")
        if address is None and site.settings.network:
            try:
                address = str(ipaddress.ip_network(site.settings.network, strict=False).network_address + 1)
            except ValueError as exc:
                raise InventoryError(
                    f"provision_network: {site.settings.network!r} is not a CIDR", hint="write e.g. 10.10.0.0/16"
                ) from exc
        if address is None:
            raise InventoryError(
                "provision_join_address: not set, and no provision_boot_address or provision_network to default from",
                hint="set provision_join_address to this node's address on the provisioning network",
            )
        port = _number(get("provision_join_port", DEFAULT_PORT), "provision_join_port", int, 1, 65535)
        poll = _number(get("provision_join_console_poll", 0.5), "provision_join_console_poll", float, 0.05, 60)
        return cls(address=address, port=int(port), state_dir=site.state_dir / "service", console_poll=float(poll))


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

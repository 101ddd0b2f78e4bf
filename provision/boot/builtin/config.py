"""The built-in backend's settings, read once from the inventory's variables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import netaddr

from provision.boot.base import check_image_name, config_flag
from provision.errors import BootError
from provision.service.settings import JoinMode, JoinSettings, JoinTrust

IPXE_DIR = Path("/usr/lib/ipxe")


class DhcpMode(StrEnum):
    STATIC = "static"  # dnsmasq is the DHCP server: static leases per MAC, nothing for unknown MACs
    PROXY = "proxy"  # another DHCP server gives addresses; dnsmasq answers PXE only


class UefiLoader(StrEnum):
    IPXE = "ipxe.efi"  # iPXE with its own NIC drivers
    SNPONLY = "snponly.efi"  # iPXE on the firmware's network stack (SNP)


_NETNS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _address(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise BootError(f"{key}: {value!r} is not an IP address", hint="write an address such as 10.10.0.2")
    try:
        return str(netaddr.IPAddress(value.strip()))
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise BootError(f"{key}: {value!r} is not an IP address", hint="write an address such as 10.10.0.2") from exc


@dataclass(frozen=True)
class BuiltinConfig:
    """Settings of the built-in backend, read from inventory variables.

    ``provision_state_dir`` (required), ``provision_network`` (required CIDR),
    ``provision_boot_address`` (this node on that network; default: its first
    host address), ``provision_boot_interface`` (dnsmasq's interface; default:
    bind to the address), ``provision_boot_http_port`` (80),
    ``provision_boot_dhcp_mode`` (static|proxy), ``provision_boot_netns``
    (run the services in this network namespace: the virtual rack),
    ``provision_boot_router_advertisements`` (true: answer iPXE's IPv6 router
    solicitation; needs ``provision_boot_interface`` and an IPv6 address on it), ``provision_boot_lease_time`` (12h),
    ``provision_boot_uefi_loader`` (ipxe.efi|snponly.efi),
    ``provision_image_store`` (default ``<state_dir>/images``),
    ``provision_gateway``, ``provision_dns_servers``, ``provision_default_image``,
    ``provision_ssh_authorized_keys`` (public keys the booted nodes fetch for
    root from ``<base_url>/ssh/authorized_keys``: the stateless role's
    ``stateless_fetch_root_keys``), ``provision_boot_proxy_any`` (false: in
    proxy mode, boot information goes to the inventory's MACs only).
    """

    state_dir: Path
    network: str
    server_address: str
    http_port: int = 80
    interface: str | None = None
    dhcp_mode: DhcpMode = DhcpMode.STATIC
    netns: str | None = None
    router_advertisements: bool = True
    gateway: str | None = None
    dns_servers: tuple[str, ...] = ()
    lease_time: str = "12h"
    uefi_loader: UefiLoader = UefiLoader.IPXE
    image_store: Path | None = None
    default_image: str | None = None
    ipxe_dir: Path = IPXE_DIR
    http_workers: str = "auto"
    authorized_keys: tuple[str, ...] = ()
    join_url: str | None = None  # the join service the nodes' agents ask (kernel command line provision.join=)
    boot_tokens: bool = False  # provision_join_trust: token — a single-use token in each node's script
    proxy_any: bool = False  # proxy mode: answer every PXE client, not only the inventory's MACs

    @property
    def base_url(self) -> str:
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{self.server_address}{port}"

    @classmethod
    def from_vars(cls, config: Mapping[str, Any]) -> BuiltinConfig:
        state = config.get("provision_state_dir")
        if not state:
            raise BootError("provision_state_dir: missing", hint="set it in group_vars/all (e.g. .state)")
        state_dir = Path(str(state)) / "boot"
        network_raw = config.get("provision_network")
        if not network_raw:
            raise BootError("provision_network: missing", hint="set the provisioning subnet, e.g. 10.10.0.0/16")
        try:
            network = netaddr.IPNetwork(str(network_raw))
        except (netaddr.AddrFormatError, ValueError) as exc:
            raise BootError(
                f"provision_network: {network_raw!r} is not a CIDR", hint="write e.g. 10.10.0.0/16"
            ) from exc
        if network.version != 4:
            raise BootError(
                "provision_network: must be an IPv4 subnet", hint="PXE DHCP is IPv4; write e.g. 10.10.0.0/16"
            )
        raw_server = config.get("provision_boot_address")
        gateway_raw = config.get("provision_gateway")
        server = _address(raw_server, "provision_boot_address") if raw_server else str(network.network + 1)
        if not raw_server and gateway_raw and str(gateway_raw).strip() == server:
            raise BootError(
                f"provision_boot_address: missing, and {server} (the first address of provision_network) is the gateway",
                hint="set provision_boot_address to this node's address on the provisioning network",
            )
        if netaddr.IPAddress(server) not in network or (
            network.size > 2 and netaddr.IPAddress(server) in (network.network, network.broadcast)
        ):
            raise BootError(
                f"provision_boot_address: {server} is outside provision_network {network.cidr}",
                hint="give this node's address on the provisioning network",
            )
        port_raw = config.get("provision_boot_http_port", 80)
        port = int(port_raw.strip()) if isinstance(port_raw, str) and port_raw.strip().isdigit() else port_raw
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise BootError(f"provision_boot_http_port: {port_raw!r} is not a port", hint="use 1-65535")
        try:
            mode = DhcpMode(str(config.get("provision_boot_dhcp_mode") or "static").lower())
        except ValueError:
            raise BootError(
                f"provision_boot_dhcp_mode: {config.get('provision_boot_dhcp_mode')!r} is not a DHCP mode",
                hint="use static (dnsmasq hands out the addresses) or proxy (beside an existing DHCP server)",
            ) from None
        try:
            loader = UefiLoader(str(config.get("provision_boot_uefi_loader") or UefiLoader.IPXE))
        except ValueError:
            raise BootError(
                f"provision_boot_uefi_loader: {config.get('provision_boot_uefi_loader')!r} is not known",
                hint="use ipxe.efi or snponly.efi",
            ) from None
        dns_raw = config.get("provision_dns_servers") or ()
        if isinstance(dns_raw, str):
            dns_raw = [d for d in re.split(r"[,\s]+", dns_raw) if d]
        if not isinstance(dns_raw, list | tuple):
            raise BootError(
                f"provision_dns_servers: {dns_raw!r} is not a list of addresses", hint="write e.g. [10.10.0.1]"
            )
        interface = config.get("provision_boot_interface")
        if interface is not None and not (
            isinstance(interface, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", interface)
        ):
            raise BootError(f"provision_boot_interface: {interface!r} is not an interface name", hint="e.g. eno1")
        lease_raw = config.get("provision_boot_lease_time") or "12h"
        lease = str(lease_raw)
        if isinstance(lease_raw, bool) or not re.fullmatch(r"(\d{1,9}[smhdw]?|infinite)", lease):
            raise BootError(
                f"provision_boot_lease_time: {lease_raw!r} is not a lease time", hint="e.g. 12h, 3600, infinite"
            )
        store = config.get("provision_image_store")
        netns = config.get("provision_boot_netns")
        if netns and not (isinstance(netns, str) and _NETNS.fullmatch(netns)):
            raise BootError(
                f"provision_boot_netns: {netns!r} is not a network namespace name",
                hint="letters, digits, '_', '.', '-', starting with a letter or digit (no '/', at most 64)",
            )
        keys = _authorized_keys(config.get("provision_ssh_authorized_keys"))
        default_image = config.get("provision_default_image")
        join = JoinSettings.from_vars(config, Path(str(state)))
        if join.trust is JoinTrust.TOKEN and mode is DhcpMode.PROXY:
            raise BootError(
                "provision_join_trust: token needs provision_boot_dhcp_mode: static",
                hint="a boot token is bound to the address dnsmasq leases the node; in proxy mode it is not",
            )
        return cls(
            state_dir=state_dir,
            network=str(network.cidr),
            server_address=server,
            http_port=port,
            interface=str(interface) if interface else None,
            dhcp_mode=mode,
            netns=str(netns) if netns else None,
            router_advertisements=config_flag(config, "provision_boot_router_advertisements", True),
            gateway=_address(gateway_raw, "provision_gateway") if gateway_raw else None,
            dns_servers=tuple(_address(d, "provision_dns_servers") for d in dns_raw),
            lease_time=lease,
            uefi_loader=loader,
            image_store=Path(str(store)) if store else Path(str(state)) / "images",
            default_image=check_image_name(str(default_image)) if default_image else None,
            authorized_keys=keys,
            join_url=join.url if join.mode is JoinMode.AGENT else None,
            boot_tokens=join.mode is JoinMode.AGENT and join.trust is JoinTrust.TOKEN,
            proxy_any=config_flag(config, "provision_boot_proxy_any", False),
        )


_PUBLIC_KEY = re.compile(
    r"^(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [^\n]*)?$"
)


def _authorized_keys(value: Any) -> tuple[str, ...]:
    """``provision_ssh_authorized_keys``: a list of OpenSSH public key lines (never a private key)."""
    if not value:
        return ()
    if not isinstance(value, str | list | tuple):
        raise BootError(
            f"provision_ssh_authorized_keys: expected a list of public key lines, got {type(value).__name__}",
            hint="write a YAML list of .pub lines",
        )
    items = [value] if isinstance(value, str) else list(value)
    keys = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise BootError(
                f"provision_ssh_authorized_keys[{index}]: not an OpenSSH public key line",
                hint="paste the line of a .pub file, e.g. 'ssh-ed25519 AAAA... admin@site'",
            )
        line = item.strip()
        if "PRIVATE KEY" in line:
            raise BootError(
                f"provision_ssh_authorized_keys[{index}]: is a private key",
                hint="give public keys only (the .pub file's line); remove the private key from the inventory",
            )
        if not _PUBLIC_KEY.match(line):
            raise BootError(
                f"provision_ssh_authorized_keys[{index}]: not an OpenSSH public key line",
                hint="paste the line of a .pub file, e.g. 'ssh-ed25519 AAAA... admin@site'",
            )
        keys.append(line)
    return tuple(keys)

"""The built-in boot backend: dnsmasq (DHCP + TFTP), iPXE and nginx on this node.

For one admin node (small sites, the virtual rack). Everything lives under
the site's state directory, ``<state_dir>/boot``::

    registry.json            hosts, images (every servable version) and the active version per image
    tokens.json              one-time boot tokens per host (mode 0600, never logged)
    conf/dnsmasq.conf        rendered from templates/ with jinja2
    conf/dnsmasq.hosts       static leases (MAC,IP,name); re-read on SIGHUP
    conf/nginx.conf
    run/<service>.pid        pids of the running services (found again by `stop` from any process)
    dnsmasq.leases
    logs/dnsmasq.log         DHCP/TFTP log (log-dhcp): evidence of boot phases
    logs/http-access.log     nginx access log: evidence of boot phases
    tftp/                    iPXE binaries for firmware PXE clients
    www/boot.ipxe            generic script: chains www/boot/<mac>.ipxe
    www/boot/<mac>.ipxe      per-node script (mode 0600: carries the boot token)
    www/images/<name>/<version>/  symlinks into the image store

Why nginx: many nodes fetch the same 200 MB squashfs at once and dracut's
livenet and iPXE want range requests; nginx serves static files with
sendfile from an event loop (``bench/http_serving.py`` measures it against
Python's ``http.server``). dnsmasq and nginx run in the foreground as
children started with ``provision.proc.spawn`` in their own session; their
pids are written under ``run/`` and checked against ``/proc/<pid>/cmdline``,
so ``stop`` finds them after the CLI that started them has exited.

Image versions: ``add_version`` registers a version as servable;
nodes boot the *active* version, which changes only through ``activate``
(``put_images`` = add + activate). Older versions stay servable, so
``activate(name, previous)`` is a rollback.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import jinja2
import netaddr

from provision.boot.base import (
    BackendName,
    BootHost,
    BootImage,
    check_host_name,
    check_image_name,
    config_flag,
    normalize_mac,
    site_hosts,
    sync_hosts,
)
from provision.boot.events import BootEvent, read_events
from provision.errors import BootError
from provision.proc import spawn

IPXE_DIR = Path("/usr/lib/ipxe")
#: The kernel command line every node gets (dracut livenet, see the README); the image adds its own extras.
BASE_CMDLINE = (
    "root=live:{squashfs_url} rd.live.overlay.overlayfs=1 rd.neednet=1 ip=dhcp BOOTIF=01-{mac_hyp} "
    "console=ttyS0,115200 rd.shell=0 rd.emergency=reboot panic=10"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class DhcpMode(StrEnum):
    STATIC = "static"  # dnsmasq is the DHCP server: static leases per MAC, nothing for unknown MACs
    PROXY = "proxy"  # another DHCP server gives addresses; dnsmasq answers PXE only


class UefiLoader(StrEnum):
    IPXE = "ipxe.efi"  # iPXE with its own NIC drivers
    SNPONLY = "snponly.efi"  # iPXE on the firmware's network stack (SNP)


class Service(StrEnum):
    DNSMASQ = "dnsmasq"
    NGINX = "nginx"


# --------------------------------------------------------------------------
# Configuration


def _address(value: Any, key: str) -> str:
    try:
        return str(netaddr.IPAddress(str(value).strip()))
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
    ``stateless_fetch_root_keys``).
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
        if netaddr.IPAddress(server) not in network:
            raise BootError(
                f"provision_boot_address: {server} is outside provision_network {network.cidr}",
                hint="give this node's address on the provisioning network",
            )
        port_raw = config.get("provision_boot_http_port", 80)
        try:
            port = int(port_raw)
            if not 0 < port < 65536:
                raise ValueError
        except (TypeError, ValueError):
            raise BootError(f"provision_boot_http_port: {port_raw!r} is not a port", hint="use 1-65535") from None
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
        interface = config.get("provision_boot_interface")
        if interface is not None and not re.match(r"^[A-Za-z0-9_.-]{1,15}$", str(interface)):
            raise BootError(f"provision_boot_interface: {interface!r} is not an interface name", hint="e.g. eno1")
        lease = str(config.get("provision_boot_lease_time") or "12h")
        if not re.match(r"^(\d+[smhdw]?|infinite)$", lease):
            raise BootError(
                f"provision_boot_lease_time: {lease!r} is not a lease time", hint="e.g. 12h, 3600, infinite"
            )
        store = config.get("provision_image_store")
        netns = config.get("provision_boot_netns")
        keys = _authorized_keys(config.get("provision_ssh_authorized_keys"))
        default_image = config.get("provision_default_image")
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
        )


_PUBLIC_KEY = re.compile(
    r"^(?:ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [^\n]*)?$"
)


def _authorized_keys(value: Any) -> tuple[str, ...]:
    """``provision_ssh_authorized_keys``: a list of OpenSSH public key lines (never a private key)."""
    if not value:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    keys = []
    for index, item in enumerate(items):
        line = str(item).strip()
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


# --------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ImageVersionRecord:
    """One servable version of an image: files on this machine plus kernel extras."""

    version: str
    kernel: str
    initrds: tuple[str, ...]
    squashfs: str | None
    cmdline: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kernel": self.kernel,
            "initrds": list(self.initrds),
            "squashfs": self.squashfs,
            "cmdline": self.cmdline,
        }


@dataclass
class _Registry:
    hosts: dict[str, BootHost] = field(default_factory=dict)
    versions: dict[str, dict[str, ImageVersionRecord]] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _Registry:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            hosts = {
                h["name"]: BootHost(**{**h, "macs": tuple(h["macs"]), "ips": tuple(h["ips"]), "tags": tuple(h["tags"])})
                for h in data.get("hosts", [])
            }
            versions = {
                name: {
                    v["version"]: ImageVersionRecord(
                        v["version"], v["kernel"], tuple(v["initrds"]), v.get("squashfs"), v.get("cmdline", "")
                    )
                    for v in vs
                }
                for name, vs in data.get("images", {}).items()
            }
            return cls(hosts, versions, dict(data.get("active", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise BootError(
                f"{path}: unreadable boot registry ({exc})",
                hint="restore it or remove it and run `provision boot serve`",
            ) from exc

    def save(self, path: Path) -> None:
        data = {
            "hosts": [h.as_dict() for h in sorted(self.hosts.values(), key=lambda h: h.name)],
            "images": {n: [v.as_dict() for v in vs.values()] for n, vs in sorted(self.versions.items())},
            "active": dict(sorted(self.active.items())),
        }
        _write_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o644)


def _write_atomic(path: Path, text: str, *, mode: int = 0o644) -> bool:
    """Write ``path`` atomically with ``mode``; returns False when the content was already the same."""
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def mac_file_name(mac: str) -> str:
    """``52:54:00:ab:cd:ef`` → ``52-54-00-ab-cd-ef`` (iPXE's ``${net0/mac:hexhyp}``)."""
    return normalize_mac(mac).replace(":", "-")


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    running: bool
    pid: int | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"service": str(self.service), "running": self.running, "pid": self.pid, "detail": self.detail}


# --------------------------------------------------------------------------
# Processes


def _pid_alive(pid: int) -> bool:
    """True for a live (non-zombie) process; reaps it when it is our zombie child."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class BuiltinBackend:
    """dnsmasq + iPXE + nginx on this node, driven through ``BootBackend``."""

    name = BackendName.BUILTIN.value

    def __init__(self, config: BuiltinConfig) -> None:
        self.config = config
        self.root = config.state_dir
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("provision.boot", "templates"),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BuiltinBackend:
        return cls(BuiltinConfig.from_vars(config))

    # -- paths ------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    @property
    def tokens_path(self) -> Path:
        return self.root / "tokens.json"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def docroot(self) -> Path:
        return self.root / "www"

    @property
    def tftp_root(self) -> Path:
        return self.root / "tftp"

    @property
    def dnsmasq_log(self) -> Path:
        return self.log_dir / "dnsmasq.log"

    @property
    def http_access_log(self) -> Path:
        return self.log_dir / "http-access.log"

    @property
    def lease_file(self) -> Path:
        return self.root / "dnsmasq.leases"

    def pid_file(self, service: Service) -> Path:
        return self.run_dir / f"{service}.pid"

    def conf_file(self, service: Service) -> Path:
        return self.conf_dir / f"{service}.conf"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Registry]:
        """The registry, under an exclusive lock; saved when the block ends without error."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            registry = _Registry.load(self.registry_path)
            yield registry
            registry.save(self.registry_path)

    def _read(self) -> _Registry:
        return _Registry.load(self.registry_path)

    # -- BootBackend: identity ------------------------------------------
    def describe(self) -> str:
        where = f" in netns {self.config.netns}" if self.config.netns else ""
        return f"built-in (dnsmasq {self.config.dhcp_mode} DHCP + iPXE + nginx at {self.config.base_url}{where}; state {self.root})"

    def ping(self) -> None:
        down = [s.service.value for s in self.status() if not s.running]
        if down:
            raise BootError(f"built-in boot backend: not running: {', '.join(down)}", hint="run `provision boot serve`")

    def close(self) -> None:
        """Nothing held: the services outlive this object (``stop`` ends them)."""

    # -- BootBackend: images ---------------------------------------------
    def _boot_image(self, name: str, record: ImageVersionRecord) -> BootImage:
        return BootImage(
            name=name, kernel=record.kernel, initrds=record.initrds, squashfs=record.squashfs, cmdline=record.cmdline
        )

    def list_images(self) -> list[BootImage]:
        reg = self._read()
        return [
            self._boot_image(n, reg.versions[n][v])
            for n, v in sorted(reg.active.items())
            if v in reg.versions.get(n, {})
        ]

    def get_image(self, name: str) -> BootImage | None:
        reg = self._read()
        name = check_image_name(name)
        version = reg.active.get(name)
        return self._boot_image(name, reg.versions[name][version]) if version else None

    def put_images(self, images: Sequence[BootImage]) -> None:
        """Register each image's files as a version (named after their directory) and make it active."""
        records = [(img.name, self._version_of(img)) for img in images]
        self._check_files(records)
        with self._locked() as reg:
            for name, record in records:
                reg.versions.setdefault(name, {})[record.version] = record
                reg.active[name] = record.version
            self._render(reg)

    def remove_images(self, names: Sequence[str]) -> list[str]:
        removed: list[str] = []
        with self._locked() as reg:
            for raw in names:
                name = check_image_name(raw)
                if name in reg.versions:
                    del reg.versions[name]
                    reg.active.pop(name, None)
                    removed.append(name)
            if removed:
                self._render(reg)
        return removed

    # Versions: what the image store publishes, and which one nodes boot.
    def add_version(
        self,
        name: str,
        version: str,
        *,
        kernel: str | os.PathLike[str],
        initrds: Sequence[str | os.PathLike[str]],
        squashfs: str | os.PathLike[str] | None,
        cmdline: str = "",
        activate: bool = False,
    ) -> ImageVersionRecord:
        """Make a version servable; nodes boot it only once activated."""
        name = check_image_name(name)
        if not _VERSION.match(version):
            raise BootError(
                f"image {name}: version {version!r} is not valid", hint="use letters, digits, '.', '_', '+', '-'"
            )
        record = ImageVersionRecord(
            version, str(Path(kernel).resolve()), tuple(str(Path(i).resolve()) for i in initrds),
            str(Path(squashfs).resolve()) if squashfs else None, _check_cmdline(cmdline, name),
        )  # fmt: skip
        self._check_files([(name, record)])
        with self._locked() as reg:
            reg.versions.setdefault(name, {})[version] = record
            if activate or name not in reg.active:
                # The first version of an image is active at once: there is nothing to roll back to.
                reg.active[name] = version
            self._render(reg)
        return record

    def add_store_version(
        self, store: Path, name: str, version: str | None = None, *, activate: bool = False
    ) -> ImageVersionRecord:
        """Register ``<store>/<name>/<version>`` (default: ``current``) from the image store."""
        name = check_image_name(name)
        image_dir = store / name
        if version is None:
            current = image_dir / "current"
            if not current.exists():
                raise BootError(
                    f"image {name}: nothing published in {image_dir}", hint=f"run `provision image build {name}`"
                )
            version = current.resolve().name
        vdir = image_dir / version
        manifest: dict[str, Any] = {}
        if (vdir / "manifest.json").exists():
            with contextlib.suppress(ValueError):
                manifest = json.loads((vdir / "manifest.json").read_text())
        kernel_info = manifest.get("kernel")
        extras = kernel_info.get("cmdline", "") if isinstance(kernel_info, dict) else ""
        return self.add_version(
            name, version, kernel=vdir / "vmlinuz", initrds=[vdir / "initrd.img"], squashfs=vdir / "rootfs.squashfs",
            cmdline=str(extras) if isinstance(extras, str) else " ".join(map(str, extras)), activate=activate,
        )  # fmt: skip

    def activate(self, name: str, version: str) -> None:
        """Nodes boot ``version`` of ``name`` from their next boot on (also a rollback)."""
        name = check_image_name(name)
        with self._locked() as reg:
            known = reg.versions.get(name, {})
            if version not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise BootError(
                    f"image {name}: version {version!r} is not registered (known: {listed})", hint="publish it first"
                )
            self._check_files([(name, known[version])])
            reg.active[name] = version
            self._render(reg)

    def versions(self, name: str) -> tuple[list[ImageVersionRecord], str | None]:
        """Every servable version of ``name`` and the active one."""
        reg = self._read()
        name = check_image_name(name)
        return list(reg.versions.get(name, {}).values()), reg.active.get(name)

    def remove_version(self, name: str, version: str) -> bool:
        name = check_image_name(name)
        with self._locked() as reg:
            if reg.active.get(name) == version:
                raise BootError(f"image {name}: version {version} is active", hint="activate another version first")
            found = reg.versions.get(name, {}).pop(version, None) is not None
            if found:
                self._render(reg)
        return found

    # -- BootBackend: hosts ----------------------------------------------
    def list_hosts(self) -> list[BootHost]:
        return sorted(self._read().hosts.values(), key=lambda h: h.name)

    def get_hosts(self, names: Sequence[str]) -> list[BootHost]:
        hosts = self._read().hosts
        wanted = [check_host_name(n) for n in names]
        return [hosts[n] for n in wanted if n in hosts]

    def put_hosts(self, hosts: Sequence[BootHost]) -> None:
        network = netaddr.IPNetwork(self.config.network)
        for host in hosts:
            if not host.macs:
                raise BootError(f"{host.name}: no MAC address", hint="set provision_mac")
            if self.config.dhcp_mode is DhcpMode.STATIC and not host.ips:
                raise BootError(f"{host.name}: no IP address for its static lease", hint="set provision_ip")
            for ip in host.addresses:
                if netaddr.IPAddress(ip) not in network:
                    raise BootError(
                        f"{host.name}: {ip} is outside provision_network {network}", hint=f"use an address in {network}"
                    )
        with self._locked() as reg:
            owner = {m: h.name for h in reg.hosts.values() for m in h.macs}
            for host in hosts:
                for mac in host.macs:
                    if owner.get(mac, host.name) != host.name:
                        raise BootError(
                            f"{host.name}: MAC {mac} already belongs to {owner[mac]}", hint="give each node its own MAC"
                        )
            tokens = self._tokens()
            for host in hosts:
                reg.hosts[host.name] = host
                if host.provision and host.name not in tokens:
                    tokens[host.name] = secrets.token_urlsafe(24)
            self._save_tokens(tokens)
            self._render(reg)

    def remove_hosts(self, names: Sequence[str]) -> list[str]:
        removed: list[str] = []
        with self._locked() as reg:
            tokens = self._tokens()
            for raw in names:
                name = check_host_name(raw)
                if reg.hosts.pop(name, None) is not None:
                    tokens.pop(name, None)
                    removed.append(name)
            if removed:
                self._save_tokens(tokens)
                self._render(reg)
        return removed

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        changed: list[str] = []
        with self._locked() as reg:
            tokens = self._tokens()
            for raw in names:
                name = check_host_name(raw)
                host = reg.hosts.get(name)
                if host is None or host.provision == provision:
                    continue
                reg.hosts[name] = host.with_provision(provision)
                if provision:
                    tokens[name] = secrets.token_urlsafe(24)  # a fresh one-time token per provisioning
                else:
                    tokens.pop(name, None)
                changed.append(name)
            if changed:
                self._save_tokens(tokens)
                self._render(reg)
        return changed

    # -- tokens -------------------------------------------------------------
    def _tokens(self) -> dict[str, str]:
        if not self.tokens_path.exists():
            return {}
        data = json.loads(self.tokens_path.read_text())
        return {str(k): str(v) for k, v in data.items()}

    def _save_tokens(self, tokens: Mapping[str, str]) -> None:
        _write_atomic(self.tokens_path, json.dumps(dict(sorted(tokens.items())), indent=2) + "\n", mode=0o600)

    def consume_token(self, name: str, token: str) -> bool:
        """True once for the token the node booted with; the token is then spent."""
        name = check_host_name(name)
        with self._locked():
            tokens = self._tokens()
            expected = tokens.get(name)
            if expected is None or not secrets.compare_digest(expected.encode(), token.encode()):
                return False
            del tokens[name]
            self._save_tokens(tokens)
        return True

    # -- rendering -----------------------------------------------------------
    def _version_of(self, image: BootImage) -> ImageVersionRecord:
        kernel = Path(image.kernel)
        version = kernel.parent.name if _VERSION.match(kernel.parent.name or "") else "default"
        return ImageVersionRecord(
            version, str(kernel.resolve()), tuple(str(Path(i).resolve()) for i in image.initrds),
            str(Path(image.squashfs).resolve()) if image.squashfs else None, _check_cmdline(image.cmdline, image.name),
        )  # fmt: skip

    @staticmethod
    def _check_files(records: Sequence[tuple[str, ImageVersionRecord]]) -> None:
        for name, record in records:
            for path in (record.kernel, *record.initrds, *([record.squashfs] if record.squashfs else [])):
                if not Path(path).is_file():
                    raise BootError(
                        f"image {name} {record.version}: {path} does not exist", hint="publish the image again"
                    )

    def _template(self, template: str, **values: Any) -> str:
        return self._env.get_template(template).render(**values)

    def _user(self) -> str:
        # The services read the state directory (often mode 0700) and the image store: run them as its owner.
        return getpass.getuser()

    def render_dnsmasq(self, hosts: Sequence[BootHost]) -> tuple[str, str]:
        """(dnsmasq.conf, dnsmasq.hosts) for ``hosts``."""
        cfg = self.config
        net = netaddr.IPNetwork(cfg.network)
        leases = []
        for host in sorted(hosts, key=lambda h: h.name):
            for mac, ip in zip(host.macs, host.addresses, strict=False):
                leases.append({"mac": mac, "ip": ip, "name": host.name})
        conf = self._template(
            "dnsmasq.conf.j2",
            mode=str(cfg.dhcp_mode),
            interface=cfg.interface,
            server=cfg.server_address,
            user=self._user(),
            pid_file=self.run_dir / "dnsmasq.own.pid",
            log_file=self.dnsmasq_log,
            lease_file=self.lease_file,
            network_address=str(net.network),
            netmask=str(net.netmask),
            lease_time=cfg.lease_time,
            hosts_file=self.conf_dir / "dnsmasq.hosts",
            gateway=cfg.gateway,
            dns_servers=list(cfg.dns_servers),
            router_advertisements=cfg.router_advertisements,
            tftp_root=self.tftp_root,
            uefi_loader=str(cfg.uefi_loader),
            boot_url=f"{cfg.base_url}/boot.ipxe",
        )
        return conf, self._template("dnsmasq.hosts.j2", leases=leases)

    def render_nginx(self, hosts: Sequence[BootHost] = ()) -> str:
        """nginx.conf. With static leases each node's script (it carries the token) is served to its address only."""
        cfg = self.config
        pinned = []
        if cfg.dhcp_mode is DhcpMode.STATIC:
            for host in sorted(hosts, key=lambda h: h.name):
                for mac, ip in zip(host.macs, host.addresses, strict=False):
                    pinned.append({"file": f"{mac_file_name(mac)}.ipxe", "ip": ip})
        return self._template(
            "nginx.conf.j2",
            pinned=pinned,
            workers=cfg.http_workers,
            user=self._user() if os.geteuid() == 0 else None,
            pid_file=self.run_dir / "nginx.own.pid",
            error_log=self.log_dir / "nginx-error.log",
            access_log=self.http_access_log,
            temp_dir=self.root / "nginx-tmp",
            listen=f"{cfg.server_address}:{cfg.http_port}",
            docroot=self.docroot,
        )

    def render_node_script(self, host: BootHost, mac: str, reg: _Registry, token: str | None) -> str:
        cfg = self.config
        image_name = host.image or cfg.default_image
        version = reg.active.get(image_name) if image_name else None
        ip = host.addresses[host.macs.index(mac)] if host.macs.index(mac) < len(host.addresses) else None
        values: dict[str, Any] = {"name": host.name, "mac": mac, "ip": ip, "image": None, "reason": ""}
        if not host.provision:
            values["reason"] = "not set to network-boot (provision off)"
        elif not image_name:
            values["reason"] = "no image (set provision_image or provision_default_image)"
        elif version is None or image_name is None:
            values["reason"] = f"image {image_name} has no active version (publish and activate it)"
        else:
            record = reg.versions[image_name][version]
            base = f"{cfg.base_url}/images/{image_name}/{version}"
            initrds = [{"name": n, "url": f"{base}/{n}"} for n in _served_names(record)[1]]
            squashfs_url = f"{base}/{Path(record.squashfs).name}" if record.squashfs else ""
            args = (
                [BASE_CMDLINE.format(squashfs_url=squashfs_url, mac_hyp=mac.replace(":", "-"))]
                if record.squashfs
                else []
            )
            args += [f"initrd={i['name']}" for i in initrds]
            args += [f"systemd.hostname={host.name}", f"provision.node={host.name}"]
            if ip:
                args.append(f"provision.ip={ip}")
            args.append(f"provision.server={cfg.base_url}")
            if token:
                args.append(f"provision.token={token}")
            present = {word for arg in args for word in arg.split()}
            # The image's extras, without repeating what is already there (images often list the same dracut options).
            args += [word for word in record.cmdline.split() if word not in present]
            values["image"] = {
                "name": image_name,
                "version": version,
                "kernel_url": f"{base}/{_served_names(record)[0]}",
                "initrd_urls": initrds,
            }
            values["cmdline"] = " ".join(a for a in args if a)
        return self._template("node.ipxe.j2", **values)

    def render(self) -> None:
        """Write every config, script and image link from the registry (no service is touched)."""
        with self._locked() as reg:
            self._render(reg)

    def _render(self, reg: _Registry) -> None:
        for directory in (
            self.conf_dir,
            self.run_dir,
            self.log_dir,
            self.docroot / "boot",
            self.docroot / "images",
            self.docroot / "ssh",
            self.tftp_root,
            self.root / "nginx-tmp",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        conf, hosts_text = self.render_dnsmasq(list(reg.hosts.values()))
        _write_atomic(self.conf_file(Service.DNSMASQ), conf)
        hosts_changed = _write_atomic(self.conf_dir / "dnsmasq.hosts", hosts_text)
        nginx_changed = _write_atomic(self.conf_file(Service.NGINX), self.render_nginx(list(reg.hosts.values())))
        _write_atomic(self.docroot / "boot.ipxe", self._template("boot.ipxe.j2", base_url=self.config.base_url))
        keys = "".join(f"{key}\n" for key in self.config.authorized_keys)
        _write_atomic(self.docroot / "ssh" / "authorized_keys", keys, mode=0o644)
        self._sync_tftp()
        self._sync_images(reg)
        tokens = self._tokens()
        wanted: set[str] = set()
        for host in reg.hosts.values():
            for mac in host.macs:
                file_name = f"{mac_file_name(mac)}.ipxe"
                wanted.add(file_name)
                script = self.render_node_script(host, mac, reg, tokens.get(host.name) if host.provision else None)
                _write_atomic(self.docroot / "boot" / file_name, script, mode=0o600)
        for stale in (self.docroot / "boot").glob("*.ipxe"):
            if stale.name not in wanted:
                stale.unlink()
        if hosts_changed:
            self._signal(Service.DNSMASQ, signal.SIGHUP)  # dnsmasq re-reads its hosts file
        if nginx_changed and self._running_pid(Service.NGINX) is not None:
            self._signal(Service.NGINX, signal.SIGHUP)  # graceful reload: downloads in flight go on
            (self.run_dir / "nginx.confhash").write_text(self._conf_hash(Service.NGINX))

    def _sync_tftp(self) -> None:
        for binary in ("undionly.kpxe", "ipxe.efi", "snponly.efi"):
            source = self.config.ipxe_dir / binary
            target = self.tftp_root / binary
            if not source.is_file():
                raise BootError(f"{source} is missing", hint="install the Debian package ipxe")
            if (
                not target.exists()
                or target.stat().st_size != source.stat().st_size
                or target.read_bytes() != source.read_bytes()
            ):
                shutil.copyfile(source, target)

    def _sync_images(self, reg: _Registry) -> None:
        images = self.docroot / "images"
        wanted: set[Path] = set()
        for name, versions in reg.versions.items():
            for version, record in versions.items():
                vdir = images / name / version
                vdir.mkdir(parents=True, exist_ok=True)
                wanted.add(vdir)
                kernel_name, initrd_names = _served_names(record)
                links = {kernel_name: record.kernel, **dict(zip(initrd_names, record.initrds, strict=True))}
                if record.squashfs:
                    links[Path(record.squashfs).name] = record.squashfs
                for link_name, target in links.items():
                    link = vdir / link_name
                    if link.is_symlink() and os.readlink(link) == target:
                        continue
                    link.unlink(missing_ok=True)
                    link.symlink_to(target)
                for extra in vdir.iterdir():
                    if extra.name not in links:
                        extra.unlink()
        for name_dir in list(images.iterdir()):
            for vdir in list(name_dir.iterdir()) if name_dir.is_dir() else []:
                if vdir not in wanted:
                    shutil.rmtree(vdir)
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()

    # -- services ------------------------------------------------------------
    def _argv(self, service: Service) -> list[str]:
        if service is Service.DNSMASQ:
            argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={self.conf_file(service)}"]
        else:
            argv = [
                "nginx",
                "-p",
                str(self.root / "nginx-tmp"),
                "-c",
                str(self.conf_file(service)),
                "-e",
                str(self.log_dir / "nginx-error.log"),
            ]
        if self.config.netns:
            argv = ["ip", "netns", "exec", self.config.netns, *argv]
        return argv

    def _running_pid(self, service: Service) -> int | None:
        """The pid of our running service, or None (a stale pid file is removed)."""
        path = self.pid_file(service)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        conf = str(self.conf_file(service))
        if _pid_alive(pid) and any(conf in arg for arg in _cmdline(pid)):
            return pid
        path.unlink(missing_ok=True)
        return None

    def _signal(self, service: Service, sig: signal.Signals) -> None:
        pid = self._running_pid(service)
        if pid is not None:
            os.kill(pid, sig)

    def _conf_hash(self, service: Service) -> str:
        return hashlib.sha256(self.conf_file(service).read_bytes()).hexdigest()

    def serve(self) -> list[ServiceStatus]:
        """Render, then start what is not running, restart what runs an older config. Idempotent."""
        for binary in ("dnsmasq", "nginx"):
            if shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
                raise BootError(
                    f"{binary}: command not found", hint="install the Debian packages dnsmasq and nginx-light"
                )
        if self.config.netns and not Path(f"/run/netns/{self.config.netns}").exists():
            raise BootError(
                f"provision_boot_netns: network namespace {self.config.netns} does not exist",
                hint="create it first (provision lab)",
            )
        self.render()
        started: list[Service] = []
        try:
            self._serve_each(started)
        except BaseException:
            for service in started:  # no half-started server: stop what this call started
                self._stop_one(service)
            raise
        return self.status()

    def _serve_each(self, started: list[Service]) -> None:
        for service in (Service.NGINX, Service.DNSMASQ):
            pid = self._running_pid(service)
            digest = self._conf_hash(service)
            stamp = self.run_dir / f"{service}.confhash"
            if pid is not None:
                if stamp.exists() and stamp.read_text() == digest:
                    continue
                if service is Service.NGINX:
                    os.kill(pid, signal.SIGHUP)  # nginx reloads its config without dropping downloads
                    stamp.write_text(digest)
                    continue
                self._stop_one(service)
            self._start_one(service)
            started.append(service)
            stamp.write_text(digest)

    def _start_one(self, service: Service) -> None:
        own_pid = self.run_dir / f"{service}.own.pid"
        own_pid.unlink(missing_ok=True)
        logs = [self.log_dir / f"{service}.out"]
        if service is Service.NGINX:
            logs.append(self.log_dir / "nginx-error.log")
        offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
        proc = spawn(self._argv(service), log_path=logs[0])
        self.pid_file(service).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file(service).unlink(missing_ok=True)
                reason = _first_error(logs, offsets)
                raise BootError(f"{service} did not start: {reason}", hint=self._start_hint(service))
            if own_pid.exists() and own_pid.stat().st_size > 0:
                return
            time.sleep(0.05)
        self._stop_one(service)
        raise BootError(f"{service} did not become ready within {_START_TIMEOUT:.0f} s", hint=f"see {logs[-1]}")

    def _start_hint(self, service: Service) -> str:
        if service is Service.DNSMASQ:
            return f"is another DHCP server running on this network or port 67 in use? see {self.dnsmasq_log}"
        return (
            f"is port {self.config.http_port} on {self.config.server_address} in use, or the address not on this node?"
        )

    def _stop_one(self, service: Service) -> bool:
        pid = self._running_pid(service)
        if pid is None:
            self.pid_file(service).unlink(missing_ok=True)
            return False
        # The service leads its own session (spawn): its process group holds nginx's workers too.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        while _pid_alive(pid) and time.monotonic() < deadline + 2:
            time.sleep(0.05)
        self.pid_file(service).unlink(missing_ok=True)
        (self.run_dir / f"{service}.confhash").unlink(missing_ok=True)
        return True

    def stop(self) -> list[str]:
        """Stop dnsmasq and nginx; returns what was running. Safe to run twice."""
        return [str(s) for s in (Service.DNSMASQ, Service.NGINX) if self._stop_one(s)]

    def status(self) -> list[ServiceStatus]:
        cfg = self.config
        out = []
        for service in (Service.DNSMASQ, Service.NGINX):
            pid = self._running_pid(service)
            if service is Service.DNSMASQ:
                detail = f"{cfg.dhcp_mode} DHCP on {cfg.interface or cfg.server_address} + TFTP; log {self.dnsmasq_log}"
            else:
                detail = f"HTTP {cfg.base_url}/; log {self.http_access_log}"
            out.append(ServiceStatus(service, pid is not None, pid, detail))
        return out

    def summary(self) -> dict[str, Any]:
        """Services, hosts and images: what `provision boot status --json` prints (no token)."""
        reg = self._read()
        return {
            "backend": self.name,
            "describe": self.describe(),
            "services": [s.as_dict() for s in self.status()],
            "hosts": len(reg.hosts),
            "provisioning": sorted(h.name for h in reg.hosts.values() if h.provision),
            "images": {
                name: {"active": reg.active.get(name), "versions": sorted(vs)}
                for name, vs in sorted(reg.versions.items())
            },
        }

    def boot_events(self, hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
        """The DHCP/TFTP/HTTP timeline so far, from dnsmasq's and nginx's logs (``provision.boot.events``)."""
        return read_events(self.dnsmasq_log, self.http_access_log, hosts)

    def wait_http(self, timeout: float = 5.0) -> None:
        """Wait until the HTTP server accepts connections (only from this namespace)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.config.server_address, self.config.http_port), timeout=0.5):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BootError(f"HTTP server {self.config.base_url} not reachable: {exc}") from exc
                time.sleep(0.1)


_NGINX_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(emerg|alert|crit|error)\] \d+#\d+: ")


def _first_error(logs: Sequence[Path], offsets: Sequence[int]) -> str:
    """The first error line a service wrote since ``offsets`` (nginx's prefix removed)."""
    lines: list[str] = []
    for path, offset in zip(logs, offsets, strict=True):
        with contextlib.suppress(OSError):
            lines += [
                line.strip()
                for line in path.read_bytes()[offset:].decode(errors="replace").splitlines()
                if line.strip()
            ]
    for line in lines:
        if _NGINX_PREFIX.match(line):
            return _NGINX_PREFIX.sub("", line)
    for line in lines:
        if "dnsmasq:" in line or "failed" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def _served_names(record: ImageVersionRecord) -> tuple[str, list[str]]:
    """File names under /images/<name>/<version>/ for the kernel and each initrd."""
    kernel = Path(record.kernel).name
    names: list[str] = []
    for index, initrd in enumerate(record.initrds):
        base = Path(initrd).name
        names.append(base if base not in names and base != kernel else f"{index}-{base}")
    return kernel, names


def _check_cmdline(cmdline: str, name: str) -> str:
    text = " ".join(str(cmdline or "").split())
    if "\n" in str(cmdline or "") or len(text) > 2048:
        raise BootError(
            f"image {name}: kernel command line must be one line under 2048 characters", hint="fix the image's cmdline"
        )
    return text


def sync_site(
    site: Any,
    backend: BuiltinBackend,
    *,
    activate: bool,
    image_for: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Mirror the inventory into the backend: hosts (keeping their provision flag) and images from the store.

    ``image_for`` boots some nodes (by name) with another image than the
    inventory's, until the next sync.
    """
    site.require_valid(site.nodes)
    known = {h.name: h for h in backend.list_hosts()}
    hosts = site_hosts(site, image_for=image_for, provision={name: h.provision for name, h in known.items()})
    plan = sync_hosts(backend, hosts)
    gone = backend.remove_hosts(sorted(set(known) - {h.name for h in hosts}))
    store = backend.config.image_store
    images: dict[str, str] = {}
    for name in sorted({h.image for h in hosts if h.image}):
        if store is None or not (store / name / "current").exists():
            images[name] = "not published"
            continue
        record = backend.add_store_version(store, name, activate=activate)
        _, active = backend.versions(name)
        images[name] = f"{record.version} ({'active' if active == record.version else f'servable; active {active}'})"
    return {"hosts_written": list(plan.to_write), "hosts_removed": gone, "images": images}


__all__ = [
    "BASE_CMDLINE",
    "BuiltinBackend",
    "BuiltinConfig",
    "DhcpMode",
    "ImageVersionRecord",
    "Service",
    "ServiceStatus",
    "UefiLoader",
    "mac_file_name",
    "sync_site",
]

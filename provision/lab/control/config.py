"""What the lab control node serves, and where it keeps its files."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import ProvisionError

_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_BASE_DN = re.compile(r"^dc=[a-z0-9-]+(,dc=[a-z0-9-]+)*$")


class ControlPlaneError(ProvisionError):
    """The lab control plane is misconfigured or a service failed to start."""


def _check_address(value: str, field_name: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ControlPlaneError(
            f"{field_name} {value!r} is not an IP address", hint=f"give {field_name} as e.g. 10.99.0.1"
        ) from None
    return value


def _check_port(value: int, field_name: str) -> int:
    if not 1 <= value <= 65535:
        raise ControlPlaneError(f"{field_name} {value} is not a TCP port", hint="use 1-65535")
    return value


@dataclass(frozen=True)
class LabNode:
    """A compute node as slurm.conf declares it.

    ``real_memory_mb`` must not exceed what the node reports (else Slurm marks
    it ``inval``): the default suits a 1.5-2 GiB lab VM.
    """

    name: str
    address: str
    cpus: int = 1
    real_memory_mb: int = 512

    def __post_init__(self) -> None:
        if not _NODE_NAME.match(self.name):
            raise ControlPlaneError(
                f"node name {self.name!r} is not a valid Slurm node name", hint="use lower-case letters, digits, '-'"
            )
        _check_address(self.address, f"node {self.name} address")
        if self.cpus < 1:
            raise ControlPlaneError(f"node {self.name}: cpus {self.cpus} must be at least 1")
        if self.real_memory_mb < 1:
            raise ControlPlaneError(
                f"node {self.name}: real_memory_mb {self.real_memory_mb} must be at least 1",
                hint="use a value at or below the node's memory as `slurmd -C` reports it",
            )


@dataclass(frozen=True)
class ControlPlaneConfig:
    """What the control node serves. ``netns=None``: the host's network (tests on loopback)."""

    address: str
    nodes: tuple[LabNode, ...]
    netns: str | None = None
    cluster_name: str = "lab"
    hostname: str = "lab-control"
    partition: str = "lab"
    slurmctld_port: int = 6817
    slurmd_port: int = 6818
    ldap_port: int = 389
    ldaps_port: int = 636
    base_dn: str = "dc=lab,dc=provision"
    ldap_tls: bool = True
    # True: proctrack/cgroup + task/cgroup (nodes whose slurmd has cgroup
    # delegation, e.g. systemd's Delegate=yes). False: no cgroups needed.
    cgroups: bool = False
    # SlurmdParameters=config_overrides: trust slurm.conf over the hardware.
    config_overrides: bool = False
    # Node-side paths written into the served slurm.conf (slurm_node role's).
    slurmd_spool_dir: str = "/var/spool/slurmd"
    slurmd_log_file: str = "/var/log/slurm/slurmd.log"
    ldap_user: str = "labuser"
    ldap_uid: int = 20001
    ldap_group: str = "labusers"
    ldap_gid: int = 20001

    def __post_init__(self) -> None:
        _check_address(self.address, "address")
        for name in ("slurmctld_port", "slurmd_port", "ldap_port", "ldaps_port"):
            _check_port(getattr(self, name), name)
        for name in ("cluster_name", "partition", "ldap_user", "ldap_group"):
            if not _WORD.match(getattr(self, name)):
                raise ControlPlaneError(
                    f"{name} {getattr(self, name)!r} is not a plain name", hint="use letters, digits, '_', '-'"
                )
        if not _NODE_NAME.match(self.hostname):
            raise ControlPlaneError(f"hostname {self.hostname!r} is not a valid host name")
        if not _BASE_DN.match(self.base_dn):
            raise ControlPlaneError(f"base_dn {self.base_dn!r} is not a dc= DN", hint="use e.g. dc=lab,dc=provision")
        if not self.nodes:
            raise ControlPlaneError(
                "nodes: slurmctld needs at least one node in slurm.conf", hint="give the lab's nodes (LabNode)"
            )
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ControlPlaneError(f"nodes: duplicate node names {', '.join(dupes)}")
        if self.hostname in names:
            raise ControlPlaneError(f"hostname {self.hostname!r} is also a node name", hint="rename one of them")
        for path in (self.slurmd_spool_dir, self.slurmd_log_file):
            if not path.startswith("/"):
                raise ControlPlaneError(f"{path!r} must be an absolute path on the nodes")
        if self.ldap_uid < 1000 or self.ldap_gid < 1000:
            raise ControlPlaneError("ldap_uid and ldap_gid must be 1000 or above", hint="e.g. 20001")

    @property
    def conf_server(self) -> str:
        """What nodes give to ``slurmd --conf-server``."""
        return f"{self.address}:{self.slurmctld_port}"

    @property
    def uri_host(self) -> str:
        """The address as a URI's host part (IPv6 in brackets)."""
        addr = ipaddress.ip_address(self.address)
        return f"[{addr}]" if addr.version == 6 else str(addr)

    @property
    def bind_dn(self) -> str:
        """SSSD's bind user."""
        return f"cn=sssd,ou=services,{self.base_dn}"

    @property
    def admin_dn(self) -> str:
        return f"cn=admin,{self.base_dn}"


@dataclass(frozen=True)
class LdapInfo:
    """What an SSSD client needs; secrets as file paths only."""

    uri: str
    ldaps_uri: str | None
    base_dn: str
    bind_dn: str
    bind_password_file: Path
    ca_cert: Path | None
    user: str
    uid: int
    group: str
    gid: int
    user_password_file: Path


@dataclass(frozen=True)
class ControlPlanePaths:
    """Where the control plane keeps its files under its state directory."""

    root: Path
    etc: Path = field(init=False)
    secrets: Path = field(init=False)
    tls: Path = field(init=False)
    bin: Path = field(init=False)
    slurm_state: Path = field(init=False)
    ldap_db: Path = field(init=False)
    sandbox: Path = field(init=False)
    slurm_conf: Path = field(init=False)
    munge_key: Path = field(init=False)
    pids: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        for name, sub in (
            ("etc", "etc"),
            ("secrets", "secrets"),
            ("tls", "tls"),
            ("bin", "bin"),
            ("slurm_state", "slurmctld"),
            ("ldap_db", "ldap"),
            ("sandbox", "run"),
            ("slurm_conf", "etc/slurm.conf"),
            ("munge_key", "secrets/munge.key"),
            ("pids", "run/pids"),
            ("logs", "run/log"),
        ):
            object.__setattr__(self, name, self.root / sub)

    def password_file(self, name: str) -> Path:
        return self.secrets / f"{name}.password"

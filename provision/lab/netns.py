"""Network namespaces for the virtual rack: a namespace, a bridge, taps.

Everything lives inside a namespace created here, so nothing touches the
host's interfaces. What was created is recorded in a JSON file as it is
created; ``teardown()`` removes exactly those things (taps, bridges, the
namespace if it created it), ignores what is already gone, and is safe to run
twice or from another process that only knows the record file.

    ns = Netns("prov-lab", record=workdir / "netns.json")
    ns.create()
    ns.add_bridge("br0", addresses=("10.99.0.1/24", "fd99::1/64"))
    ns.add_tap("tap0", bridge="br0")
    ...  # QEMU with Nic(mac, tap="tap0") and MachineSpec(netns="prov-lab")
    ns.teardown()
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import netaddr

from provision.errors import ProvisionError
from provision.files import write_atomic
from provision.proc import netns_argv, netns_exists, run

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NSNAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class NetnsError(ProvisionError):
    """A network namespace, bridge or tap could not be created or removed."""


@dataclass
class _Record:
    created_namespace: bool = False
    bridges: list[str] = field(default_factory=list)
    taps: list[str] = field(default_factory=list)


def _check_ifname(name: str, what: str) -> str:
    if not _IFNAME.match(name):
        raise NetnsError(f"{what} name {name!r} is not a valid interface name", hint="use 1-15 of [A-Za-z0-9_.-]")
    return name


class Netns:
    """One network namespace and the devices created in it."""

    def __init__(self, name: str, *, record: Path | None = None) -> None:
        if not _NSNAME.match(name):
            raise NetnsError(f"namespace name {name!r} is not valid", hint="use letters, digits, '.', '_' and '-'")
        self.name = name
        self.record_path = record
        self._record = self._load()

    # -- record ---------------------------------------------------------
    def _load(self) -> _Record:
        if self.record_path and self.record_path.exists():
            data = json.loads(self.record_path.read_text())
            return _Record(
                bool(data.get("created_namespace")), list(data.get("bridges", [])), list(data.get("taps", []))
            )
        return _Record()

    def _save(self) -> None:
        if not self.record_path:
            return
        data = {"namespace": self.name, **self._record.__dict__}
        write_atomic(self.record_path, json.dumps(data, indent=2) + "\n")

    @property
    def created(self) -> tuple[str, ...]:
        """What teardown would remove, e.g. ``("tap:tap0", "bridge:br0", "netns:prov-lab")``."""
        items = [f"tap:{t}" for t in self._record.taps] + [f"bridge:{b}" for b in self._record.bridges]
        if self._record.created_namespace:
            items.append(f"netns:{self.name}")
        return tuple(items)

    # -- commands -------------------------------------------------------
    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside the namespace."""
        return netns_argv(self.name, argv)

    def _ip(self, *args: str, check: bool = True) -> str:
        proc = run(["ip", "-n", self.name, *args], check=False)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise NetnsError(
                f"netns {self.name}: ip {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}",
                hint="network namespaces need root (CAP_NET_ADMIN) and iproute2",
            )
        return proc.stdout

    def exists(self) -> bool:
        return netns_exists(self.name)

    def link_exists(self, name: str) -> bool:
        return self.exists() and run(["ip", "-n", self.name, "link", "show", "dev", name], check=False).returncode == 0

    def create(self) -> None:
        """Create the namespace (with loopback up); reusing an existing one is allowed."""
        if not self.exists():
            proc = run(["ip", "netns", "add", self.name], check=False)
            if proc.returncode != 0:
                raise NetnsError(
                    f"cannot create network namespace {self.name}: {proc.stderr.strip()}",
                    hint="run as root (network namespaces need CAP_SYS_ADMIN)",
                )
            self._record.created_namespace = True
            self._save()
        self._ip("link", "set", "lo", "up")

    def add_bridge(self, name: str, *, addresses: Sequence[str] = ()) -> None:
        """A bridge holding ``addresses`` (CIDR form), up. Idempotent."""
        _check_ifname(name, "bridge")
        for cidr in addresses:
            try:
                netaddr.IPNetwork(cidr)
            except (netaddr.AddrFormatError, ValueError) as exc:
                raise NetnsError(f"bridge {name}: {cidr!r} is not an address/prefix", hint="e.g. 10.99.0.1/24") from exc
        if not self.link_exists(name):
            # No STP and no forwarding delay: PXE ROMs give up before a 15 s learning phase ends.
            self._ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self._record.bridges.append(name)
            self._save()
        present = self._ip("-o", "addr", "show", "dev", name)
        for cidr in addresses:
            if f" {cidr} " not in present:
                # nodad: the address is usable at once (iPXE's router solicitation comes early).
                extra = ["nodad"] if netaddr.IPNetwork(cidr).version == 6 else []
                self._ip("addr", "add", cidr, "dev", name, *extra)
        self._ip("link", "set", name, "up")

    def add_tap(self, name: str, *, bridge: str | None = None) -> None:
        """A tap device (for one QEMU NIC), enslaved to ``bridge``, up. Idempotent."""
        _check_ifname(name, "tap")
        if not self.link_exists(name):
            self._ip("tuntap", "add", "dev", name, "mode", "tap")
            self._record.taps.append(name)
            self._save()
        if bridge:
            self._ip("link", "set", name, "master", bridge)
        self._ip("link", "set", name, "up")

    def links(self) -> list[str]:
        if not self.exists():
            return []
        data = json.loads(self._ip("-j", "link", "show") or "[]")
        return [str(item["ifname"]) for item in data]

    def pids(self) -> list[int]:
        """Processes running inside the namespace."""
        if not self.exists():
            return []
        proc = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def teardown(self) -> list[str]:
        """Remove what this object (or its record) created; returns what was removed."""
        removed: list[str] = []
        if self.exists():
            for tap in list(self._record.taps):
                if self.link_exists(tap):
                    self._ip("link", "del", tap, check=False)
                    removed.append(f"tap:{tap}")
            for bridge in list(self._record.bridges):
                if self.link_exists(bridge):
                    self._ip("link", "del", bridge, check=False)
                    removed.append(f"bridge:{bridge}")
            if self._record.created_namespace:
                proc = run(["ip", "netns", "delete", self.name], check=False)
                if proc.returncode != 0 and self.exists():
                    raise NetnsError(f"cannot delete network namespace {self.name}: {proc.stderr.strip()}")
                removed.append(f"netns:{self.name}")
        self._record = _Record()
        if self.record_path:
            self.record_path.unlink(missing_ok=True)
        return removed

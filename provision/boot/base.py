"""The boot-backend interface: what every PXE boot service must offer.

A boot backend knows, for each node, its MACs and addresses, the image it
boots and whether it may (re)provision now. ``provision`` drives every backend
through ``BootBackend`` and never asks which one it has; the Grendel backend
(``provision.boot.grendel``) talks to a Grendel server, the built-in one
(``provision.boot.builtin``) runs dnsmasq, iPXE and an HTTP server itself.
``backend_for(site)`` builds the one the site chose.

Values are normalised once, when a ``BootHost``/``BootImage`` is built, so that
two records describing the same thing compare equal whatever the backend
returned (MAC case and separators, bare vs. CIDR addresses, tag order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import netaddr

from provision.errors import BootError
from provision.names import HOST_RULE, IMAGE_RULE, host_name_problem, is_image_name


def config_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean backend setting, read the way Ansible reads booleans."""
    from ansible.module_utils.parsing.convert_bool import boolean

    value = config.get(key)
    if value is None or value == "":
        return default
    try:
        return bool(boolean(value, strict=True))
    except TypeError as exc:
        raise BootError(f"{key}: {value!r} is not a boolean", hint="write true or false") from exc


if TYPE_CHECKING:
    from provision.boot.events import BootEvent
    from provision.image.store import ImageStore, ImageVersion
    from provision.inventory import Node, Site


class BackendName(StrEnum):
    """The closed set of boot backends (inventory: ``provision_boot_backend``)."""

    GRENDEL = "grendel"
    BUILTIN = "builtin"


#: The backend a site gets without ``provision_boot_backend``.
DEFAULT_BACKEND = BackendName.BUILTIN


def normalize_mac(value: str, *, field_name: str = "mac") -> str:
    """``AA-BB-CC-DD-EE-FF`` / ``aabb.ccdd.eeff`` → ``aa:bb:cc:dd:ee:ff``."""
    try:
        return str(netaddr.EUI(str(value).strip(), dialect=netaddr.mac_unix_expanded)).lower()
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise BootError(
            f"{field_name}: {value!r} is not a MAC address", hint="write a MAC such as 3c:ec:ef:10:01:01"
        ) from exc


def normalize_cidr(value: str, *, prefixlen: int | None = None, field_name: str = "ip") -> str:
    """An interface address with its prefix: ``10.0.0.5`` + 16 → ``10.0.0.5/16``.

    The host bits are kept (``10.0.0.5/24`` stays), as Grendel keeps them. A
    bare address without ``prefixlen`` becomes a host route (``/32``/``/128``).
    """
    text = str(value).strip()
    try:
        if "/" in text:
            net = netaddr.IPNetwork(text)
            return f"{net.ip}/{net.prefixlen}"
        address = netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
        raise BootError(
            f"{field_name}: {value!r} is not an IP address", hint="write an address such as 10.10.1.11/16"
        ) from exc
    if prefixlen is None:
        prefixlen = 32 if address.version == 4 else 128
    return f"{address}/{prefixlen}"


def address_of(cidr: str) -> str:
    """``10.0.0.5/16`` → ``10.0.0.5``."""
    return cidr.split("/", 1)[0]


def check_host_name(name: str) -> str:
    """Lower-case and check a node name (``provision.names``: the inventory's rule too)."""
    problem = host_name_problem(name)
    if problem:
        raise BootError(f"host name {problem}", hint=HOST_RULE)
    return str(name).strip().lower()


def check_image_name(name: str) -> str:
    if not is_image_name(name):
        raise BootError(f"image name {name!r} is not valid", hint=IMAGE_RULE)
    return str(name).strip().lower()


@dataclass(frozen=True)
class BootImage:
    """What a node boots: a kernel, its initrds, a squashfs root and a cmdline.

    Paths are as the backend sees them (on the Grendel server for Grendel, on
    this machine for the built-in backend). ``cmdline`` is passed verbatim; for
    Grendel it is a Go template (``{{ $.nic.MAC }}``, ``{{ $.endpoints.LiveImageURL }}``).
    ``name`` is lower-cased.
    """

    name: str
    kernel: str
    initrds: tuple[str, ...] = ()
    squashfs: str | None = None
    cmdline: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", check_image_name(self.name))
        if not self.kernel:
            raise BootError(f"image {self.name}: kernel is empty", hint="give the kernel's path")
        object.__setattr__(self, "initrds", tuple(str(i) for i in self.initrds if i))
        object.__setattr__(self, "squashfs", self.squashfs or None)
        object.__setattr__(self, "cmdline", self.cmdline or "")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "initrds": list(self.initrds)}


@dataclass(frozen=True)
class BootHost:
    """One node as a boot service knows it.

    * ``name``: lower-cased, RFC 952.
    * ``macs``: lower-case colon form; ``macs[0]`` is the boot NIC.
    * ``ips``: interface addresses in CIDR form (``10.10.1.11/16``); ``ips[i]``
      belongs to ``macs[i]`` (fewer addresses than MACs is allowed).
      ``addresses`` gives them without the prefix.
    * ``bmc_address``: IP or host name of the BMC, or None.
    * ``image``: lower-cased image name, or None for the backend's default.
    * ``tags``: e.g. ``rack=r1``; sorted, without duplicates.
    * ``provision``: True when the node may network-boot/provision now.
    """

    name: str
    macs: tuple[str, ...]
    ips: tuple[str, ...] = ()
    bmc_address: str | None = None
    image: str | None = None
    tags: tuple[str, ...] = ()
    provision: bool = True

    def __post_init__(self) -> None:
        name = check_host_name(self.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "macs", tuple(normalize_mac(m, field_name=f"{name}: mac") for m in self.macs))
        object.__setattr__(self, "ips", tuple(normalize_cidr(i, field_name=f"{name}: ip") for i in self.ips))
        if len(self.ips) > max(len(self.macs), 1):
            raise BootError(f"{name}: more addresses than MACs", hint="give one MAC per address")
        object.__setattr__(self, "bmc_address", str(self.bmc_address).strip() if self.bmc_address else None)
        object.__setattr__(self, "image", check_image_name(self.image) if self.image else None)
        object.__setattr__(self, "tags", tuple(sorted({str(t).strip() for t in self.tags if str(t).strip()})))
        object.__setattr__(self, "provision", bool(self.provision))

    @property
    def addresses(self) -> tuple[str, ...]:
        """The interface addresses without prefix length."""
        return tuple(address_of(i) for i in self.ips)

    @property
    def boot_mac(self) -> str | None:
        return self.macs[0] if self.macs else None

    @property
    def boot_ip(self) -> str | None:
        return address_of(self.ips[0]) if self.ips else None

    def with_provision(self, provision: bool) -> BootHost:
        return replace(self, provision=provision)

    @classmethod
    def from_node(
        cls,
        node: Node,
        *,
        network: str | None = None,
        default_image: str | None = None,
        tags: Iterable[str] = (),
        provision: bool = True,
    ) -> BootHost:
        """The boot view of an inventory node.

        The address gets the prefix length of ``network`` (the site's
        ``provision_network``), else /32. Tags ``rack=<rack>`` and one
        ``group=<g>`` per Ansible group are added to ``tags``.
        """
        prefixlen = None
        if network:
            try:
                prefixlen = netaddr.IPNetwork(str(network)).prefixlen
            except (netaddr.AddrFormatError, ValueError) as exc:
                raise BootError(
                    f"provision_network: {network!r} is not a CIDR", hint="write e.g. 10.10.0.0/16"
                ) from exc
        if not node.mac:
            raise BootError(f"{node.name}: provision_mac is missing", hint="set the node's boot MAC")
        ips: tuple[str, ...] = ()
        if node.ip:
            ips = (normalize_cidr(node.ip, prefixlen=prefixlen, field_name=f"{node.name}: provision_ip"),)
        all_tags = [f"rack={node.rack}", *(f"group={g}" for g in node.groups), *tags]
        return cls(
            name=node.name,
            macs=(node.mac,),
            ips=ips,
            bmc_address=node.bmc.address if node.bmc else None,
            image=node.image or default_image,
            tags=tuple(all_tags),
            provision=provision,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "macs": list(self.macs),
            "ips": list(self.ips),
            "bmc_address": self.bmc_address,
            "image": self.image,
            "tags": list(self.tags),
            "provision": self.provision,
        }


@dataclass(frozen=True)
class ServiceStatus:
    """One service a backend runs or talks to (built-in: dnsmasq, nginx; Grendel: its API)."""

    service: str
    running: bool
    pid: int | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"service": str(self.service), "running": self.running, "pid": self.pid, "detail": self.detail}


@dataclass(frozen=True)
class Prepared:
    """What ``BootBackend.prepare`` did: hosts written and removed, each image's state, the services."""

    hosts_written: tuple[str, ...]
    hosts_removed: tuple[str, ...]
    images: Mapping[str, str]  # image name -> e.g. "20260101-000000 (active)", "not published"
    services: tuple[ServiceStatus, ...]
    where: str  # the boot service's address (URL, socket)

    def as_dict(self) -> dict[str, Any]:
        return {
            "hosts_written": list(self.hosts_written),
            "hosts_removed": list(self.hosts_removed),
            "images": dict(self.images),
            "services": [s.as_dict() for s in self.services],
            "where": self.where,
        }


@dataclass(frozen=True)
class PrepareOptions:
    """How ``BootBackend.prepare`` prepares nodes."""

    #: Boot some nodes (by name) with another image until the next sync.
    image_for: Mapping[str, str] = field(default_factory=dict)
    #: Boot the image store's current version (a backend without versions ignores it).
    activate: bool = True
    #: Start or reload the backend's services (False: write hosts and images only).
    serve: bool = True


PREPARE = PrepareOptions()


@dataclass(frozen=True)
class Published:
    """An image version made bootable by ``BootBackend.publish``."""

    name: str
    version: str
    backend: str
    activated: bool
    where: str

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@runtime_checkable
class BootBackend(Protocol):
    """A boot service. Every method raises ``BootError`` (or a subclass) on failure.

    Writes are upserts keyed by (lower-cased) name and replace the whole record.
    Removing or re-provisioning a name the backend does not know is not an
    error: the methods return the names they actually acted on.
    """

    #: ``BackendName`` value of the implementation.
    name: str

    def describe(self) -> str:
        """One line naming the backend and where it is (URL, socket, directory)."""
        ...

    def ping(self) -> None:
        """Check the service is reachable and usable; raise BootError if not."""
        ...

    # Serving
    def prepare(self, site: Site, nodes: Sequence[Node], how: PrepareOptions = PREPARE) -> Prepared:
        """Make ``nodes`` bootable: check them (only them), sync their hosts and images, serve.

        The built-in backend also forgets hosts the inventory no longer has,
        and starts or reloads its services (unless ``how.serve`` is false);
        Grendel, which runs elsewhere, is checked.
        """
        ...

    def serve(self) -> list[ServiceStatus]:
        """Start (or reload) what the backend runs on this node; idempotent."""
        ...

    def stop(self) -> list[str]:
        """Stop what ``serve`` started; returns what was running. Safe twice."""
        ...

    def status(self) -> list[ServiceStatus]: ...

    def summary(self) -> dict[str, Any]:
        """Services, hosts and images, as ``provision boot status --json`` prints them (no secret)."""
        ...

    def publish(self, store: ImageStore, image: ImageVersion, *, activate: bool, dry_run: bool) -> Published:
        """Make an image-store version bootable (nodes boot it at once unless the backend keeps versions)."""
        ...

    def is_published(self, name: str) -> bool:
        """Whether ``prepare`` can give nodes image ``name``."""
        ...

    def boot_events(self, hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
        """DHCP/TFTP/HTTP boot phases so far (empty when the backend has no logs here)."""
        ...

    # Versions per node (rolling re-image)
    def versions_of(self, image: str) -> tuple[tuple[str, ...], str | None]:
        """The versions of ``image`` nodes can be given, and the one they boot by default."""
        ...

    def assign_version(self, names: Sequence[str], version: str | None) -> dict[str, str]:
        """From their next boot on, these nodes boot ``version`` of their image (None: the default
        version again); returns the version each will boot. A backend that cannot raises BootError."""
        ...

    def next_versions(self, names: Sequence[str]) -> dict[str, str]:
        """The version of its image each node boots next (nodes without one are left out)."""
        ...

    # Images
    def list_images(self) -> list[BootImage]: ...

    def get_image(self, name: str) -> BootImage | None: ...

    def put_images(self, images: Sequence[BootImage]) -> None:
        """Create or replace images."""
        ...

    def remove_images(self, names: Sequence[str]) -> list[str]:
        """Delete images; returns the names that existed and were removed."""
        ...

    # Hosts
    def list_hosts(self) -> list[BootHost]: ...

    def get_hosts(self, names: Sequence[str]) -> list[BootHost]:
        """The known hosts among ``names`` (unknown names are skipped)."""
        ...

    def put_hosts(self, hosts: Sequence[BootHost]) -> None:
        """Create or replace hosts (the whole record, including ``provision``)."""
        ...

    def remove_hosts(self, names: Sequence[str]) -> list[str]:
        """Delete hosts; returns the names that existed and were removed."""
        ...

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        """Allow (True) or stop (False) network boot/provisioning; returns the known names among ``names``."""
        ...

    def rotate_token(self, name: str, token: str) -> bool:
        """Boot tokens (``provision_join_trust: token``): True once for the token node ``name``
        booted with, which is then replaced for its next boot; False for any other token.
        A backend that cannot hand out boot tokens raises BootError."""
        ...

    def close(self) -> None:
        """Release connections or processes held by the backend object."""
        ...


def summary_of(backend: BootBackend, hosts: Sequence[BootHost], images: Mapping[str, Any]) -> dict[str, Any]:
    """What every backend's ``summary`` starts with (``provision boot status --json``)."""
    return {
        "backend": backend.name,
        "describe": backend.describe(),
        "services": [s.as_dict() for s in backend.status()],
        "hosts": len(hosts),
        "provisioning": sorted(h.name for h in hosts if h.provision),
        "images": dict(images),
    }


# --------------------------------------------------------------------------
# Sync: the same plan for every backend


class Change(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class HostChange:
    name: str
    change: Change
    fields: tuple[str, ...] = ()  # the fields that differ, for UPDATE

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "change": str(self.change), "fields": list(self.fields)}


@dataclass(frozen=True)
class SyncPlan:
    changes: tuple[HostChange, ...] = field(default=())

    @property
    def to_write(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.changes if c.change is not Change.UNCHANGED)


_COMPARED = ("macs", "ips", "bmc_address", "image", "tags")


def plan_sync(current: Iterable[BootHost], desired: Sequence[BootHost]) -> SyncPlan:
    """What writing ``desired`` over ``current`` would change, host by host.

    ``provision`` is not compared: it is run state (``set_provision``), not
    inventory data, so a sync neither re-arms nor disarms a known host.
    """
    known = {h.name: h for h in current}
    changes: list[HostChange] = []
    for host in desired:
        old = known.get(host.name)
        if old is None:
            changes.append(HostChange(host.name, Change.CREATE))
            continue
        diff = tuple(f for f in _COMPARED if getattr(old, f) != getattr(host, f))
        changes.append(HostChange(host.name, Change.UPDATE if diff else Change.UNCHANGED, diff))
    return SyncPlan(tuple(changes))


def sync_hosts(backend: BootBackend, desired: Sequence[BootHost], *, dry_run: bool = False) -> SyncPlan:
    """Push ``desired`` to ``backend``, writing only hosts that differ.

    New hosts are written with their own ``provision`` flag; hosts the
    backend knows keep the flag they have there.
    """
    current = {h.name: h for h in backend.get_hosts([h.name for h in desired])}
    plan = plan_sync(current.values(), desired)
    if not dry_run:
        wanted = set(plan.to_write)
        todo = [
            h.with_provision(current[h.name].provision) if h.name in current else h for h in desired if h.name in wanted
        ]
        if todo:
            backend.put_hosts(todo)
    return plan


# --------------------------------------------------------------------------
# Registry

#: name -> "module:Class"; imported lazily so a backend's dependencies load only when used.
_REGISTRY: dict[str, str] = {
    BackendName.GRENDEL: "provision.boot.grendel:GrendelBackend",
    BackendName.BUILTIN: "provision.boot.builtin:BuiltinBackend",
}
#: name -> its settings parser ("module:Class.method"), run without connecting (`inventory check`).
_SETTINGS: dict[str, str] = {
    BackendName.GRENDEL: "provision.grendel:GrendelSettings.from_config",
    BackendName.BUILTIN: "provision.boot.builtin.config:BuiltinConfig.from_vars",
}


class BackendFactory(Protocol):
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BootBackend: ...


def _lookup(table: Mapping[str, str], name: str) -> Any:
    """The object ``table`` names for backend ``name`` (imported now); BootError naming the variable if unknown."""
    import importlib

    try:
        target = table[BackendName(str(name).lower())]
    except ValueError:
        known = ", ".join(b.value for b in BackendName)
        raise BootError(f"provision_boot_backend: unknown boot backend {name!r}", hint=f"use one of: {known}") from None
    module_name, _, attribute = target.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def get_backend(name: str, config: Mapping[str, Any]) -> BootBackend:
    """Build the backend ``name`` from inventory variables (``provision_*``).

    ``config`` maps variable names to values, as in group_vars: e.g.
    ``provision_grendel_url``, ``provision_grendel_socket``,
    ``provision_grendel_api``, ``provision_grendel_token_env``,
    ``provision_state_dir``, ``provision_network``. Each backend reads only its
    own keys (``BackendClass.from_config(config)``) and raises BootError naming
    a bad variable.
    """
    cls: BackendFactory = _lookup(_REGISTRY, name)
    return cls.from_config(config)


def check_backend_settings(name: str, config: Mapping[str, Any]) -> None:
    """Read backend ``name``'s settings from ``config`` as ``get_backend`` would, without connecting;
    raises the backend's error naming the variable."""
    _lookup(_SETTINGS, name)(config)


def site_hosts(
    site: Site,
    nodes: Iterable[Node] | None = None,
    *,
    image_for: Mapping[str, str] | None = None,
    provision: Mapping[str, bool] | None = None,
) -> list[BootHost]:
    """``BootHost`` records of the site's nodes (or ``nodes``).

    ``image_for``: another image for some nodes, by name; ``provision``: the
    provision flag by lower-case name (default True).
    """
    hosts = []
    for node in site.nodes if nodes is None else nodes:
        host = BootHost.from_node(
            node,
            network=site.network,
            default_image=site.default_image,
            provision=(provision or {}).get(node.name.lower(), True),
        )
        if image_for and node.name in image_for:
            host = replace(host, image=image_for[node.name])
        hosts.append(host)
    return hosts


def backend_for(site: Site, name: str | None = None) -> BootBackend:
    """The backend the site chose (``site.settings.boot_backend``), or ``name`` (``--to``)."""
    return get_backend(name or site.settings.boot_backend, site.settings.backend_vars())

"""The site inventory: an Ansible inventory read with Ansible's own machinery.

Racks are the groups named ``rack_<name>`` (``rack_r1`` is rack ``r1``); every
host in a rack group is a node. Variable precedence (group_vars, host_vars,
child groups) is exactly Ansible's because Ansible computes it, and values may
be Jinja templates, rendered by Ansible's templar. The result is a frozen
``Site`` of ``Rack``s and ``Node``s plus the problems found while reading.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import netaddr
from ClusterShell.NodeSet import NodeSet, NodeSetException
from ClusterShell.NodeUtils import GroupResolverError

from provision.catalog import known_images
from provision.errors import InventoryError, ValidationError
from provision.names import HOST_RULE, IMAGE_RULE, host_name_problem, is_exact_image_name
from provision.settings import SiteSettings

RACK_PREFIX = "rack_"
DEFAULT_PASSWORD_ENV = "PROVISION_BMC_PASSWORD"


class BmcProtocol(StrEnum):
    IPMI = "ipmi"
    REDFISH = "redfish"

    @property
    def default_port(self) -> int:
        return 443 if self is BmcProtocol.REDFISH else 623


class RedfishAuth(StrEnum):
    SESSION = "session"  # POST SessionService/Sessions, X-Auth-Token, session deleted at the end
    BASIC = "basic"  # HTTP basic auth on every request


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the inventory, for one node (or the site)."""

    node: str
    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node}: {self.field}: {self.message}; fix: {self.fix}"


class Secret:
    """A value resolved only when revealed; its repr never shows it."""

    __slots__ = ("_resolve", "source")

    def __init__(self, source: str, resolve: Callable[[], str]) -> None:
        self.source = source
        self._resolve = resolve

    def reveal(self) -> str:
        return self._resolve()

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


@dataclass(frozen=True)
class BmcTls:
    """How a Redfish BMC's certificate is checked: the system CAs unless one of these is set."""

    ca_file: str | None = None  # provision_bmc_ca_file: a PEM bundle (the site's CA)
    fingerprint: str | None = None  # provision_bmc_tls_fingerprint: SHA-256 of the certificate (DER), hex
    insecure: bool = False  # provision_bmc_tls_insecure: no check at all (warned about on every run)


@dataclass(frozen=True)
class Bmc:
    address: str
    user: str
    password: Secret = field(repr=False)
    port: int = 623
    protocol: BmcProtocol = BmcProtocol.IPMI
    # Redfish only
    redfish_auth: RedfishAuth = RedfishAuth.SESSION
    tls: BmcTls = field(default_factory=BmcTls)
    system_id: str | None = None  # provision_bmc_system_id: else the single member of /redfish/v1/Systems


@dataclass(frozen=True)
class Node:
    name: str
    rack: str
    mac: str
    ip: str
    image: str | None
    bmc: Bmc | None
    groups: tuple[str, ...] = ()
    console_log: str | None = None  # provision_console_log: the node's serial console log (conserver, the lab)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe view: no secret, not even where it comes from."""
        bmc = None
        if self.bmc is not None:
            bmc = {
                "address": self.bmc.address,
                "port": self.bmc.port,
                "user": self.bmc.user,
                "protocol": str(self.bmc.protocol),
            }
        return {
            "name": self.name,
            "rack": self.rack,
            "mac": self.mac,
            "ip": self.ip,
            "image": self.image,
            "bmc": bmc,
            "groups": list(self.groups),
            "console_log": self.console_log,
        }


@dataclass(frozen=True)
class Rack:
    name: str
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Site:
    path: Path
    racks: tuple[Rack, ...]
    settings: SiteSettings
    images: frozenset[str]
    problems: tuple[Problem, ...] = ()

    @property
    def network(self) -> str | None:
        return self.settings.network

    @property
    def default_image(self) -> str | None:
        return self.settings.default_image

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(n for r in self.racks for n in r.nodes)

    def rack(self, name: str) -> Rack:
        wanted = name.removeprefix(RACK_PREFIX)
        for rack in self.racks:
            if rack.name == wanted:
                return rack
        known = ", ".join(r.name for r in self.racks) or "none"
        raise InventoryError(
            f"--rack: unknown rack {name!r} (racks: {known})",
            hint=f"racks are the inventory groups named {RACK_PREFIX}<name>",
        )

    def select(self, *, rack: str | None = None, nodes: str | None = None, all_nodes: bool = False) -> tuple[Node, ...]:
        """Nodes chosen by --rack, --nodes (a nodeset) and/or --all."""
        if not (rack or nodes or all_nodes):
            raise InventoryError("no nodes selected", hint="choose nodes with --rack r1, --nodes cn[01-04] or --all")
        chosen = list(self.nodes)
        if rack:
            chosen = list(self.rack(rack).nodes)
        if nodes:
            _check_nodeset_size(nodes)
            try:
                wanted = NodeSet(nodes)
                unknown = wanted.difference(NodeSet.fromlist([n.name for n in self.nodes]))
            except (NodeSetException, GroupResolverError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise InventoryError(
                    f"--nodes: {nodes!r} is not a nodeset ({reason})",
                    hint="write a nodeset such as cn[01-04],gpu01 (groups: @group of a configured group source)",
                ) from exc
            if unknown:
                shown = str(unknown) if len(str(unknown)) <= 200 else f"{str(unknown)[:200]}…"
                raise InventoryError(
                    f"--nodes: not in the inventory: {shown}",
                    hint="`provision node list --all` shows the inventory's nodes",
                )
            chosen = [n for n in chosen if n.name in wanted]
        if not chosen:
            raise InventoryError("the selection matches no node", hint="check --rack and --nodes")
        return tuple(chosen)

    def problems_for(self, selected: Iterable[Node]) -> list[Problem]:
        names = {n.name for n in selected} | {"site"}
        return [p for p in self.problems if p.node in names]

    def require_valid(self, selected: Iterable[Node]) -> None:
        problems = self.problems_for(selected)
        if problems:
            raise ValidationError(problems)


_NODESET_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")


def _check_nodeset_size(nodes: str) -> None:
    """Refuse before parsing a nodeset that would name more hosts than any site has (ClusterShell expands ranges)."""
    too_big = len(nodes) > 10_000 or any(
        int(end) - int(begin) >= MAX_RANGE_HOSTS for begin, end in _NODESET_RANGE.findall(nodes)
    )
    if too_big:
        raise InventoryError(
            f"--nodes: {nodes[:60]!r} names more than {MAX_RANGE_HOSTS} hosts",
            hint="write a nodeset of the inventory's nodes, e.g. cn[01-04],gpu01",
        )


# --------------------------------------------------------------------------
# Reading the inventory with Ansible


class _Recorder:
    """Stands in for Ansible's Display while parsing, to keep its messages."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.warnings: list[str] = []

    def error_as_warning(self, msg: str, exception: BaseException, **_: Any) -> None:
        self.failures.append(exception)

    def warning(self, msg: str, *_: Any, **__: Any) -> None:
        self.warnings.append(msg)

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


def _origin(value: object) -> str | None:
    """The file a value came from, per Ansible's data tags."""
    from ansible._internal._datatag._tags import Origin

    origin = Origin.get_tag(value)
    return origin.path if origin and origin.path else None


def _vault_secrets(vault_password_file: str | None) -> list[Any]:
    from ansible.parsing.vault import VaultSecretsContext, get_file_vault_secret

    path = vault_password_file or os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    secrets: list[Any] = []
    if path:
        if not Path(path).is_file():
            raise InventoryError(
                f"vault password file {path} does not exist",
                hint="pass --vault-password-file or set ANSIBLE_VAULT_PASSWORD_FILE",
            )
        from ansible.errors import AnsibleError
        from ansible.parsing.dataloader import DataLoader

        try:
            secret = get_file_vault_secret(filename=path, loader=DataLoader())
            secret.load()
        except AnsibleError as exc:
            raise InventoryError(
                f"vault password file {path}: {_first_line(exc)}",
                hint="put the vault password on the file's first line (or pass another --vault-password-file)",
            ) from exc
        secrets.append(("default", secret))
    if VaultSecretsContext.current(optional=True) is None:
        VaultSecretsContext.initialize(VaultSecretsContext(secrets))
    else:
        VaultSecretsContext.current().secrets[:] = secrets
    return secrets


MAX_RANGE_HOSTS = 100_000
_RANGE = re.compile(r"\[(?P<beg>\d*):(?P<end>\d+)(?::(?P<step>\d+))?\]")


@contextlib.contextmanager
def _checked_host_ranges() -> Iterator[list[str]]:
    """Ansible's host ranges, refused when they name no host (``cn[16:01]``) or too many.

    Yields the refusals, so that the error names the range rather than the last parser tried.
    """
    from ansible.errors import AnsibleError
    from ansible.plugins import inventory as plugins

    expand = plugins.expand_hostname_range
    refused: list[str] = []

    def refuse(message: str) -> AnsibleError:
        refused.append(message)
        return AnsibleError(message)

    def checked(line: str | None = None) -> list[str]:
        match = _RANGE.search(line or "")
        if match:
            beg, end, step = int(match["beg"] or 0), int(match["end"]), int(match["step"] or 1)
            if step < 1 or beg > end:
                raise refuse(f"host range {line!r} names no host (begin must be <= end, step >= 1)")
            if (end - beg) // step >= MAX_RANGE_HOSTS:
                raise refuse(f"host range {line!r} names more than {MAX_RANGE_HOSTS} hosts")
        hosts: list[str] = expand(line)
        if line and not hosts:
            raise refuse(f"host range {line!r} names no host (begin must be <= end)")
        return hosts

    plugins.expand_hostname_range = checked
    try:
        yield refused
    finally:
        plugins.expand_hostname_range = expand


def _read_ansible(path: Path, vault_password_file: str | None) -> tuple[Any, Any, Any]:
    """Parse the inventory; returns (loader, inventory manager, variable manager)."""
    from ansible import constants as C
    from ansible.errors import AnsibleError
    from ansible.inventory import manager as inventory_manager
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    C.INVENTORY_ANY_UNPARSED_IS_FAILED = True
    C.INVENTORY_UNPARSED_IS_FAILED = True
    loader = DataLoader()
    loader.set_vault_secrets(_vault_secrets(vault_password_file))
    recorder = _Recorder()
    saved_display = inventory_manager.display
    inventory_manager.display = recorder
    refused: list[str] = []
    try:
        with _checked_host_ranges() as refused:
            inventory = InventoryManager(loader=loader, sources=[str(path)])
    except AnsibleError as exc:
        cause = recorder.failures[-1] if recorder.failures else exc
        raise InventoryError(
            f"{path}: cannot parse: {refused[0] if refused else _first_line(cause)}",
            hint="write host ranges as [begin:end] with begin <= end, e.g. cn[01:16]"
            if refused
            else "fix the YAML (an Ansible inventory); `ansible-inventory -i PATH --list` shows the same error",
        ) from exc
    finally:
        inventory_manager.display = saved_display
    return loader, inventory, VariableManager(loader=loader, inventory=inventory)


def load(path: str | os.PathLike[str], *, vault_password_file: str | None = None) -> Site:
    """Read a site inventory (a directory or a YAML file) into a Site."""
    from ansible.errors import AnsibleError
    from ansible.template import Templar

    site_path = Path(path)
    if not site_path.exists():
        raise InventoryError(
            f"inventory {site_path} does not exist",
            hint="pass --inventory PATH (a directory with hosts.yml and group_vars/)",
        )
    loader, inventory, variables = _read_ansible(site_path, vault_password_file)
    base_dir = site_path if site_path.is_dir() else site_path.parent

    try:
        from ansible.vars.plugins import get_vars_from_inventory_sources

        all_group = inventory.groups["all"]
        all_vars = all_group.get_vars() | get_vars_from_inventory_sources(loader, [str(site_path)], [all_group], "task")
        site_vars = Templar(loader=loader, variables=all_vars)
        group_vars = {k: v for k, v in all_vars.items() if not k.startswith("provision_bmc_password")}
        hosts: list[tuple[str, str, dict[str, Any], Any]] = []
        problems: list[Problem] = []
        for group_name in sorted(inventory.groups):
            if not group_name.startswith(RACK_PREFIX):
                continue
            for host in inventory.groups[group_name].get_hosts():
                hv = variables.get_vars(host=host, include_hostvars=False)
                hosts.append(
                    (group_name.removeprefix(RACK_PREFIX), host.name, hv, Templar(loader=loader, variables=hv))
                )
    except AnsibleError as exc:
        raise InventoryError(
            f"{site_path}: cannot read variables: {_first_line(exc)}",
            hint="check group_vars/ and host_vars/ (YAML, and the vault password if vaulted)",
        ) from exc

    def render(templar: Any, value: Any) -> Any:
        return templar.template(value) if isinstance(value, str) else value

    site_rendered = _render_site_vars(site_vars, group_vars)
    settings = SiteSettings.from_vars(site_rendered, base_dir)
    network, default_image = settings.network, settings.default_image
    images = known_images(settings.images_dir)

    rack_of: dict[str, list[str]] = {}
    racks: dict[str, list[Node]] = {}
    for rack_name, name, hv, templar in hosts:
        rack_of.setdefault(name, []).append(rack_name)
        racks.setdefault(rack_name, [])
        if len(rack_of[name]) > 1:
            continue
        node, node_problems = _make_node(rack_name, name, hv, templar, images, default_image)
        problems.extend(node_problems)
        racks[rack_name].append(node)

    problems.extend(_site_problems(list(n for ns in racks.values() for n in ns), network, rack_of))
    problems.extend(_backend_problems(settings))
    return Site(
        path=site_path,
        racks=tuple(Rack(r, tuple(ns)) for r, ns in racks.items()),
        settings=settings,
        images=images,
        problems=tuple(problems),
    )


def _render_site_vars(templar: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """group_vars/all rendered where they can be without a host (else kept raw).

    Lookups stay unrendered: they may read secrets (a bind password file) that
    the site's settings must never hold.
    """
    from ansible.errors import AnsibleError

    rendered: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and ("lookup(" in value or "query(" in value):
            rendered[key] = value
            continue
        try:
            rendered[key] = templar.template(value)
        except AnsibleError:
            rendered[key] = value
    return rendered


def _make_node(
    rack: str,
    name: str,
    hv: dict[str, Any],
    templar: Any,
    images: frozenset[str],
    default_image: str | None,
) -> tuple[Node, list[Problem]]:
    from ansible.errors import AnsibleError

    problems: list[Problem] = []

    def get(key: str, default: Any = None) -> Any:
        value = hv.get(key, default)
        if not isinstance(value, str):
            return value
        try:
            return templar.template(value)
        except AnsibleError as exc:
            problems.append(Problem(name, key, f"template failed: {_first_line(exc)}", "fix the Jinja expression"))
            return None

    name_problem = host_name_problem(name)
    if name_problem:
        problems.append(Problem(name, "hostname", name_problem, HOST_RULE))

    def required(key: str, parse: Callable[[Any], str], missing: str, fix: str) -> str:
        """A field every node needs, parsed; "" (and a problem) when missing or wrong."""
        raw = get(key)
        if raw is None or raw == "":
            problems.append(Problem(name, key, "missing", missing))
            return ""
        try:
            return parse(raw)
        except ValueError as exc:
            problems.append(Problem(name, key, str(exc), fix))
            return ""

    mac = required("provision_mac", parse_mac, "set the provisioning NIC's MAC address", MAC_FIX)
    ip = required(
        "provision_ip",
        parse_ip,
        "set the node's address on the provisioning network",
        "write an address such as 10.10.1.11",
    )

    network = get("provision_network")
    if ip and network and not problems_for(problems, "provision_ip"):
        problems.extend(_subnet_problems(name, ip, network))

    image_raw = get("provision_image", default_image)
    image = image_raw if isinstance(image_raw, str) and image_raw else None
    if image_raw and not is_exact_image_name(image_raw):
        image = None
        problems.append(Problem(name, "provision_image", f"{image_raw!r} is not an image name", IMAGE_RULE))
    if image and image not in images:
        known = ", ".join(sorted(images)) or "none"
        problems.append(
            Problem(
                name,
                "provision_image",
                f"unknown image {image!r} (known: {known})",
                "name an image defined under images/",
            )
        )

    bmc, bmc_problems = _make_bmc(name, hv, get, templar)
    problems.extend(bmc_problems)

    groups = tuple(sorted(g for g in hv.get("group_names", ()) if not g.startswith(RACK_PREFIX)))
    console_log = get("provision_console_log")
    if console_log is not None and (not isinstance(console_log, str) or "\0" in console_log):
        problems.append(
            Problem(name, "provision_console_log", f"{console_log!r} is not a path", "write the log file's path")
        )
        console_log = None
    node = Node(
        name=name,
        rack=rack,
        mac=mac,
        ip=ip,
        image=image,
        bmc=bmc,
        groups=groups,
        console_log=str(console_log) if console_log else None,
    )
    return node, problems


MAC_FIX = 'write the NIC\'s six hex pairs in quotes, e.g. provision_mac: "52:54:00:12:34:56"'
_MAC_FORMS = re.compile(
    r"^(?:[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4})$"
)


def parse_mac(value: object) -> str:
    """A NIC's unicast MAC in lower-case colon form; ValueError saying why not."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 52:54:00:12:34:56 as a base-60 integer.
        raise ValueError(f"{value!r} is a number, not a MAC address (YAML reads an unquoted MAC as a number)")
    if not isinstance(value, str) or not _MAC_FORMS.match(value.strip()):
        raise ValueError(f"{value!r} is not a MAC address")
    eui = netaddr.EUI(value.strip(), dialect=netaddr.mac_unix_expanded)
    mac = str(eui).lower()
    if int(eui) == 0:
        raise ValueError(f"{mac} is the all-zero MAC, not a NIC's address")
    if eui.words[0] & 1:
        kind = "broadcast" if int(eui) == 0xFFFFFFFFFFFF else "multicast"
        raise ValueError(f"{mac} is a {kind} MAC, not a NIC's address")
    return mac


def parse_ip(value: object) -> str:
    """A unicast IP address in its canonical form; ValueError saying why not."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    try:
        address = netaddr.IPAddress(value.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError(f"{value!r} is not an IP address") from None
    # Loopback stays allowed: a site's network never holds it (the subnet check refuses it there), and
    # the join service's tests run their nodes on 127.0.0.x.
    if address.is_multicast() or int(address) == 0 or str(address) == "255.255.255.255":
        raise ValueError(f"{address} is not a node's unicast address")
    return str(address)


_BMC_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_BMC_USER = re.compile(r"^[^\s;'\"`$\\]{1,64}$")


def _bmc_port(value: object) -> int | None:
    """A BMC port: an integer (or digits) 1-65535, never a boolean or a fraction."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 < value < 65536:
        return value
    return None


def _bmc_value_problems(name: str, address: object, user: object) -> list[Problem]:
    """The BMC address and user as one string each: no lists, spaces, newlines or shell syntax."""
    problems: list[Problem] = []
    if address and not (isinstance(address, str) and (_is_ip(address) or _BMC_HOST.match(address))):
        problems.append(
            Problem(
                name,
                "provision_bmc_address",
                f"{address!r} is not a host name or IP address",
                "write one address, e.g. 10.20.1.11 or bmc-cn01",
            )
        )
    if user and not (isinstance(user, str | int) and not isinstance(user, bool) and _BMC_USER.match(str(user))):
        problems.append(
            Problem(
                name,
                "provision_bmc_user",
                f"{user!r} is not a user name",
                "write one name without spaces, quotes or ';' (1-64 characters)",
            )
        )
    return problems


def _is_ip(text: str) -> bool:
    try:
        netaddr.IPAddress(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return False
    return True


_Choice = TypeVar("_Choice", bound=StrEnum)


def _choice(
    name: str, get: Callable[..., Any], key: str, default: _Choice, what: str, problems: list[Problem]
) -> _Choice:
    """A closed-set field (a StrEnum member); ``default`` and a problem when the value is not one."""
    raw = get(key, default.value)
    try:
        return type(default)(str(raw).lower())
    except ValueError:
        known = ", ".join(member.value for member in type(default))
        problems.append(Problem(name, key, f"unknown {what} {raw!r}", f"use one of: {known}"))
        return default


def _make_bmc(name: str, hv: dict[str, Any], get: Callable[..., Any], templar: Any) -> tuple[Bmc | None, list[Problem]]:
    """The node's BMC fields (``provision_bmc_*``) and what is wrong with them."""
    problems: list[Problem] = []
    address = get("provision_bmc_address")
    user = get("provision_bmc_user")
    protocol = _choice(name, get, "provision_bmc_protocol", BmcProtocol.IPMI, "protocol", problems)
    if not address:
        problems.append(Problem(name, "provision_bmc_address", "missing", "set the BMC's address (host or IP)"))
    if not user:
        problems.append(Problem(name, "provision_bmc_user", "missing", "set the BMC user name"))
    port_raw = get("provision_bmc_port", protocol.default_port)
    port = _bmc_port(port_raw)
    if port is None:
        port = protocol.default_port
        problems.append(
            Problem(name, "provision_bmc_port", f"{port_raw!r} is not a port", "use 1-65535 (IPMI: 623, Redfish: 443)")
        )
    value_problems = _bmc_value_problems(name, address, user)
    problems.extend(value_problems)
    if value_problems:
        address = user = None
    auth = RedfishAuth.SESSION
    tls = BmcTls()
    system_id = None
    if protocol is BmcProtocol.REDFISH:
        auth, tls, system_id = _redfish_fields(name, get, problems)
    password, password_problem = _password(name, hv, templar)
    if password_problem:
        problems.append(password_problem)
    if not (address and user):
        return None, problems
    bmc = Bmc(
        address=str(address),
        user=str(user),
        password=password,
        port=port,
        protocol=protocol,
        redfish_auth=auth,
        tls=tls,
        system_id=system_id,
    )
    return bmc, problems


_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def _redfish_fields(
    name: str, get: Callable[..., Any], problems: list[Problem]
) -> tuple[RedfishAuth, BmcTls, str | None]:
    auth = _choice(name, get, "provision_bmc_redfish_auth", RedfishAuth.SESSION, "auth", problems)
    ca_file = get("provision_bmc_ca_file")
    ca = str(ca_file) if ca_file else None
    if ca and not Path(ca).is_file():
        problems.append(
            Problem(name, "provision_bmc_ca_file", f"{ca} is not a file", "point it at the PEM bundle of the BMCs' CA")
        )
    raw_fp = get("provision_bmc_tls_fingerprint")
    fingerprint = None
    if raw_fp:
        fingerprint = str(raw_fp).replace(":", "").strip().lower()
        if not _FINGERPRINT.match(fingerprint):
            problems.append(
                Problem(
                    name,
                    "provision_bmc_tls_fingerprint",
                    f"{raw_fp!r} is not a SHA-256 fingerprint",
                    "64 hex digits, colons allowed: openssl x509 -noout -fingerprint -sha256 -in bmc.pem",
                )
            )
    insecure_raw = get("provision_bmc_tls_insecure", False)
    if not isinstance(insecure_raw, bool):
        problems.append(
            Problem(name, "provision_bmc_tls_insecure", f"{insecure_raw!r} is not a boolean", "use true or false")
        )
    insecure = insecure_raw is True
    if sum(bool(x) for x in (ca, fingerprint, insecure)) > 1:
        problems.append(
            Problem(
                name,
                "provision_bmc_tls_insecure" if insecure else "provision_bmc_tls_fingerprint",
                "more than one of provision_bmc_ca_file, provision_bmc_tls_fingerprint, provision_bmc_tls_insecure",
                "choose one way to check the BMC's certificate",
            )
        )
    system_raw = get("provision_bmc_system_id")
    system_id = str(system_raw) if system_raw not in (None, "") else None
    if system_id is not None and not re.match(r"^[A-Za-z0-9._:-]{1,128}$", system_id):
        problems.append(
            Problem(
                name,
                "provision_bmc_system_id",
                f"{system_raw!r} is not a Redfish system id",
                "the last part of the system's /redfish/v1/Systems/<id> path",
            )
        )
        system_id = None
    return auth, BmcTls(ca_file=ca, fingerprint=fingerprint, insecure=insecure), system_id


def _password(name: str, hv: dict[str, Any], templar: Any) -> tuple[Secret, Problem | None]:
    """The BMC password: a vaulted variable, else an environment variable."""
    from ansible.parsing.vault import EncryptedString, VaultHelper

    value = hv.get("provision_bmc_password")
    if value is not None:
        vaulted = isinstance(value, EncryptedString) or VaultHelper.get_ciphertext(value, with_tags=False)
        origin = _origin(value)
        if not vaulted and origin and not _is_vault_file(origin):
            return Secret("plain", lambda: ""), Problem(
                name,
                "provision_bmc_password",
                f"stored in plain text in {origin}",
                "encrypt it (ansible-vault encrypt_string) or use the environment variable named by provision_bmc_password_env",
            )

        if vaulted and not _vault_available():
            return Secret("vault", lambda: ""), Problem(
                name,
                "provision_bmc_password",
                "vaulted, but no vault password was given",
                "pass --vault-password-file or set ANSIBLE_VAULT_PASSWORD_FILE",
            )

        def from_vault() -> str:
            from ansible.errors import AnsibleError

            from provision.errors import BmcError

            try:
                return str(templar.template(value))
            except AnsibleError as exc:
                raise BmcError(
                    f"{name}: provision_bmc_password: cannot decrypt ({_first_line(exc)})",
                    hint="check the vault password file (--vault-password-file)",
                ) from exc

        return Secret("vault", from_vault), None

    env_name = str(hv.get("provision_bmc_password_env") or DEFAULT_PASSWORD_ENV)

    def from_env() -> str:
        from provision.errors import BmcError

        secret = os.environ.get(env_name)
        if not secret:
            raise BmcError(
                f"{name}: BMC password not set (environment variable {env_name} is empty)",
                hint=f"export {env_name}, or set provision_bmc_password in a vault file",
            )
        return secret

    return Secret(f"env:{env_name}", from_env), None


def _vault_available() -> bool:
    from ansible.parsing.vault import VaultSecretsContext

    context = VaultSecretsContext.current(optional=True)
    return bool(context is not None and context.secrets)


def _is_vault_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(14) == b"$ANSIBLE_VAULT"
    except OSError:
        return False


def _site_problems(nodes: list[Node], network: Any, rack_of: dict[str, list[str]]) -> list[Problem]:
    problems: list[Problem] = []
    for name, racks in rack_of.items():
        if len(racks) > 1:
            problems.append(
                Problem(
                    name,
                    "hostname",
                    f"listed in more than one rack: {', '.join(racks)}",
                    "keep each node in one rack group",
                )
            )
    lower = Counter(n.name.lower() for n in nodes)
    for node in nodes:
        if lower[node.name.lower()] > 1 and node.name != node.name.lower():
            problems.append(
                Problem(
                    node.name,
                    "hostname",
                    "duplicates another node's name (DNS names ignore case)",
                    "rename one of them",
                )
            )

    def duplicates(attr: str, field_name: str) -> None:
        seen: dict[str, str] = {}
        for node in nodes:
            value = getattr(node, attr)
            if not value:
                continue
            if value in seen:
                problems.append(
                    Problem(
                        node.name, field_name, f"{value} is already used by {seen[value]}", "give each node its own"
                    )
                )
            else:
                seen[value] = node.name

    duplicates("mac", "provision_mac")
    duplicates("ip", "provision_ip")

    if not network:
        problems.append(
            Problem("site", "provision_network", "missing", "set the provisioning subnet (CIDR) in group_vars/all")
        )
    if not nodes:
        problems.append(
            Problem(
                "site",
                "racks",
                "no node: no group named rack_<name> lists a host",
                "list the nodes under all.children.rack_<name>.hosts in hosts.yml",
            )
        )
    return problems


def _backend_problems(settings: SiteSettings) -> list[Problem]:
    """The site's boot settings as its chosen backend reads them (the same parser `boot serve` runs)."""
    from provision.boot.base import check_backend_settings
    from provision.errors import ProvisionError

    if not settings.network:
        return []  # reported once, above
    try:
        # Each backend's own settings parser, without connecting: `grendel export` works with no API configured.
        check_backend_settings(settings.boot_backend, settings.backend_vars())
    except ProvisionError as exc:
        field_name, _, message = exc.message.partition(": ")
        if not message or " " in field_name:
            field_name, message = f"provision_boot_backend ({settings.boot_backend})", exc.message
        return [Problem("site", field_name, message, exc.hint or "fix it in group_vars/all")]
    return []


def problems_for(problems: list[Problem], field_name: str) -> bool:
    return any(p.field == field_name for p in problems)


def _subnet_problems(name: str, ip: str, network: Any) -> list[Problem]:
    try:
        subnet = netaddr.IPNetwork(str(network))
    except (netaddr.AddrFormatError, ValueError):
        return [Problem(name, "provision_network", f"{network!r} is not a CIDR", "write e.g. 10.10.0.0/16")]
    address = netaddr.IPAddress(ip)
    if address not in subnet or (subnet.size > 2 and address in (subnet.network, subnet.broadcast)):
        return [
            Problem(
                name,
                "provision_ip",
                f"{ip} is outside the provisioning subnet {subnet}",
                f"use a host address in {subnet}",
            )
        ]
    return []

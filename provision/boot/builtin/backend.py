"""``BuiltinBackend``: the built-in boot service (dnsmasq + iPXE + nginx on this node) behind ``BootBackend``.

It keeps the registry (``registry``), renders what the services read
(``render``) and runs them (``services``). Image versions: ``add_version``
registers a version as servable; nodes boot the *active* version, which
changes only through ``activate`` (``put_images`` = add + activate). Older
versions stay servable, so ``activate(name, previous)`` is a rollback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import netaddr

from provision.boot.base import (
    PREPARE,
    BackendName,
    BootHost,
    BootImage,
    Prepared,
    PrepareOptions,
    Published,
    ServiceStatus,
    check_host_name,
    check_image_name,
    site_hosts,
    summary_of,
    sync_hosts,
)
from provision.boot.builtin import registry
from provision.boot.builtin.config import BuiltinConfig, DhcpMode
from provision.boot.builtin.layout import Layout
from provision.boot.builtin.registry import ImageVersionRecord, Registry, is_version, read_tokens, save_tokens
from provision.boot.builtin.render import Renderer
from provision.boot.builtin.services import Services
from provision.boot.events import BootEvent, read_events
from provision.errors import BootError

if TYPE_CHECKING:
    from provision.image.store import ImageStore, ImageVersion
    from provision.inventory import Node, Site


class BuiltinBackend(Layout):
    """dnsmasq + iPXE + nginx on this node, driven through ``BootBackend``; the paths are ``Layout``'s."""

    name = BackendName.BUILTIN.value

    def __init__(self, config: BuiltinConfig) -> None:
        super().__init__(config.state_dir)
        self.config = config
        self.renderer = Renderer(config, self)
        self.services = Services(config, self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BuiltinBackend:
        return cls(BuiltinConfig.from_vars(config))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Registry]:
        with registry.locked(self) as reg:
            yield reg

    def _read(self) -> Registry:
        return Registry.load(self.registry_path)

    def _render(self, reg: Registry) -> None:
        self.services.reload(self.renderer.write(reg, read_tokens(self.tokens_path)))

    def render(self) -> None:
        """Write every config, script and image link from the registry (a running service is only reloaded)."""
        with self._locked() as reg:
            self._render(reg)

    # -- identity ---------------------------------------------------------
    def describe(self) -> str:
        where = f" in netns {self.config.netns}" if self.config.netns else ""
        return f"built-in (dnsmasq {self.config.dhcp_mode} DHCP + iPXE + nginx at {self.config.base_url}{where}; state {self.root})"

    def ping(self) -> None:
        down = [str(s.service) for s in self.status() if not s.running]
        if down:
            raise BootError(f"built-in boot backend: not running: {', '.join(down)}", hint="run `provision boot serve`")

    def close(self) -> None:
        """Nothing held: the services outlive this object (``stop`` ends them)."""

    # -- serving ----------------------------------------------------------
    def prepare(self, site: Site, nodes: Sequence[Node], how: PrepareOptions = PREPARE) -> Prepared:
        """Check ``nodes``, write their hosts and images; then start or reload the services (``how.serve``)."""
        site.require_valid(nodes)
        known = {h.name: h for h in self.list_hosts()}
        provision = {n: h.provision for n, h in known.items()}
        hosts = site_hosts(site, nodes, image_for=how.image_for, provision=provision)
        plan = sync_hosts(self, hosts)
        gone = self.remove_hosts(sorted(set(known) - {n.name.lower() for n in site.nodes}))
        wanted = sorted({h.image for h in hosts if h.image})
        images = {name: self._sync_image(name, how.activate) for name in wanted}
        services = tuple(self.serve()) if how.serve else ()
        return Prepared(plan.to_write, tuple(gone), images, services, self.config.base_url)

    def _sync_image(self, name: str, activate: bool) -> str:
        store = self.config.image_store
        if store is None or not (store / name / "current").exists():
            return "not published"
        record = self.add_store_version(store, name, activate=activate)
        _, active = self.versions(name)
        return f"{record.version} ({'active' if active == record.version else f'servable; active {active}'})"

    def serve(self) -> list[ServiceStatus]:
        """Render, then start what is not running, restart what runs an older config. Idempotent."""
        self.services.check_prerequisites()
        self.render()
        self.services.start()
        return self.status()

    def stop(self) -> list[str]:
        """Stop dnsmasq and nginx; returns what was running. Safe to run twice."""
        return self.services.stop()

    def status(self) -> list[ServiceStatus]:
        return self.services.status()

    def summary(self) -> dict[str, Any]:
        reg = self._read()
        images = {n: {"active": reg.active.get(n), "versions": sorted(vs)} for n, vs in sorted(reg.versions.items())}
        return {**summary_of(self, list(reg.hosts.values()), images), "pinned": dict(sorted(reg.pinned.items()))}

    def boot_events(self, hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
        """The DHCP/TFTP/HTTP timeline so far, from dnsmasq's and nginx's logs (``provision.boot.events``)."""
        return read_events(self.dnsmasq_log, self.http_access_log, hosts)

    def publish(self, store: ImageStore, image: ImageVersion, *, activate: bool, dry_run: bool) -> Published:
        """Record the version (served from the store where it is); nodes boot it once active.

        The first version of an image is active at once; the previous one stays servable.
        """
        _, active = self.versions(image.name)
        if not dry_run:
            self.add_store_version(store.root, image.name, image.version, activate=activate)
        return Published(image.name, image.version, self.name, activate or active is None, self.describe())

    def is_published(self, name: str) -> bool:
        """In the image store (``prepare`` registers it) or already registered here."""
        store = self.config.image_store
        if store is not None and (Path(store) / name / "current").exists():
            return True
        return bool(self.versions(name)[1])

    # -- images -----------------------------------------------------------
    def list_images(self) -> list[BootImage]:
        reg = self._read()
        return [reg.versions[n][v].boot_image(n) for n, v in sorted(reg.active.items()) if v in reg.versions.get(n, {})]

    def get_image(self, name: str) -> BootImage | None:
        reg = self._read()
        name = check_image_name(name)
        version = reg.active.get(name)
        return reg.versions[name][version].boot_image(name) if version else None

    def put_images(self, images: Sequence[BootImage]) -> None:
        """Register each image's files as a version (named after their directory) and make it active."""
        records = [(img.name, self._version_of(img)) for img in images]
        for name, record in records:
            record.check_files(name)
        with self._locked() as reg:
            for name, record in records:
                reg.versions.setdefault(name, {})[record.version] = record
                reg.active[name] = record.version
            self._render(reg)

    @staticmethod
    def _version_of(image: BootImage) -> ImageVersionRecord:
        kernel = Path(image.kernel)
        version = kernel.parent.name if is_version(kernel.parent.name) else "default"
        return ImageVersionRecord.of_files(
            image.name, version, kernel=kernel, initrds=list(image.initrds), squashfs=image.squashfs,
            cmdline=image.cmdline,
        )  # fmt: skip

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
        record = ImageVersionRecord.of_files(
            name, version, kernel=kernel, initrds=list(initrds), squashfs=squashfs, cmdline=cmdline
        )
        record.check_files(name)
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
            known[version].check_files(name)
            reg.active[name] = version
            self._render(reg)

    def versions_of(self, name: str) -> tuple[tuple[str, ...], str | None]:
        reg = self._read()
        name = check_image_name(name)
        return tuple(sorted(reg.versions.get(name, {}))), reg.active.get(name)

    def _image_of(self, host: BootHost) -> str | None:
        return host.image or self.config.default_image

    def assign_version(self, names: Sequence[str], version: str | None) -> dict[str, str]:
        """Pin each node to ``version`` of its image (None: back to the active version); what each boots next."""
        with self._locked() as reg:
            for name in map(check_host_name, names):
                host = reg.hosts.get(name)
                image = self._image_of(host) if host else None
                if host is None or image is None:
                    raise BootError(f"{name}: not a host with an image here", hint="run `provision node sync` first")
                if version is None:
                    reg.pinned.pop(name, None)
                    continue
                known = reg.versions.get(image, {})
                if version not in known:
                    listed = ", ".join(sorted(known)) or "none"
                    raise BootError(f"image {image}: version {version!r} is not registered (known: {listed})",
                                    hint=f"provision image publish {image} --version {version}")  # fmt: skip
                known[version].check_files(image)
                reg.pinned[name] = version
            self._render(reg)
            return self._next(reg, names)

    def next_versions(self, names: Sequence[str]) -> dict[str, str]:
        return self._next(self._read(), names)

    def _next(self, reg: Registry, names: Sequence[str]) -> dict[str, str]:
        result = {}
        for name in map(check_host_name, names):
            host = reg.hosts.get(name)
            image = self._image_of(host) if host else None
            version = reg.pinned.get(name) or (reg.active.get(image) if image else None)
            if version:
                result[name] = version
        return result

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
            pinned = sorted(h for h, v in reg.pinned.items() if v == version and h in reg.hosts
                            and self._image_of(reg.hosts[h]) == name)  # fmt: skip
            if pinned:
                raise BootError(f"image {name}: version {version} is pinned for {', '.join(pinned)}",
                                hint="finish or roll back the rollout first")  # fmt: skip
            found = reg.versions.get(name, {}).pop(version, None) is not None
            if found:
                self._render(reg)
        return found

    # -- hosts ------------------------------------------------------------
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
            tokens = read_tokens(self.tokens_path)
            for host in hosts:
                reg.hosts[host.name] = host
                if self.config.boot_tokens and host.provision and host.name not in tokens:
                    tokens[host.name] = secrets.token_urlsafe(24)
            save_tokens(self.tokens_path, tokens)
            self._render(reg)

    @contextlib.contextmanager
    def _editing(self) -> Iterator[tuple[Registry, dict[str, str], list[str]]]:
        """The registry and the tokens under the lock; saved and rendered once a name is added to the list."""
        with self._locked() as reg:
            tokens = read_tokens(self.tokens_path)
            changed: list[str] = []
            yield reg, tokens, changed
            if changed:
                save_tokens(self.tokens_path, tokens)
                self._render(reg)

    def remove_hosts(self, names: Sequence[str]) -> list[str]:
        with self._editing() as (reg, tokens, removed):
            for name in map(check_host_name, names):
                if reg.hosts.pop(name, None) is not None:
                    tokens.pop(name, None)
                    reg.pinned.pop(name, None)
                    removed.append(name)
        return removed

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        with self._editing() as (reg, tokens, changed):
            for name in map(check_host_name, names):
                host = reg.hosts.get(name)
                if host is None or host.provision == provision:
                    continue
                reg.hosts[name] = host.with_provision(provision)
                if provision and self.config.boot_tokens:
                    tokens[name] = secrets.token_urlsafe(24)  # a fresh single-use token per provisioning
                else:
                    tokens.pop(name, None)
                changed.append(name)
        return changed

    def rotate_token(self, name: str, token: str) -> bool:
        """True once for the token the node booted with; its script then carries a new one for its next boot."""
        name = check_host_name(name)
        if not self.config.boot_tokens:
            return False
        with self._editing() as (_, tokens, changed):
            expected = tokens.get(name)
            if expected is not None and secrets.compare_digest(expected.encode(), token.encode()):
                tokens[name] = secrets.token_urlsafe(24)
                changed.append(name)
        return bool(changed)


if TYPE_CHECKING:
    from provision.boot.base import BootBackend

    def _implements(backend: BuiltinBackend) -> BootBackend:  # mypy checks the Protocol here
        return backend

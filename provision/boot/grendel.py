"""The Grendel boot backend: ``BootBackend`` over ``provision.grendel.GrendelClient``.

Inventory variables (group_vars), read by ``GrendelSettings.from_config``:

=================================  ==========================================================
``provision_boot_backend``         ``grendel`` selects this backend (default ``builtin``)
``provision_grendel_socket``       API unix socket, e.g. ``/var/run/grendel/grendel-api.socket``
``provision_grendel_url``          or a TCP API, e.g. ``http://grendel:6667`` / ``https://…:8080``
``provision_grendel_api``          ``auto`` (probe, default), ``classic`` (fork 0.8.x, ubccr
                                   v0.0.x) or ``v2`` (ubccr v0.2.x)
``provision_grendel_token_env``    environment variable holding the v0.2 JWT
                                   (default ``PROVISION_GRENDEL_TOKEN``; unused on the socket)
``provision_grendel_ca_file``      CA bundle for an https URL
``provision_grendel_tls_verify``   ``false`` to skip certificate checks (default ``true``)
``provision_grendel_insecure_http`` ``true`` to send the token over plain ``http://`` to a
                                   non-loopback server (refused otherwise)
``provision_grendel_timeout``      seconds per request (default 30)
``provision_grendel_firmware``     iPXE build for every host, e.g. ``snponly-x86_64.efi``
``provision_grendel_domain``       appended to host names for the boot NIC's ``fqdn``
``provision_grendel_repo_dir``     Grendel's ``provision.repo_dir`` (default ``/var/lib/grendel``)
``provision_grendel_images``       per image: ``{kernel, initrds, squashfs, cmdline}`` overrides
``provision_grendel_cmdline_extra``  appended to the default kernel command line
=================================  ==========================================================
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.boot.base import (
    PREPARE,
    BackendName,
    Prepared,
    PrepareOptions,
    Published,
    ServiceStatus,
    check_image_name,
    site_hosts,
    summary_of,
    sync_hosts,
)
from provision.errors import BootError
from provision.grendel import (
    GrendelClient,
    GrendelSettings,
    host_from_doc,
    host_to_doc,
    image_for_export,
    image_from_doc,
    image_to_doc,
)

if TYPE_CHECKING:
    from provision.boot.base import BootHost, BootImage  # the records the Grendel client builds
    from provision.boot.events import BootEvent
    from provision.image.store import ImageStore, ImageVersion
    from provision.inventory import Node, Site

log = logging.getLogger(__name__)


class GrendelBackend:
    """Hosts and images kept in a Grendel server (classic or v0.2 API)."""

    name = BackendName.GRENDEL.value

    def __init__(
        self, settings: GrendelSettings, client: GrendelClient | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.client = client or GrendelClient(settings)
        self.config: Mapping[str, Any] = config or {}  # provision_grendel_images, provision_grendel_cmdline_extra

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GrendelBackend:
        if str(config.get("provision_join_trust") or "").lower() == "token":
            raise BootError(
                "provision_join_trust: token needs the built-in boot backend (its iPXE scripts carry the tokens)",
                hint="use provision_join_trust: console (the nodes' console logs) with Grendel",
            )
        return cls(GrendelSettings.from_config(config), config=config)

    def describe(self) -> str:
        return f"grendel ({self.client.known_api} API) at {self.settings.where}"

    def ping(self) -> None:
        self.client.list_images()

    # -- serving: Grendel runs elsewhere; this side syncs and checks ----------
    def prepare(self, site: Site, nodes: Sequence[Node], how: PrepareOptions = PREPARE) -> Prepared:
        """Write the nodes' hosts (only what differs) and report their images; ``activate`` has no meaning here."""
        site.require_valid(nodes)
        hosts = site_hosts(site, nodes, image_for=how.image_for)
        plan = sync_hosts(self, hosts)  # hosts not in the inventory stay: Grendel may serve others too
        images = {
            name: "registered" if self.is_published(name) else "not registered"
            for name in sorted({h.image for h in hosts if h.image})
        }
        return Prepared(plan.to_write, (), images, tuple(self.status()), self.settings.where)

    def serve(self) -> list[ServiceStatus]:
        """Nothing to start here: check that Grendel answers."""
        self.ping()
        return self.status()

    def rotate_token(self, name: str, token: str) -> bool:
        """Grendel hands out no boot tokens (``from_config`` refuses the token policy)."""
        return False

    def stop(self) -> list[str]:
        """Grendel is not run by provision: nothing to stop."""
        return []

    def status(self) -> list[ServiceStatus]:
        try:
            self.ping()
        except BootError as exc:
            return [ServiceStatus("grendel", False, None, f"{self.settings.where}: {exc.message}")]
        return [ServiceStatus("grendel", True, None, f"{self.client.known_api} API at {self.settings.where}")]

    def summary(self) -> dict[str, Any]:
        images = {i.name: {"active": "registered", "versions": []} for i in self.list_images()}
        return summary_of(self, self.list_hosts(), images)

    def boot_events(self, hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
        """Grendel's logs are on its own server: no events here."""
        return []

    def is_published(self, name: str) -> bool:
        return self.get_image(name) is not None

    # Grendel serves one version per image name: there is nothing to pin a node to.
    def versions_of(self, image: str) -> tuple[tuple[str, ...], str | None]:
        return (), None

    def assign_version(self, names: Sequence[str], version: str | None) -> dict[str, str]:
        raise BootError(
            "Grendel serves one version per image: per-node versions (a rolling re-image) are not possible with it",
            hint="roll out with provision_boot_backend: builtin, or publish the version to every node at once",
        )

    def next_versions(self, names: Sequence[str]) -> dict[str, str]:
        return {}

    def images_for(self, names: Sequence[str]) -> list[BootImage]:
        """The Grendel images ``names``: ``provision_grendel_images`` or the repo layout."""
        return [image_for_export(name, self.config, self.settings.repo_dir) for name in names]

    def register_images(self, names: Sequence[str], *, dry_run: bool = False) -> list[BootImage]:
        """Register ``names`` through the API; their files must already be in Grendel's repo directory."""
        images = self.images_for(names)
        if not dry_run and images:
            self.put_images(images)
        return images

    def publish(self, store: ImageStore, image: ImageVersion, *, activate: bool, dry_run: bool) -> Published:
        """Copy the version's files into Grendel's ``repo_dir`` (atomically) and register the image.

        Grendel serves one version per image: nodes boot it from their next boot on.
        """
        boot_image = self.images_for([image.name])[0]
        repo = Path(self.settings.repo_dir)
        if not repo.is_dir():
            raise BootError(
                f"Grendel's repo directory {repo} is not on this machine",
                hint="run on the Grendel host, mount its repo_dir, or set provision_grendel_repo_dir",
            )
        copies = [(image.kernel, Path(boot_image.kernel))]
        copies += [(image.initrd, Path(p)) for p in boot_image.initrds[:1]]
        if boot_image.squashfs:
            copies.append((image.squashfs, Path(boot_image.squashfs)))
        if not dry_run:
            for source, target in copies:
                _copy_atomic(source, target)
            self.register_images([image.name])
        return Published(image.name, image.version, self.name, True, self.settings.where)

    def list_images(self) -> list[BootImage]:
        return [image_from_doc(d) for d in self.client.list_images()]

    def get_image(self, name: str) -> BootImage | None:
        doc = self.client.find_image(name)
        return image_from_doc(doc) if doc else None

    def put_images(self, images: Sequence[BootImage]) -> None:
        self.client.store_images([image_to_doc(i) for i in images])

    def remove_images(self, names: Sequence[str]) -> list[str]:
        return [n for n in (check_image_name(x) for x in names) if self.client.delete_image(n)]

    def list_hosts(self) -> list[BootHost]:
        return _hosts(self.client.list_hosts())

    def get_hosts(self, names: Sequence[str]) -> list[BootHost]:
        if not names:
            return []
        return _hosts(self.client.find_hosts(names))

    def put_hosts(self, hosts: Sequence[BootHost]) -> None:
        """Write whole host documents, as Grendel stores them: what BootHost does not
        model (extra NICs, bonds, VLAN, MTU) is not kept for the hosts written."""
        self.client.store_hosts(
            [host_to_doc(h, firmware=self.settings.firmware, domain=self.settings.domain) for h in hosts]
        )

    def remove_hosts(self, names: Sequence[str]) -> list[str]:
        return self.client.delete_hosts(names) if names else []

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        return self.client.set_provision(names, provision) if names else []

    def close(self) -> None:
        self.client.close()


def _hosts(docs: Sequence[Mapping[str, Any]]) -> list[BootHost]:
    """BootHosts of Grendel documents; documents this model cannot hold are skipped, with a warning.

    Grendel's file loader validates nothing and its MACs may be 20-byte IPoIB
    addresses, so a foreign host must not break listing everyone else.
    """
    hosts = []
    for doc in docs:
        try:
            hosts.append(host_from_doc(doc))
        except BootError as exc:
            log.warning("grendel: skipping host %r: %s", doc.get("name"), exc.message)
    return sorted(hosts, key=lambda h: h.name)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy beside ``target`` and rename into place, so Grendel never serves half a kernel."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BootError(f"cannot copy {source.name} to {target}: {exc.strerror}", hint="check the directory") from exc


if TYPE_CHECKING:
    from provision.boot.base import BootBackend

    def _implements(backend: GrendelBackend) -> BootBackend:  # mypy checks the Protocol here
        return backend

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
from collections.abc import Mapping, Sequence
from typing import Any

from provision.boot.base import BackendName, BootHost, BootImage, check_image_name
from provision.errors import BootError
from provision.grendel import (
    GrendelClient,
    GrendelSettings,
    host_from_doc,
    host_to_doc,
    image_from_doc,
    image_to_doc,
)

log = logging.getLogger(__name__)


class GrendelBackend:
    """Hosts and images kept in a Grendel server (classic or v0.2 API)."""

    name = BackendName.GRENDEL.value

    def __init__(self, settings: GrendelSettings, client: GrendelClient | None = None) -> None:
        self.settings = settings
        self.client = client or GrendelClient(settings)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GrendelBackend:
        return cls(GrendelSettings.from_config(config))

    def describe(self) -> str:
        return f"grendel ({self.client.known_api} API) at {self.settings.where}"

    def ping(self) -> None:
        self.client.list_images()

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

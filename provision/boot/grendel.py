"""The Grendel boot backend: ``BootBackend`` over ``provision.grendel.GrendelClient``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from provision.boot.base import BackendName, BootHost, BootImage, check_image_name
from provision.grendel import (
    GrendelClient,
    GrendelSettings,
    host_from_doc,
    host_to_doc,
    image_from_doc,
    image_to_doc,
)


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
        return sorted((host_from_doc(d) for d in self.client.list_hosts()), key=lambda h: h.name)

    def get_hosts(self, names: Sequence[str]) -> list[BootHost]:
        if not names:
            return []
        return sorted((host_from_doc(d) for d in self.client.find_hosts(names)), key=lambda h: h.name)

    def put_hosts(self, hosts: Sequence[BootHost]) -> None:
        self.client.store_hosts(
            [host_to_doc(h, firmware=self.settings.firmware, domain=self.settings.domain) for h in hosts]
        )

    def remove_hosts(self, names: Sequence[str]) -> list[str]:
        return self.client.delete_hosts(names) if names else []

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        return self.client.set_provision(names, provision) if names else []

    def close(self) -> None:
        self.client.close()

"""Serving a site's nodes: the boot backend and the join service, in one place.

``provision boot serve``, ``provision lab up`` and ``provision node boot``
all call ``serve``: the backend is prepared for the nodes (hosts, image,
services), then their join bundles are rendered and the join service kept
up (``provision.service.site``). ``stop`` undoes what ``serve`` started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from provision.boot.base import BootBackend, Prepared, PrepareOptions, backend_for
from provision.inventory import Node, Site
from provision.service import site as join_service
from provision.service.site import JoinPrepared


@dataclass(frozen=True)
class Served:
    boot: Prepared
    join: JoinPrepared

    def as_dict(self) -> dict[str, Any]:
        return {"sync": self.boot.as_dict(), "join": self.join.as_dict()}


def serve(
    site: Site,
    nodes: Sequence[Node],
    *,
    backend: BootBackend | None = None,
    image_for: Mapping[str, str] | None = None,
    activate: bool = True,
    vault_password_file: str | None = None,
) -> Served:
    """The boot backend ready for ``nodes``, their join bundles rendered, the join service up."""
    backend = backend or backend_for(site)
    prepared = backend.prepare(site, nodes, PrepareOptions(image_for=dict(image_for or {}), activate=activate))
    joined = join_service.prepare(site, nodes, vault_password_file=vault_password_file)
    return Served(prepared, joined)


def stop(site: Site, backend: BootBackend | None = None) -> list[str]:
    """Stop the boot services and the join service provision started; what was running."""
    stopped = (backend or backend_for(site)).stop()
    if join_service.stop(site):
        stopped.append("join service")
    return stopped

"""The join service for a site: render the selection's bundles, keep the service up.

``prepare`` is what ``provision node boot`` and ``provision boot serve`` call
after the boot backend is ready: ``playbooks/bundle.yml`` renders each
selected node's bundle (the join roles' own tasks and templates, written
under ``<state dir>/service/bundles/<node>/``), then the service is started
or restarted when what it loaded changed — unless the site runs it from its
own systemd unit (``provision_join_service_managed: false``) or pushes the
join over SSH (``provision_join_mode: push``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from provision.ansible import TaskEvent
from provision.catalog import PLAYBOOKS_DIR
from provision.inventory import Node, Site
from provision.join import JoinResult, run_per_node
from provision.service.daemon import JoinDaemon
from provision.service.settings import JoinMode, JoinSettings

BUNDLE_PLAYBOOK = PLAYBOOKS_DIR / "bundle.yml"


@dataclass(frozen=True)
class JoinPrepared:
    mode: JoinMode
    url: str | None = None
    pid: int | None = None
    rendered: tuple[JoinResult, ...] = field(default=())

    @property
    def failed(self) -> dict[str, str]:
        return {r.node: r.error for r in self.rendered if not r.ok}

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "url": self.url,
            "pid": self.pid,
            "rendered": [r.node for r in self.rendered if r.ok],
            "failed": self.failed,
        }


def render_bundles(
    site: Site,
    nodes: Sequence[Node],
    *,
    vault_password_file: str | None = None,
    on_event: Callable[[TaskEvent], None] | None = None,
) -> list[JoinResult]:
    """``playbooks/bundle.yml`` for ``nodes``: one result per node (a failure stays with its node)."""
    settings = JoinSettings.from_site(site)
    return run_per_node(
        BUNDLE_PLAYBOOK,
        site.path,
        [n.name for n in nodes],
        extravars={**site.settings.playbook_vars(), "join_bundle_dir": str(settings.bundles_dir)},
        vault_password_file=vault_password_file,
        on_event=on_event,
    )


def prepare(
    site: Site,
    nodes: Sequence[Node],
    *,
    vault_password_file: str | None = None,
    on_event: Callable[[TaskEvent], None] | None = None,
) -> JoinPrepared:
    """Bundles for ``nodes``, and the service running (when provision manages it)."""
    settings = JoinSettings.from_site(site)
    if settings.mode is JoinMode.PUSH:
        return JoinPrepared(JoinMode.PUSH)
    rendered = render_bundles(site, nodes, vault_password_file=vault_password_file, on_event=on_event)
    pid = None
    if settings.managed:
        pid = JoinDaemon(site, netns=site.settings.boot_netns, vault_password_file=vault_password_file).ensure()
    return JoinPrepared(JoinMode.AGENT, settings.url, pid, tuple(rendered))


def start(site: Site, *, vault_password_file: str | None = None) -> tuple[int, str]:
    """Start (or keep) the service in the background; its pid and URL."""
    daemon = JoinDaemon(site, netns=site.settings.boot_netns, vault_password_file=vault_password_file)
    return daemon.ensure(), daemon.settings.url


def stop(site: Site) -> bool:
    """Stop the service provision started; False when none ran."""
    return JoinDaemon(site, netns=site.settings.boot_netns).stop()

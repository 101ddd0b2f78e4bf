"""``provision boot``: the site's boot backend as a service (serve, stop, status, activate, events).

The built-in backend runs dnsmasq + iPXE + nginx on this node; Grendel runs
elsewhere, so there `serve` syncs the hosts and checks it answers, and
`stop` has nothing to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provision.boot.base import ServiceStatus, backend_for
from provision.boot.events import by_node
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import json_output
from provision.image.store import ImageStore


@click.group()
def boot() -> None:
    """The boot backend (provision_boot_backend): built-in DHCP/TFTP (dnsmasq), iPXE and HTTP (nginx), or Grendel."""


@boot.command()
@click.option(
    "--activate",
    is_flag=True,
    help="Boot the image store's current version of every image from now on (else new versions are only servable).",
)
@json_output
@pass_app
def serve(app: AppContext, activate: bool, as_json: bool) -> None:
    """Sync every node of the inventory to the boot backend and serve (built-in: start or update dnsmasq and nginx).

    Safe to run again: running services keep running, a changed config is
    reloaded. The built-in backend's state, logs and leases are under
    <provision_state_dir>/boot.
    """
    from provision.serve import serve as serve_site

    site = app.site
    backend = backend_for(site)
    served = serve_site(
        site, site.nodes, backend=backend, activate=activate, vault_password_file=app.vault_password_file
    )
    prepared, joined = served.boot, served.join
    if as_json:
        emit_json({**backend.summary(), **served.as_dict()})
        return
    for name, state in prepared.images.items():
        click.echo(f"image {name}: {state}")
    _print_services(prepared.services)
    click.echo(backend.describe())
    if joined.url:
        click.echo(
            f"join service {joined.url}: {len(joined.rendered) - len(joined.failed)} bundles"
            + (f" (pid {joined.pid})" if joined.pid else " (run by the site: provision_join_service_managed false)")
        )
    for name, error in sorted(joined.failed.items()):
        click.echo(f"{name}: no join bundle: {error}", err=True)


@boot.command()
@pass_app
def stop(app: AppContext) -> None:
    """Stop what `serve` started (nothing to do when nothing runs)."""
    from provision.serve import stop as stop_site

    stopped = stop_site(app.site)
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@boot.command()
@json_output
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Whether the boot services run, the hosts and the active image versions."""
    from provision.service.settings import JoinSettings
    from provision.service.state import read_status

    summary = backend_for(app.site).summary()
    joins = read_status(JoinSettings.from_site(app.site).status_file)
    join_nodes = {name: vars(record) for name, record in joins.nodes.items()} if joins else {}
    if as_json:
        emit_json({**summary, "join": {"nodes": join_nodes, "refusals": len(joins.refusals()) if joins else 0}})
        return
    for item in summary["services"]:
        state = f"running (pid {item['pid']})" if item["running"] else "stopped"
        click.echo(f"{item['service']}: {state}; {item['detail']}")
    click.echo(f"{summary['hosts']} hosts, {len(summary['provisioning'])} set to network-boot")
    for name, info in summary["images"].items():
        versions = f" (versions: {', '.join(info['versions'])})" if info["versions"] else ""
        click.echo(f"image {name}: active {info['active']}{versions}")
    if joins:
        click.echo(f"join service {joins.address}:{joins.port} (status written {joins.written})")
        for name, record in sorted(joins.nodes.items()):
            report = record.last_report or {}
            click.echo(
                f"  {name}: boot {record.boot_id or '-'}, key {record.key_fingerprint or '-'}, "
                f"bundles {record.bundles_served}, report {report.get('status', '-')}, refusals {record.refusals}"
                + (f" (last: {record.last_refusal})" if record.last_refusal else "")
            )


@boot.command()
@click.argument("image")
@click.argument("version", required=False)
@pass_app
def activate(app: AppContext, image: str, version: str | None) -> None:
    """Make nodes boot VERSION of IMAGE (default: the store's current one); also rolls back."""
    site = app.site
    store = ImageStore(Path(site.settings.image_store))
    chosen = store.get(image, version) if version else store.current(image)
    backend = backend_for(site)
    published = backend.publish(store, chosen, activate=True, dry_run=False)
    click.echo(f"image {image}: nodes boot version {published.version} from their next boot on")


@boot.command()
@json_output
@pass_app
def events(app: AppContext, as_json: bool) -> None:
    """Boot phases per node from the DHCP and HTTP logs (lease, scripts, kernel, initrd, squashfs)."""
    from datetime import UTC, datetime

    from provision.service.settings import JoinSettings
    from provision.service.state import read_status

    backend = backend_for(app.site)
    grouped = by_node(backend.boot_events(backend.list_hosts()))
    joins = read_status(JoinSettings.from_site(app.site).status_file)
    join_events = list(joins.events) if joins else []
    if as_json:
        data: dict[str, Any] = {node: [e.as_dict() for e in items] for node, items in grouped.items()}
        emit_json({"boot": data, "join": [e.as_dict() for e in join_events]})
        return
    rows: list[tuple[str, datetime, str, str, str]] = [
        (node, e.time, str(e.phase), str(e.client or "-"), e.detail or e.ip or "")
        for node, items in grouped.items()
        for e in items
    ]
    # The join service's own events: boots and keys seen on consoles, bundles served, reports, refusals.
    rows += [(e.node, datetime.fromtimestamp(e.time, UTC), f"join-{e.kind}", e.peer, e.detail) for e in join_events]
    table = Table(box=None, pad_edge=False)
    for column in ("NODE", "TIME", "PHASE", "CLIENT", "DETAIL"):
        table.add_column(column)
    for node, when, phase, client, detail in sorted(rows, key=lambda r: (r[0], r[1])):
        table.add_row(node, when.astimezone().strftime("%H:%M:%S.%f")[:-3], phase, client, detail)
    Console(soft_wrap=True).print(table)


def _print_services(statuses: Sequence[ServiceStatus]) -> None:
    for item in statuses:
        state = f"running (pid {item.pid})" if item.running else "stopped"
        click.echo(f"{item.service}: {state}; {item.detail}")


__all__ = ["boot"]

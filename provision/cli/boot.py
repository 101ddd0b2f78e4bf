"""``provision boot``: the site's boot backend as a service (serve, stop, status, activate, events).

The built-in backend runs dnsmasq + iPXE + nginx on this node; Grendel runs
elsewhere, so there `serve` syncs the hosts and checks it answers, and
`stop` has nothing to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    site = app.site
    backend = backend_for(site)
    prepared = backend.prepare(site, site.nodes, activate=activate)
    if as_json:
        emit_json({**backend.summary(), "sync": prepared.as_dict()})
        return
    for name, state in prepared.images.items():
        click.echo(f"image {name}: {state}")
    _print_services(prepared.services)
    click.echo(backend.describe())


@boot.command()
@pass_app
def stop(app: AppContext) -> None:
    """Stop what `serve` started (nothing to do when nothing runs)."""
    stopped = backend_for(app.site).stop()
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@boot.command()
@json_output
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Whether the boot services run, the hosts and the active image versions."""
    summary = backend_for(app.site).summary()
    if as_json:
        emit_json(summary)
        return
    for item in summary["services"]:
        state = f"running (pid {item['pid']})" if item["running"] else "stopped"
        click.echo(f"{item['service']}: {state}; {item['detail']}")
    click.echo(f"{summary['hosts']} hosts, {len(summary['provisioning'])} set to network-boot")
    for name, info in summary["images"].items():
        versions = f" (versions: {', '.join(info['versions'])})" if info["versions"] else ""
        click.echo(f"image {name}: active {info['active']}{versions}")


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
    backend = backend_for(app.site)
    grouped = by_node(backend.boot_events(backend.list_hosts()))
    if as_json:
        emit_json({node: [e.as_dict() for e in items] for node, items in grouped.items()})
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NODE", "TIME", "PHASE", "CLIENT", "DETAIL"):
        table.add_column(column)
    for node, items in sorted(grouped.items()):
        for event in items:
            table.add_row(
                node,
                event.time.astimezone().strftime("%H:%M:%S.%f")[:-3],
                str(event.phase),
                str(event.client or "-"),
                event.detail or event.ip or "",
            )
    Console(soft_wrap=True).print(table)


def _print_services(statuses: Sequence[ServiceStatus]) -> None:
    for item in statuses:
        state = f"running (pid {item.pid})" if item.running else "stopped"
        click.echo(f"{item.service}: {state}; {item.detail}")


__all__ = ["boot"]

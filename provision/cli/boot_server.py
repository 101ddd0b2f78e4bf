"""``provision boot``: run the built-in boot server (dnsmasq + iPXE + nginx) on this node."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provision.boot.base import BackendName, backend_config
from provision.boot.builtin import BuiltinBackend, sync_site
from provision.boot.events import by_node, read_events
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import json_output
from provision.errors import BootError
from provision.inventory import Site


def builtin_backend(site: Site) -> BuiltinBackend:
    """The built-in backend of ``site``; refuses when the site chose another backend."""
    config = backend_config(site)
    chosen = str(config.get("provision_boot_backend") or BackendName.BUILTIN).lower()
    if chosen != BackendName.BUILTIN:
        raise BootError(
            f"provision_boot_backend is {chosen!r}: the built-in boot server is not used by this site",
            hint="set provision_boot_backend: builtin, or use `provision node sync` with your Grendel server",
        )
    return BuiltinBackend.from_config(config)


@click.group()
def boot() -> None:
    """The built-in boot server: DHCP/TFTP (dnsmasq), iPXE scripts and images over HTTP (nginx)."""


@boot.command()
@click.option(
    "--activate",
    is_flag=True,
    help="Boot the image store's current version of every image from now on (else new versions are only servable).",
)
@json_output
@pass_app
def serve(app: AppContext, activate: bool, as_json: bool) -> None:
    """Render the configs from the inventory and start (or update) dnsmasq and nginx.

    Safe to run again: running services keep running, a changed config is
    reloaded. State, logs and leases are under <provision_state_dir>/boot.
    """
    backend = builtin_backend(app.site)
    synced = sync_site(app.site, backend, activate=activate)
    statuses = backend.serve()
    if as_json:
        emit_json({**backend.summary(), "sync": synced})
        return
    for name, state in synced["images"].items():
        click.echo(f"image {name}: {state}")
    _print_services(statuses)
    click.echo(backend.describe())


@boot.command()
@pass_app
def stop(app: AppContext) -> None:
    """Stop dnsmasq and nginx (nothing to do when they are not running)."""
    backend = builtin_backend(app.site)
    stopped = backend.stop()
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@boot.command()
@json_output
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Whether dnsmasq and nginx run, the hosts and the active image versions."""
    backend = builtin_backend(app.site)
    summary = backend.summary()
    if as_json:
        emit_json(summary)
        return
    _print_services(backend.status())
    click.echo(f"{summary['hosts']} hosts, {len(summary['provisioning'])} set to network-boot")
    for name, info in summary["images"].items():
        click.echo(f"image {name}: active {info['active']} (versions: {', '.join(info['versions'])})")


@boot.command()
@click.argument("image")
@click.argument("version", required=False)
@pass_app
def activate(app: AppContext, image: str, version: str | None) -> None:
    """Make nodes boot VERSION of IMAGE (default: the store's current one); also rolls back."""
    backend = builtin_backend(app.site)
    store = backend.config.image_store
    known, _ = backend.versions(image)
    if version is None or version not in {v.version for v in known}:
        if store is None:
            raise BootError("provision_image_store: not set", hint="set it to the image store directory")
        backend.add_store_version(store, image, version, activate=True)
    else:
        backend.activate(image, version)
    _, active = backend.versions(image)
    click.echo(f"image {image}: nodes boot version {active} from their next boot on")


@boot.command()
@json_output
@pass_app
def events(app: AppContext, as_json: bool) -> None:
    """Boot phases per node from the DHCP and HTTP logs (lease, scripts, kernel, initrd, squashfs)."""
    backend = builtin_backend(app.site)
    timeline = read_events(backend.dnsmasq_log, backend.http_access_log, backend.list_hosts())
    grouped = by_node(timeline)
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


def _print_services(statuses: list[Any]) -> None:
    for item in statuses:
        state = f"running (pid {item.pid})" if item.running else "stopped"
        click.echo(f"{item.service}: {state}; {item.detail}")


__all__ = ["boot", "builtin_backend", "sync_site"]

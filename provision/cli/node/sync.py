"""``provision node sync``: push the inventory's hosts to the boot backend."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from provision.boot.base import backend_for, site_hosts, sync_hosts
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import dry_run, get_selection, json_output, selection


@click.command("sync")
@selection
@dry_run
@json_output
@pass_app
def sync(app: AppContext, dry_run: bool, as_json: bool) -> None:
    """Register the selected nodes with the boot backend (provision_boot_backend).

    Only hosts that differ are written (MACs, addresses, BMC, image, tags);
    a host the backend already knows keeps its provision flag. --dry-run
    shows what would change.
    """
    nodes = app.select(get_selection())
    site = app.site
    hosts = site_hosts(site, nodes)
    backend = backend_for(site)
    try:
        plan = sync_hosts(backend, hosts, dry_run=dry_run)
        where = backend.describe()
    finally:
        backend.close()
    if as_json:
        emit_json({"backend": where, "dry_run": dry_run, "hosts": [c.as_dict() for c in plan.changes]})
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "CHANGE", "FIELDS"):
        table.add_column(column)
    for change in plan.changes:
        table.add_row(change.name, str(change.change), ", ".join(change.fields) or "-")
    Console(soft_wrap=True).print(table)
    verb = "would write" if dry_run else "wrote"
    click.echo(f"{verb} {len(plan.to_write)} of {len(plan.changes)} hosts to {where}")

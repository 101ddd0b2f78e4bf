"""``provision node``: list and act on nodes."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import get_selection, json_output, selection


@click.group()
def node() -> None:
    """List nodes and drive them (power, boot device, boot, join)."""


@node.command("list")
@selection
@json_output
@pass_app
def list_nodes(app: AppContext, as_json: bool) -> None:
    """A table of name, rack, MAC, IP, BMC and image."""
    nodes = app.select(get_selection(), validate=False)
    if as_json:
        emit_json([n.as_dict() for n in nodes])
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "RACK", "MAC", "IP", "BMC", "IMAGE"):
        table.add_column(column)
    for n in nodes:
        bmc = f"{n.bmc.address}:{n.bmc.port}" if n.bmc else "-"
        table.add_row(n.name, n.rack, n.mac, n.ip, bmc, n.image or "-")
    Console(soft_wrap=True).print(table)

"""``provision node``: list nodes, drive their power and boot device; sync, boot and join (submodules)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import (
    assume_yes,
    confirm,
    dry_run,
    fanout_options,
    fanout_settings,
    get_selection,
    json_output,
    report_outcomes,
    selection,
)
from provision.errors import ValidationError
from provision.fanout import FanoutOptions, Outcome
from provision.inventory import Node


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


def _bmc_nodes(app: AppContext) -> tuple[Node, ...]:
    """The selection; only BMC fields must be valid to drive a BMC."""
    nodes = app.select(get_selection(), validate=False)
    problems = [p for p in app.site.problems_for(nodes) if p.field.startswith("provision_bmc") or p.field == "hostname"]
    if problems:
        raise ValidationError(problems)
    return nodes


def _plan(nodes: Sequence[Node], operation: str, opts: FanoutOptions, as_json: bool) -> None:
    rows = [
        {
            "node": n.name,
            "rack": n.rack,
            "bmc": f"{n.bmc.address}:{n.bmc.port}" if n.bmc else None,
            "protocol": str(n.bmc.protocol) if n.bmc else None,
            "operation": operation,
        }
        for n in nodes
    ]
    batches = 1 if not opts.batch else -(-len(nodes) // opts.batch)
    if as_json:
        emit_json(
            {
                "dry_run": True,
                "operation": operation,
                "fanout": opts.fanout,
                "batch": opts.batch,
                "batch_wait": opts.batch_wait,
                "batches": batches,
                "nodes": rows,
            }
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NODE", "RACK", "BMC", "PROTOCOL", "OPERATION"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[k] or "-") for k in ("node", "rack", "bmc", "protocol", "operation")))
    Console(soft_wrap=True).print(table)
    wait = f", {opts.batch_wait:g} s between batches" if opts.batch and batches > 1 else ""
    click.echo(
        f"dry run: would {operation} {len(nodes)} nodes, {opts.fanout} at a time, in {batches} batch(es){wait}",
        err=True,
    )


def _batch_note(number: int, wait: float) -> None:
    click.echo(f"waiting {wait:g} s before batch {number}", err=True)


# --------------------------------------------------------------------------
# provision node power / bootdev


@node.command()
@click.argument("action", type=click.Choice(["status", "on", "off", "soft", "cycle", "reset"]))
@selection
@fanout_options
@assume_yes
@dry_run
@json_output
@pass_app
def power(
    app: AppContext,
    /,
    action: str,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Power status or control through each node's BMC.

    \b
    status  the chassis power state
    on      power on
    off     hard power off (no OS shutdown)
    soft    ask the OS to shut down (ACPI)
    cycle   off then on (powers on a node that is off)
    reset   hard reset (powers on a node that is off)

    Destructive actions over more than one node ask first unless --yes.
    Exits 1 if any node failed; the others carry on.
    """
    from provision.bmc import PowerAction, power_nodes

    power_action = PowerAction(action)
    nodes = _bmc_nodes(app)
    opts = fanout_settings(len(nodes), **settings)
    operation = f"power {action}"
    if dry_run:
        _plan(nodes, operation, opts, as_json)
        return
    if power_action.destructive:
        confirm(f"power {action}", nodes, yes)
    outcomes = power_nodes(nodes, power_action, opts, on_batch_wait=_batch_note)
    report_outcomes(operation, outcomes, as_json, lambda o: str(o.value.get("power", "ok")))


@node.command()
@click.argument("device", type=click.Choice(["pxe", "disk", "bios", "show"]))
@click.option("--persistent", is_flag=True, help="Keep the device for every boot, not only the next one.")
@click.option("--uefi", is_flag=True, help="Ask for a UEFI boot (default: legacy BIOS).")
@selection
@fanout_options
@dry_run
@json_output
@pass_app
def bootdev(
    app: AppContext,
    /,
    device: str,
    persistent: bool,
    uefi: bool,
    dry_run: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Set (or show) the device each node boots from next.

    pxe, disk or bios for the next boot only, or every boot with
    --persistent; `show` reads the current setting. The setting is read back
    from the BMC after it is written.
    """
    from provision.bmc import BootDevice, bootdev_get_nodes, bootdev_nodes

    nodes = _bmc_nodes(app)
    opts = fanout_settings(len(nodes), **settings)
    if device == "show":
        operation = "bootdev show"
    else:
        flags = (" persistent" if persistent else "") + (" uefi" if uefi else "")
        operation = f"bootdev {device}{flags}"
    if dry_run:
        _plan(nodes, operation, opts, as_json)
        return
    if device == "show":
        outcomes = bootdev_get_nodes(nodes, opts)
    else:
        outcomes = bootdev_nodes(
            nodes, BootDevice(device), persistent=persistent, uefi=uefi, options=opts, on_batch_wait=_batch_note
        )

    def describe(o: Outcome) -> str:
        v = o.value
        return str(v["device"]) + (" persistent" if v["persistent"] else "") + (" uefi" if v["uefi"] else "")

    report_outcomes(operation, outcomes, as_json, describe)


def _register() -> None:
    from provision.cli.node import boot, sync

    node.add_command(sync.sync)
    node.add_command(boot.boot)
    node.add_command(boot.join)


_register()

"""``provision node``: list nodes, drive their power and boot device."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import assume_yes, dry_run, get_selection, json_output, selection
from provision.errors import ProvisionError, ValidationError
from provision.fanout import DEFAULT_FANOUT, FanoutOptions, Outcome
from provision.inventory import Node

F = TypeVar("F", bound=Callable[..., Any])


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


# --------------------------------------------------------------------------
# Shared options for BMC fan-out

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Duration(click.ParamType[float, Any]):
    """Seconds, or a number with a unit: 500ms, 30s, 2m, 1h."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration (write e.g. 30s, 500ms, 2m)", param, ctx)
        return float(match.group(1)) * _UNITS[match.group(2)]


def fanout_options(func: F) -> F:
    """--fanout, --batch, --batch-wait, --timeout (per BMC), --processes, --retries."""
    return bmc_fanout_options("--timeout")(func)


def bmc_fanout_options(timeout_flag: str) -> Callable[[F], F]:
    """The fan-out options, with the per-BMC timeout under ``timeout_flag`` (``node boot`` has its own --timeout)."""
    timeout_dest = timeout_flag.lstrip("-").replace("-", "_")
    return lambda func: _apply_fanout_options(func, timeout_flag, timeout_dest)


def _apply_fanout_options(func: F, timeout_flag: str, timeout_dest: str) -> F:
    decorators = [
        click.option(
            "--fanout",
            type=click.IntRange(min=1),
            default=DEFAULT_FANOUT,
            show_default=True,
            help="At most this many BMCs at once.",
        ),
        click.option("--batch", type=click.IntRange(min=1), help="Act on this many nodes, then wait --batch-wait."),
        click.option(
            "--batch-wait",
            type=Duration(),
            default="0s",
            show_default=True,
            help="Pause between batches (limits inrush current), e.g. 30s.",
        ),
        click.option(
            timeout_flag,
            timeout_dest,
            type=Duration(),
            default="30s",
            show_default=True,
            help="Give up on one BMC after this.",
        ),
        click.option(
            "--processes",
            type=click.IntRange(min=1),
            help="Worker processes sharing the fan-out (default 1: one event loop answers thousands of BMCs).",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0),
            default=1,
            show_default=True,
            help="Retries for a BMC that does not answer (exponential backoff).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _bmc_nodes(app: AppContext) -> tuple[Node, ...]:
    """The selection; only BMC fields must be valid to drive a BMC."""
    nodes = app.select(get_selection(), validate=False)
    problems = [p for p in app.site.problems_for(nodes) if p.field.startswith("provision_bmc") or p.field == "hostname"]
    if problems:
        raise ValidationError(problems)
    return nodes


def _options(count: int, **settings: Any) -> FanoutOptions:
    from provision.bmc import fanout_options as bmc_fanout_options

    if settings.get("processes") is None:
        settings.pop("processes", None)
    return bmc_fanout_options(count, **settings)


def _confirm(what: str, nodes: Sequence[Node], assume: bool) -> None:
    if assume or len(nodes) <= 1:
        return
    if not sys.stdin.isatty():
        raise ProvisionError(
            f"refusing to {what} {len(nodes)} nodes without confirmation", hint="pass --yes to confirm"
        )
    click.confirm(f"{what} {len(nodes)} nodes?", abort=True, err=True)


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


def _report(operation: str, outcomes: list[Outcome], as_json: bool, describe: Callable[[Outcome], str]) -> None:
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        emit_json(
            {
                "operation": operation,
                "nodes": [o.as_dict() for o in outcomes],
                "summary": {"ok": len(outcomes) - len(failed), "failed": len(failed)},
            }
        )
    else:
        table = Table(box=None, pad_edge=False)
        for column in ("NODE", "RESULT", "TIME", "ERROR"):
            table.add_column(column)
        for o in outcomes:
            result = describe(o) if o.ok else f"[red]{o.result}[/red]"
            table.add_row(o.node, result, f"{o.seconds:.2f}s", o.error or "")
        Console(soft_wrap=True).print(table)
        hints = sorted({o.hint for o in failed if o.hint})
        for hint in hints:
            click.echo(f"hint: {hint}", err=True)
        click.echo(f"{operation}: {len(outcomes) - len(failed)} ok, {len(failed)} failed", err=True)
    if failed:
        raise click.exceptions.Exit(1)


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
    opts = _options(len(nodes), **settings)
    operation = f"power {action}"
    if dry_run:
        _plan(nodes, operation, opts, as_json)
        return
    if power_action.destructive:
        _confirm(f"power {action}", nodes, yes)
    outcomes = power_nodes(nodes, power_action, opts, on_batch_wait=_batch_note)
    _report(operation, outcomes, as_json, lambda o: str(o.value.get("power", "ok")))


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
    opts = _options(len(nodes), **settings)
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

    _report(operation, outcomes, as_json, describe)

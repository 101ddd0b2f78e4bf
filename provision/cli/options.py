"""Options declared once and shared by every command that needs them."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from provision.cli.context import emit_json
from provision.errors import ProvisionError
from provision.fanout import DEFAULT_FANOUT, FanoutOptions, Outcome
from provision.inventory import Node

F = TypeVar("F", bound=Callable[..., Any])


def selection(func: F) -> F:
    """--rack / --nodes / --all, collected into one ``selection`` dict."""

    def collect(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        ctx.meta.setdefault("selection", {})[_param.name] = value
        return value

    decorators = [
        click.option(
            "--rack",
            metavar="RACK",
            expose_value=False,
            callback=collect,
            help="A rack (the inventory group rack_RACK).",
        ),
        click.option(
            "--nodes", metavar="NODESET", expose_value=False, callback=collect, help="A nodeset, e.g. cn[01-04],gpu01."
        ),
        click.option(
            "--all",
            "all_nodes",
            is_flag=True,
            expose_value=False,
            callback=collect,
            help="Every node of the inventory.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def get_selection() -> dict[str, Any]:
    return dict(click.get_current_context().meta.get("selection", {}))


json_output = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of a table.")
dry_run = click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
assume_yes = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


# --------------------------------------------------------------------------
# BMC fan-out

_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,9})?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 7 * 24 * 3600.0  # a week: anything longer is a typo


class Duration(click.ParamType[float, Any]):
    """Seconds, or a number with a unit: 500ms, 30s, 2m, 1h; finite, at most a week."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a duration (write e.g. 30s, 500ms, 2m)", param, ctx)
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            match = _DURATION.match(str(value))
            if not match:
                self.fail(f"{value!r} is not a duration (write e.g. 30s, 500ms, 2m)", param, ctx)
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if not 0 <= seconds <= MAX_DURATION:  # NaN fails too
            self.fail(f"{value!r} is out of range (0 to 168h)", param, ctx)
        return seconds


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


def fanout_settings(count: int, **settings: Any) -> FanoutOptions:
    """FanoutOptions for ``count`` nodes from the fan-out options' values."""
    from provision.bmc import fanout_options as bmc_options

    if settings.get("processes") is None:
        settings.pop("processes", None)
    return bmc_options(count, **settings)


def confirm(what: str, nodes: Sequence[Node], assume: bool) -> None:
    """Ask before acting on more than one node, unless --yes; refuse without a terminal."""
    if assume or len(nodes) <= 1:
        return
    if not sys.stdin.isatty():
        raise ProvisionError(
            f"refusing to {what} {len(nodes)} nodes without confirmation", hint="pass --yes to confirm"
        )
    click.confirm(f"{what} {len(nodes)} nodes?", abort=True, err=True)


def report_outcomes(operation: str, outcomes: list[Outcome], as_json: bool, describe: Callable[[Outcome], str]) -> None:
    """A per-node table (or --json) of BMC or join outcomes; exit 1 if any failed."""
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

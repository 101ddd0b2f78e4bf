"""Options declared once and shared by every command that needs them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

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

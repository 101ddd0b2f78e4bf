"""``provision inventory``: check the site inventory."""

from __future__ import annotations

import click

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import json_output
from provision.errors import ValidationError


@click.group()
def inventory() -> None:
    """Read and check the site inventory."""


@inventory.command()
@json_output
@pass_app
def check(app: AppContext, as_json: bool) -> None:
    """Run every inventory check; exit non-zero on any problem.

    One line per problem names the node, the field and the fix.
    """
    site = app.site
    if as_json:
        emit_json(
            {
                "inventory": str(site.path),
                "racks": {r.name: len(r.nodes) for r in site.racks},
                "problems": [vars(p) for p in site.problems],
            }
        )
        if site.problems:
            raise click.exceptions.Exit(1)
        return
    if site.problems:
        raise ValidationError(list(site.problems))
    racks = ", ".join(f"{r.name} ({len(r.nodes)} nodes)" for r in site.racks)
    click.echo(f"ok: {site.path}: {len(site.nodes)} nodes in racks {racks}")

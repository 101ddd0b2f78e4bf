"""``provision service``: the join service that hands booting nodes their join bundles."""

from __future__ import annotations

import sys

import click

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import json_output


@click.group()
def service() -> None:
    """The join service: each node fetches its join bundle at every boot (pinned by its console)."""


@service.command()
@json_output
@pass_app
def run(app: AppContext, as_json: bool) -> None:
    """Serve in the foreground until SIGTERM or Ctrl-C (for a systemd unit).

    Listens on provision_join_address:provision_join_port (default: the boot
    address, port 8740), follows every node's provision_console_log, serves
    bundles from <provision_state_dir>/service/bundles and writes its status
    to <provision_state_dir>/service/status.json.
    """
    from provision.service.server import JoinService, serve_forever

    def ready(svc: JoinService) -> None:
        host, port = svc.address
        info = {
            "address": host,
            "port": port,
            "nodes": len(svc.nodes),
            "consoles": len(svc.consoles),
            "bundles": str(svc.settings.bundles_dir),
            "status": str(svc.settings.status_file),
        }
        if as_json:
            emit_json(info)
        else:
            click.echo(
                f"join service on http://{host}:{port}/v1/ for {len(svc.nodes)} nodes ({len(svc.consoles)} consoles)"
            )
        sys.stdout.flush()  # systemd and tests read the line at once

    serve_forever(app.site, on_ready=ready)


@service.command()
@json_output
@pass_app
def start(app: AppContext, as_json: bool) -> None:
    """Start the join service in the background (as `boot serve` does); a no-op when it runs."""
    from provision.service.site import start as start_service

    pid, url = start_service(app.site, vault_password_file=app.vault_password_file)
    if as_json:
        emit_json({"pid": pid, "url": url})
    else:
        click.echo(f"join service {url} (pid {pid})")


@service.command()
@pass_app
def stop(app: AppContext) -> None:
    """Stop the join service `boot serve` or `service start` started (safe twice)."""
    from provision.service.site import stop as stop_service

    click.echo("stopped the join service" if stop_service(app.site) else "the join service was not running")

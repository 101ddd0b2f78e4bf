"""``provision node boot`` and ``provision node join``: the main job (thin: ``provision.bringup`` does it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import (
    Duration,
    assume_yes,
    bmc_fanout_options,
    confirm,
    fanout_settings,
    get_selection,
    json_output,
    report_outcomes,
    selection,
)
from provision.errors import ProvisionError
from provision.fanout import Outcome, Result

if TYPE_CHECKING:
    from provision.ansible import TaskEvent
    from provision.bringup import NodeProgress


def _progress_table(rows: Sequence[NodeProgress], started: float) -> Table:
    table = Table(
        box=None, pad_edge=False, title=f"node boot  {time.monotonic() - started:5.0f} s", title_justify="left"
    )
    for column in ("NODE", "STAGE", "AT", "STATE"):
        table.add_column(column)
    for p in rows:
        last = p.last
        state = f"[red]failed[/red] {p.error}" if p.failed else ("[green]up[/green]" if p.up else "booting")
        table.add_row(p.name, str(last or "-"), f"{p.reached[last]:.1f}s" if last else "-", state)
    return table


def timeline_table(rows: Sequence[NodeProgress]) -> Table:
    """One row per node: seconds since power-on at which each stage was reached."""
    from provision.bringup import STAGES

    table = Table(box=None, pad_edge=False, title="timeline (seconds since power-on)", title_justify="left")
    table.add_column("NODE")
    table.add_column("RESULT")
    for stage in STAGES:
        table.add_column(str(stage).upper(), justify="right")
    for p in rows:
        result = "[red]failed[/red]" if p.failed else "[green]ok[/green]"
        cells = [f"{p.reached[s]:.1f}" if s in p.reached else "-" for s in STAGES]
        table.add_row(p.name, result, *cells)
    return table


def report(rows: Sequence[NodeProgress], as_json: bool, extra: dict[str, Any] | None = None) -> None:
    failed = [p for p in rows if p.failed]
    if as_json:
        emit_json(
            {
                **(extra or {}),
                "nodes": [p.as_dict() for p in rows],
                "summary": {"ok": len(rows) - len(failed), "failed": len(failed)},
            }
        )
    else:
        console = Console(soft_wrap=True)
        console.print(timeline_table(rows))
        for p in failed:
            click.echo(f"{p.name}: failed at {p.last or 'start'}: {p.error}", err=True)
            if p.hint:
                click.echo(f"  hint: {p.hint}", err=True)
            if p.console_tail:
                click.echo("  console tail:", err=True)
                for line in p.console_tail:
                    click.echo(f"    {line}", err=True)
        click.echo(f"{len(rows) - len(failed)} ok, {len(failed)} failed", err=True)
    if failed:
        raise click.exceptions.Exit(1)


@click.command("boot")
@selection
@click.option("--image", metavar="NAME", help="Boot this image instead of the inventory's (until the next sync).")
@click.option("--timeout", "boot_timeout", type=Duration(), default=600.0, help="Per node, power-on to sshd answering.")
@click.option("--dhcp-timeout", type=Duration(), default=300.0, help="Per node, power-on to its first DHCP request.")
@click.option(
    "--join",
    "do_join",
    is_flag=True,
    help="Also wait until each node has joined (Slurm): its own agent reports it (provision_join_mode: agent, the "
    "default; nodes join by themselves at every boot, with or without --join), or playbooks/join.yml runs over SSH "
    "(provision_join_mode: push).",
)
@click.option("--join-timeout", type=Duration(), default=None, help="Limit for the whole join run.")
@bmc_fanout_options("--bmc-timeout")
@assume_yes
@json_output
@pass_app
def boot(
    app: AppContext,
    /,
    image: str | None,
    boot_timeout: float,
    dhcp_timeout: float,
    do_join: bool,
    join_timeout: float | None,
    yes: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Network-boot nodes: sync the boot backend, PXE + power cycle, follow each node up.

    \b
    Stages, in seconds since power-on: power (BMC accepted), dhcp, script
    (its iPXE script), kernel, initrd, rootfs (from the boot server's logs),
    ssh (sshd answers), joined (--join: the node's agent reported its
    join bundle installed and services started; in push mode
    playbooks/join.yml passed). The SSH host key a node prints on its
    console (provision_console_log) is pinned (SSH, and the join service).

    Nodes that fail are reported with the last stage they reached and
    their console's tail; the others carry on. Exit code 1 if any failed.
    Power-cycles running nodes: asks first for more than one unless --yes.
    """
    from provision.bringup import BootSettings, NodeBoot

    nodes = app.select(get_selection())
    run_settings = BootSettings(
        image=image,
        timeout=boot_timeout,
        dhcp_timeout=dhcp_timeout,
        join=do_join,
        join_timeout=int(join_timeout) if join_timeout else None,
        fanout=fanout_settings(len(nodes), timeout=settings.pop("bmc_timeout"), **settings),
    )
    confirm("power-cycle and network-boot", nodes, yes)
    started = time.monotonic()
    console = Console(stderr=True)
    live_view = console.is_terminal and not as_json

    if live_view:
        live = Live(console=console, refresh_per_second=4, transient=False)

        def update(text: str, rows: Sequence[NodeProgress]) -> None:
            live.update(_progress_table(rows, started))

    else:
        live = None

        def update(text: str, rows: Sequence[NodeProgress]) -> None:
            click.echo(f"{time.monotonic() - started:7.1f}s  {text}", err=True)

    runner = NodeBoot(app.site, nodes, run_settings, vault_password_file=app.vault_password_file, on_update=update)
    if live is not None:
        with live:
            rows = runner.run()
    else:
        rows = runner.run()
    report(rows, as_json, {"image": image, "joined": do_join, "seconds": round(time.monotonic() - started, 1)})


@click.command("join")
@selection
@click.option("--timeout", "join_timeout", type=Duration(), default=None, help="Limit for the whole run.")
@json_output
@pass_app
def join(app: AppContext, /, join_timeout: float | None, as_json: bool) -> None:
    """Run playbooks/join.yml on booted nodes (ansible-runner over SSH).

    \b
    The same playbook runs with plain `ansible-playbook -i INVENTORY
    playbooks/join.yml` from a site's CI. It delivers the MUNGE key, the
    SSSD bind password and WireGuard peers from this side, starts munge,
    sssd and slurmd (configless), waits until each node is idle in sinfo,
    and joins k0s workers when k0s_controller_host is set.
    """
    from provision.join import join_nodes

    nodes = app.select(get_selection())
    if not nodes:
        raise ProvisionError("no node selected", hint="give --rack, --nodes or --all")
    started = time.monotonic()

    def on_event(event: TaskEvent) -> None:
        if app.verbose or str(event.kind) in ("failed", "unreachable"):
            click.echo(f"{time.monotonic() - started:7.1f}s  {event}", err=True)

    results = join_nodes(
        app.site.path,
        [n.name for n in nodes],
        vault_password_file=app.vault_password_file,
        on_event=on_event,
        timeout=int(join_timeout) if join_timeout else None,
        verbosity=max(0, app.verbose - 1),
        settings=app.site.settings,
    )
    outcomes = [
        Outcome(r.node, Result.OK if r.ok else Result.FAILED, error=r.error or None, seconds=r.seconds) for r in results
    ]
    report_outcomes("join", outcomes, as_json, lambda _: "joined")


__all__ = ["boot", "join", "report", "timeline_table"]

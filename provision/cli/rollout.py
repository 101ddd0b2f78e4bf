"""``provision image rollout``: move nodes to another image version, a few at a time (``provision.rollout``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from provision.boot.base import backend_for
from provision.cli.context import AppContext, emit_json, pass_app
from provision.cli.options import Duration, dry_run, get_selection, json_output, selection
from provision.errors import RolloutError
from provision.inventory import Node, Site
from provision.kube import Kubectl
from provision.rollout import NodePhase, RolloutRequest, RolloutState, RolloutStore, make_plan
from provision.rollout.runner import Rollout, new_state
from provision.rollout.state import RolloutStatus
from provision.service.state import NodeRecord
from provision.slurm import Slurm

err = Console(stderr=True, highlight=False, soft_wrap=True)


class LineProgress:
    """One line per node and step, with the time since the rollout began (a log as much as a view)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.0f} s]"

    def phase(self, node: str, phase: NodePhase, detail: str) -> None:
        style = {"failed": "red", "rollback failed": "red", "done": "green", "rolled back": "yellow"}.get(phase.value)
        text = f"{node}: {phase.value}" + (f" — {detail}" if detail else "")
        err.print(f"{self._stamp()} " + (f"[{style}]{text}[/]" if style else text.replace("[", r"\[")))

    def message(self, text: str) -> None:
        err.print(f"{self._stamp()} {text}", markup=False)


def _joins(site: Site) -> Any:
    from provision.service import read_status
    from provision.service.settings import JoinSettings

    status_file = JoinSettings.from_site(site).status_file

    def read() -> Mapping[str, NodeRecord]:
        status = read_status(status_file)
        return status.nodes if status else {}

    return read


def _check_join_service(site: Site) -> None:
    """Nodes rejoin by themselves only through the join service: it must be there and answering."""
    from provision.probe import tcp_answers
    from provision.service.settings import JoinMode, JoinSettings

    settings = JoinSettings.from_site(site)
    if settings.mode is not JoinMode.AGENT:
        raise RolloutError("provision_join_mode is push: rebooted nodes would not rejoin by themselves",
                           hint="roll out with provision_join_mode: agent (the default)")  # fmt: skip
    if not tcp_answers(settings.address, settings.port, netns=site.settings.boot_netns):
        raise RolloutError(f"the join service at {settings.url} does not answer",
                           hint="start it: provision service start (or provision boot serve)")  # fmt: skip


@contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM/SIGHUP as Ctrl-C: the rollout is saved as stopped, for --resume."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.command("rollout")
@click.argument("image", required=False)
@click.argument("version", required=False)
@selection
@click.option("--canary", type=int, default=1, show_default=True, help="Nodes moved first, alone; 0: none.")
@click.option("--max-unavailable", default="1", show_default=True,
              help="Nodes out of service at once: a number, or a share of the selection (25%).")  # fmt: skip
@click.option("--batch-wait", type=Duration(), default=0.0, help="Wait between waves (e.g. 2m).")
@click.option("--timeout", type=Duration(), default=900.0, show_default=True,
              help="Per node: from its reboot (jobs ended) to back in service.")  # fmt: skip
@click.option("--deadline", type=Duration(), help="Stop waiting for running jobs after this (nothing is killed).")
@click.option("--verify", "verify", help="A site check run on each node back in service (a one-node Slurm job).")
@click.option("--resume", is_flag=True, help="Continue the interrupted or stopped rollout.")
@dry_run
@json_output
@pass_app
def rollout_cmd(
    app: AppContext,
    image: str | None,
    version: str | None,
    canary: int,
    max_unavailable: str,
    batch_wait: float,
    timeout: float,
    deadline: float | None,
    verify: str | None,
    resume: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move the selected nodes to VERSION of IMAGE (default: the store's current), without draining the cluster.

    \b
    Canary first, then waves of at most --max-unavailable nodes: each node is
    pinned to the version on the boot backend, drained and rebooted by Slurm
    once its jobs end (scontrol reboot ASAP nextstate=RESUME), and followed
    until it booted the version, rejoined by itself and is back in service
    (then --verify). A node that fails is rolled back to its previous version
    and the rollout stops, exit 1; later waves are never touched. State is kept
    in <state dir>/rollout: after an interruption, --resume goes on.
    """
    site = app.site
    store = RolloutStore(site.state_dir)
    kube = Kubectl.from_vars(site.settings.variables)
    backend = backend_for(site)
    slurm = Slurm(site.settings.slurm_bin_dir)
    joins = _joins(site)
    try:
        existing = store.load()
        if resume:
            if existing is None or existing.status in (RolloutStatus.DONE, RolloutStatus.FAILED):
                raise RolloutError("no rollout to resume" + (f" (the last one is {existing.status.value})"
                                                            if existing else ""), hint="start one: provision image rollout IMAGE --rack R")  # fmt: skip
            state = existing
            nodes = site.select(nodes=",".join(state.nodes))
        else:
            if existing is not None and existing.status in (RolloutStatus.RUNNING, RolloutStatus.STOPPED):
                raise RolloutError(f"an unfinished rollout of {existing.image} to {existing.version} is in {store.path}",
                                   hint="continue it: provision image rollout --resume")  # fmt: skip
            if not image:
                raise RolloutError("IMAGE is missing", hint="provision image rollout IMAGE [VERSION] --rack R")
            nodes = app.select(get_selection())
            request = RolloutRequest(image=image, version=version, canary=canary, max_unavailable=max_unavailable,
                                     batch_wait=batch_wait, timeout=timeout, deadline=deadline, verify=verify)  # fmt: skip
            _check_join_service(site)
            plan = make_plan(site, nodes, request, backend=backend, slurm=slurm, joins=joins(), kube=kube)
            if dry_run:
                _print_plan(plan.as_dict(), as_json)
                return
            state = new_state(plan, request)
        store.lock()
        by_name: dict[str, Node] = {n.name: n for n in nodes}
        rollout = Rollout(state, by_name, backend=backend, slurm=slurm, joins=joins, store=store, kube=kube,
                          progress=LineProgress())  # fmt: skip
        try:
            with _signals_stop():
                rollout.run()
        except KeyboardInterrupt as stop:
            state.status = RolloutStatus.STOPPED
            state.message = f"interrupted ({stop or 'SIGINT'}): provision image rollout --resume goes on"
            store.save(state)
        finally:
            store.unlock()
    finally:
        backend.close()
    _report(state, as_json)
    if state.status is not RolloutStatus.DONE:
        raise SystemExit(1)


def _print_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json({"dry_run": True, **plan})
        return
    click.echo(
        f"would roll out {plan['image']} {plan['version']}, at most {plan['max_unavailable']} node(s) out at once:"
    )
    for index, wave in enumerate(plan["waves"]):
        label = "canary" if index == 0 and len(plan["waves"]) > 1 else f"wave {index + 1}"
        click.echo(f"  {label}: " + ", ".join(f"{n} ({plan['previous'][n]}, {plan['slurm'][n].lower()})" for n in wave))
    if plan["skipped"]:
        click.echo(f"  already on it: {', '.join(plan['skipped'])}")


def _report(state: RolloutState, as_json: bool) -> None:
    data = state.as_dict()
    if as_json:
        emit_json(data)
    else:
        table = Table(box=None, pad_edge=False)
        for column in ("NODE", "RESULT", "FROM", "RELEASE", "DRAIN WAIT", "REBOOT", "BOOT+JOIN", "RESUME", "ERROR"):
            table.add_column(column)
        for node in data["nodes"]:
            s = node["seconds"]
            cells = [f"{s[k]:.0f} s" if k in s else "-" for k in ("drain_wait", "reboot", "boot_and_join", "resume")]
            table.add_row(node["name"], node["phase"], node["previous"], node["release"] or "-", *cells,
                          node["error"] or "")  # fmt: skip
        Console(soft_wrap=True).print(table)
    for node in data["nodes"]:
        if node["console_tail"]:
            err.print(f"{node['name']}: console tail:", markup=False)
            for line in node["console_tail"]:
                err.print(f"  {line}", markup=False)
    colour = "green" if state.status is RolloutStatus.DONE else "red"
    err.print(
        f"[{colour}]rollout {state.status.value}[/]: {state.message} (at most {state.max_out} node(s) out at once)"
    )

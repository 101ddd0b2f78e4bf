"""``provision node boot``: from powered-off (or running) nodes to nodes up, and joined.

``NodeBoot(site, nodes, settings).run()``:

1. check: the selection is valid and its image is published (in the image
   store or already in the boot backend). Nothing has changed when this fails;
2. prepare the boot backend for the selection (``BootBackend.prepare``: its
   hosts and image; the built-in backend also starts or reloads its services)
   and set the nodes to network-boot;
3. per node: forget the last boot's pinned host key, boot from PXE next,
   power-cycle (a node that is off is powered on), through the BMC fan-out;
4. follow each node: DHCP lease, its iPXE script, kernel, initrd, root
   squashfs (the backend's logs, when it has them), the SSH host key it
   prints on its console (``provision_console_log``, pinned for the join),
   sshd answering (probed, inside ``provision_boot_netns`` when set). A node
   that misses ``timeout`` fails with the last stage it reached and the tail
   of its console; the others carry on;
5. with ``join``: ``playbooks/join.yml`` on the nodes as they come up
   (those up within ``JOIN_GATHER`` seconds of each other in one run), while
   the others are still followed.

Every stage's time is in seconds since the power command was sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from provision.boot.base import BootBackend, backend_for, site_hosts
from provision.boot.events import BootEvent, Client, Phase
from provision.console import ConsoleLog
from provision.errors import BootError, ProvisionError
from provision.fanout import FanoutOptions, Outcome
from provision.files import write_atomic
from provision.inventory import Node, Site
from provision.probe import ssh_answers
from provision.serve import serve
from provision.service.settings import JoinMode, JoinSettings
from provision.service.state import NodeRecord, ReportStatus, read_status


class Stage(StrEnum):
    """What a node reached, in boot order."""

    POWER = "power"  # PXE set, power cycle (or on) accepted by the BMC
    DHCP = "dhcp"  # leased an address from the boot network (firmware PXE or iPXE)
    SCRIPT = "script"  # fetched its own iPXE script
    KERNEL = "kernel"
    INITRD = "initrd"
    ROOTFS = "rootfs"  # the squashfs, fetched by the initramfs
    SSH = "ssh"  # the OS is up: sshd answers
    JOINED = "joined"  # playbooks/join.yml passed (Slurm idle, ...)


STAGES = tuple(Stage)
# Seconds an up node waits for others to come up and join in the same playbook run.
JOIN_GATHER = 15.0
# Seconds after --timeout for an up node's agent to report it joined.
AGENT_JOIN_TIMEOUT = 300.0
_ORDER = {stage: index for index, stage in enumerate(STAGES)}
_FROM_PHASE = {
    Phase.DHCP_ACK: Stage.DHCP,
    Phase.DHCP_PROXY: Stage.DHCP,
    Phase.NODE_SCRIPT: Stage.SCRIPT,
    Phase.KERNEL: Stage.KERNEL,
    Phase.INITRD: Stage.INITRD,
    Phase.ROOTFS: Stage.ROOTFS,
}


@dataclass
class NodeProgress:
    name: str
    ip: str
    mac: str
    reached: dict[Stage, float] = field(default_factory=dict)
    failed: bool = False
    error: str = ""
    hint: str = ""
    host_key: bool = False
    console_tail: list[str] = field(default_factory=list)

    @property
    def last(self) -> Stage | None:
        return max(self.reached, key=_ORDER.__getitem__) if self.reached else None

    @property
    def up(self) -> bool:
        return not self.failed and Stage.SSH in self.reached

    @property
    def joined(self) -> bool:
        return not self.failed and Stage.JOINED in self.reached

    def reach(self, stage: Stage, seconds: float) -> bool:
        if stage in self.reached:
            return False
        self.reached[stage] = max(0.0, seconds)
        return True

    def fail(self, error: str, hint: str = "") -> None:
        if not self.failed:
            self.failed, self.error, self.hint = True, error, hint

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "ok": not self.failed,
            "ip": self.ip,
            "mac": self.mac,
            "last_stage": str(self.last) if self.last else None,
            "stages": {str(s): round(t, 1) for s, t in sorted(self.reached.items(), key=lambda i: _ORDER[i[0]])},
            "host_key_pinned": self.host_key,
            "error": self.error or None,
            "hint": self.hint or None,
            "console_tail": self.console_tail if self.failed else [],
        }


@dataclass(frozen=True)
class BootSettings:
    image: str | None = None  # boot this image instead of the inventory's
    timeout: float = 600.0  # power-on to sshd answering, per node
    # Power-on to the first DHCP request, per node, where the backend sees DHCP
    # (firmware POST on large servers takes minutes; a wrong MAC fails here early).
    dhcp_timeout: float = 300.0
    join: bool = False
    join_timeout: int | None = None  # seconds for the whole join run
    poll: float = 1.0
    fanout: FanoutOptions | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise BootError(f"--timeout: {self.timeout} must be positive", hint="e.g. --timeout 600")
        if self.dhcp_timeout <= 0:
            raise BootError(f"--dhcp-timeout: {self.dhcp_timeout} must be positive", hint="e.g. --dhcp-timeout 300")


Update = Callable[[str, Sequence[NodeProgress]], None]


class NodeBoot:
    def __init__(
        self,
        site: Site,
        nodes: Sequence[Node],
        settings: BootSettings | None = None,
        *,
        vault_password_file: str | None = None,
        on_update: Update | None = None,
        backend: BootBackend | None = None,
    ) -> None:
        self.site = site
        self.nodes = tuple(nodes)
        self.settings = settings or BootSettings()
        self.vault_password_file = vault_password_file
        self.on_update = on_update
        self.netns = site.settings.boot_netns
        self.progress = {n.name: NodeProgress(n.name, n.ip, n.mac) for n in self.nodes}
        self.consoles = {n.name: ConsoleLog(Path(n.console_log)) for n in self.nodes if n.console_log}
        self.known_hosts_dir = site.settings.known_hosts_dir
        self.boot_hosts = site_hosts(site, self.nodes)  # MAC/IP to node name for the boot logs
        self._backend: BootBackend | None = backend
        self.join_settings = JoinSettings.from_site(site)
        self.agent_join = self.join_settings.mode is JoinMode.AGENT
        self._reports_before: dict[str, str | None] = {}  # each node's last agent report before power-on
        self._lock = threading.RLock()
        self._t0 = 0.0
        self._wall0 = datetime.now(UTC)

    # -- helpers ---------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _note(self, text: str) -> None:
        with self._lock:  # the join runs in other threads
            if self.on_update is not None:
                self.on_update(text, list(self.progress.values()))

    def _image_of(self, node: Node) -> str | None:
        return self.settings.image or node.image or self.site.default_image

    @property
    def backend(self) -> BootBackend:
        if self._backend is None:
            self._backend = backend_for(self.site)
        return self._backend

    def start_clock(self) -> datetime:
        """Stage times count from now (the power command); returns the wall-clock time."""
        self._t0 = time.monotonic()
        self._wall0 = datetime.now(UTC)
        return self._wall0

    # -- 1. check -------------------------------------------------------------
    def check(self) -> None:
        """Refuse before anything changes: bad inventory, unknown or unpublished image."""
        self.site.require_valid(self.nodes)
        if not self.nodes:
            raise BootError("no node selected", hint="give --rack, --nodes or --all")
        if self.settings.image and self.settings.image not in self.site.images:
            known = ", ".join(sorted(self.site.images)) or "none"
            raise BootError(f"--image: unknown image {self.settings.image!r} (known: {known})", hint="see images/")
        images = sorted({i for i in (self._image_of(n) for n in self.nodes) if i})
        if not images:
            raise BootError("no image to boot", hint="set provision_image or provision_default_image, or pass --image")
        for name in images:
            if not self.backend.is_published(name):
                raise BootError(
                    f"image {name} is not published to the {self.backend.name} boot backend",
                    hint=f"build it (provision image build {name}) and publish it (provision image publish {name})",
                )

    # -- 2. sync ---------------------------------------------------------------
    def sync(self) -> None:
        """Prepare the backend for the selection (hosts, image, services) and set the nodes to network-boot."""
        image_for = {n.name: self.settings.image for n in self.nodes} if self.settings.image else None
        served = serve(
            self.site,
            self.nodes,
            backend=self.backend,
            image_for=image_for,
            activate=True,
            vault_password_file=self.vault_password_file,
        )
        self.backend.set_provision([n.name for n in self.nodes], True)
        images = ", ".join(f"{k} {v}" for k, v in served.boot.images.items())
        self._note(f"boot backend: {len(served.boot.hosts_written)} hosts written; {images}")
        joined = served.join
        for name, error in joined.failed.items():  # such a node would boot and never get its bundle
            self.progress[name].fail(f"join bundle: {error}", "run `ansible-playbook playbooks/bundle.yml` -v")
        if joined.url:
            where = f"join service {joined.url}" + (" (started by provision)" if joined.pid else "")
            self._note(f"{where}: {len(joined.rendered) - len(joined.failed)} bundles rendered")

    # -- 3. power ----------------------------------------------------------------
    def power(self) -> None:
        from provision.bmc import BootDevice, PowerAction, bootdev_nodes, fanout_options, power_nodes

        self.known_hosts_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.known_hosts_dir / node.name).unlink(missing_ok=True)  # last boot's key is not this boot's
        for console in self.consoles.values():
            console.mark()
        self._reports_before = {name: self._report_key(record) for name, record in self._agent_records().items()}
        opts = self.settings.fanout or fanout_options(len(self.nodes))
        self.start_clock()
        todo = [n for n in self.nodes if not self.progress[n.name].failed]
        for outcome in bootdev_nodes(todo, BootDevice.PXE, persistent_will_do=True, options=opts):
            if not outcome.ok:
                self.progress[outcome.node].fail(f"BMC: {outcome.error}", outcome.hint or "")
        ready = [n for n in self.nodes if not self.progress[n.name].failed]

        def powered(outcome: Outcome) -> None:
            progress = self.progress[outcome.node]
            if outcome.ok:
                progress.reach(Stage.POWER, self._elapsed())
            else:
                progress.fail(f"BMC: {outcome.error}", outcome.hint or "")

        power_nodes(ready, PowerAction.CYCLE, opts, on_outcome=powered)
        for progress in self.progress.values():
            self._note(f"{progress.name}: {'power cycled' if not progress.failed else progress.error}")

    # -- 4. follow ---------------------------------------------------------------
    def _backend_events(self) -> list[BootEvent]:
        events = self.backend.boot_events(self.boot_hosts)
        since = self._wall0.replace(microsecond=0)
        return [e for e in events if e.time >= since]

    def _apply_events(self, events: Sequence[BootEvent]) -> None:
        for event in events:
            if event.node not in self.progress or event.phase not in _FROM_PHASE:
                continue
            if event.phase in (Phase.DHCP_ACK, Phase.DHCP_PROXY) and event.client is Client.OS:
                continue  # the booted OS renewing: not the boot's lease
            progress = self.progress[event.node]
            if progress.failed:
                continue
            seconds = event.time.timestamp() - self._wall0.timestamp()
            stage = _FROM_PHASE[event.phase]
            if progress.reach(stage, seconds):
                self._note(f"{progress.name}: {stage}")

    def _pin_host_keys(self) -> None:
        for name, console in self.consoles.items():
            progress = self.progress[name]
            if progress.host_key or progress.failed:
                continue
            keys = console.host_keys()
            if keys:
                write_atomic(self.known_hosts_dir / name, "".join(k.known_hosts_line(name) + "\n" for k in keys))
                progress.host_key = True
                self._note(f"{name}: host key pinned ({', '.join(k.type for k in keys)})")

    def _unknown_macs(self, events: Sequence[BootEvent]) -> list[str]:
        known = {n.mac for n in self.site.nodes}
        return sorted({e.mac for e in events if e.mac and e.mac not in known and e.phase is Phase.DHCP_DISCOVER})

    def follow(self) -> None:
        """Poll the logs, consoles and sshd until every node is up or failed, or the timeout."""
        deadline = self._t0 + self.settings.timeout
        join_deadline = deadline + (self.settings.join_timeout or AGENT_JOIN_TIMEOUT)
        probes: dict[str, Future[bool]] = {}
        last_probe: dict[str, float] = {}
        events: list[BootEvent] = []
        joins: list[Future[None]] = []
        submitted: set[str] = set()
        up_since: dict[str, float] = {}
        join_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="join")
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(self.nodes))), thread_name_prefix="probe") as pool:
            while True:
                if self.settings.join and not self.agent_join:
                    batch = self._join_batch(submitted, up_since)
                    if batch:
                        submitted.update(batch)
                        joins.append(join_pool.submit(self.join, batch))
                if self.settings.join and self.agent_join:
                    self._apply_reports()
                events = self._backend_events()
                self._apply_events(events)
                self._pin_host_keys()
                if events:  # the backend sees DHCP: a node silent past --dhcp-timeout fails now
                    self._fail_silent(events)
                now = time.monotonic()
                for progress in self.progress.values():
                    if progress.failed or progress.up or Stage.POWER not in progress.reached:
                        continue
                    future = probes.get(progress.name)
                    if future is not None and future.done():
                        probes.pop(progress.name)
                        if future.result():
                            progress.reach(Stage.SSH, self._elapsed())
                            self._note(f"{progress.name}: ssh")
                            continue
                    # Probe once the root is fetched (or every few seconds without boot logs).
                    has_logs = Stage.DHCP in progress.reached or bool(events)
                    if has_logs and Stage.ROOTFS not in progress.reached:
                        continue
                    if progress.name not in probes and now - last_probe.get(progress.name, 0.0) >= 2.0:
                        last_probe[progress.name] = now
                        probes[progress.name] = pool.submit(ssh_answers, progress.ip, 22, netns=self.netns, timeout=2.0)
                pending = [p for p in self.progress.values() if not p.failed and not p.up]
                if self.settings.join and self.agent_join:
                    joining = [p for p in self.progress.values() if p.up and not p.failed and not p.joined]
                    if pending and now >= deadline:
                        break
                    if not pending and (not joining or now >= join_deadline):
                        break
                elif not pending or now >= deadline:
                    break
                time.sleep(self.settings.poll)
        self._finish_follow(events)
        if self.settings.join and self.agent_join:
            self._finish_agent_join()
        if self.settings.join and not self.agent_join:
            batch = self._join_batch(submitted, up_since, final=True)
            if batch:
                joins.append(join_pool.submit(self.join, batch))
        for joined in joins:
            joined.result()
        join_pool.shutdown()

    def _join_batch(self, submitted: set[str], up_since: dict[str, float], *, final: bool = False) -> list[str]:
        """Up nodes to join now: when no node is still booting, or the first has waited JOIN_GATHER seconds.

        Nodes that come up close together join in one playbook run; a node
        that never comes up does not hold back the others' join.
        """
        now = time.monotonic()
        ready = [
            p.name
            for p in self.progress.values()
            if p.up and p.name not in submitted and (p.host_key or p.name not in self.consoles or final)
        ]
        for name in ready:
            up_since.setdefault(name, now)
        booting = any(not p.failed and not p.up for p in self.progress.values())
        if ready and (final or not booting or now - min(up_since[n] for n in ready) >= JOIN_GATHER):
            return ready
        return []

    # -- the agents' reports (provision_join_mode: agent) ----------------------------
    def _agent_records(self) -> dict[str, NodeRecord]:
        status = read_status(self.join_settings.status_file)
        return {n: r for n, r in (status.nodes.items() if status else ()) if n in self.progress}

    @staticmethod
    def _report_key(record: NodeRecord) -> str | None:
        report = record.last_report
        return f"{report.get('boot_id')}@{report.get('time')}" if report else None

    def _apply_reports(self) -> None:
        """A node is joined when its own agent reports it, from a boot after power-on."""
        for name, record in self._agent_records().items():
            progress, report = self.progress[name], record.last_report
            if progress.failed or progress.joined or not report:
                continue
            if self._report_key(record) == self._reports_before.get(name) or report.get("boot_id") != record.boot_id:
                continue  # the previous boot's report, or one the console has not confirmed
            try:
                when = datetime.fromisoformat(report["time"]).timestamp() - self._wall0.timestamp()
            except (KeyError, ValueError):
                when = self._elapsed()
            if report.get("status") == ReportStatus.JOINED:
                progress.reach(Stage.SSH, min(when, progress.reached.get(Stage.SSH, when)))
                progress.reach(Stage.JOINED, when)
                self._note(f"{name}: joined (its agent reported)")
            else:
                progress.fail(f"join: the node's agent failed at {report.get('step', '?')}", "see its console")
                self._note(f"{name}: {progress.error}")

    def _finish_agent_join(self) -> None:
        self._apply_reports()
        refusals: dict[str, str] = {}
        status = read_status(self.join_settings.status_file)
        for event in status.refusals() if status else ():
            if event.time >= self._wall0.timestamp():
                refusals[event.node] = event.detail  # the last refusal per node
        for progress in self.progress.values():
            if progress.failed or progress.joined or not progress.up:
                continue
            why = refusals.get(progress.name)
            progress.fail(
                "join: no report from the node's agent" + (f"; the join service refused it: {why}" if why else ""),
                f"the node asks {self.join_settings.url}; see `provision boot status` and its journal "
                "(journalctl -u provision-join-agent)",
            )

    def _no_dhcp_hint(self, progress: NodeProgress, events: Sequence[BootEvent]) -> str:
        unknown = self._unknown_macs(events)
        return (
            f"no DHCP request from {progress.mac} (provision_mac) since power-on"
            + (f"; unknown MACs asked for DHCP: {', '.join(unknown)} — is provision_mac right?" if unknown else "")
            + "; check the NIC's PXE setting and the cabling"
        )

    def _fail_silent(self, events: Sequence[BootEvent]) -> None:
        """Fail nodes powered on more than ``dhcp_timeout`` ago that never asked for DHCP."""
        elapsed = self._elapsed()
        for progress in self.progress.values():
            if progress.failed or progress.last is not Stage.POWER:
                continue
            if elapsed - progress.reached[Stage.POWER] >= self.settings.dhcp_timeout:
                progress.fail(
                    f"no DHCP request {self.settings.dhcp_timeout:.0f} s after power-on (last stage: power)",
                    self._no_dhcp_hint(progress, events),
                )
                self._note(f"{progress.name}: {progress.error}")

    def _finish_follow(self, events: Sequence[BootEvent]) -> None:
        self._pin_host_keys()  # sshd starts after the key is printed; the log may lag a little
        for progress in self.progress.values():
            if progress.failed or progress.up:
                continue
            last = progress.last
            hint = "see the console tail" if progress.name in self.consoles else "look at the node's console"
            if last in (None, Stage.POWER):
                hint = self._no_dhcp_hint(progress, events)
            progress.fail(
                f"not up after {self.settings.timeout:.0f} s (last stage: {last or 'none'})",
                hint,
            )
        for name, console in self.consoles.items():
            if self.progress[name].failed:
                self.progress[name].console_tail = console.tail(15)

    # -- 5. join -----------------------------------------------------------------
    def join(self, names: Sequence[str]) -> None:
        """playbooks/join.yml on ``names`` (nodes that are up); results land in their progress."""
        from provision.ansible import EventKind, TaskEvent
        from provision.join import join_nodes

        up = [n for n in names if self.progress[n].up]
        if not up:
            return
        self._note(f"joining {len(up)} node(s): {', '.join(up)}")
        started = self._elapsed()

        def on_event(event: TaskEvent) -> None:
            if event.kind is EventKind.TASK:
                self._note(f"join: {event.role + ' : ' if event.role else ''}{event.task}")

        try:
            results = join_nodes(
                self.site.path,
                up,
                vault_password_file=self.vault_password_file,
                on_event=on_event,
                timeout=self.settings.join_timeout,
                settings=self.site.settings,
            )
        except ProvisionError as exc:
            with self._lock:
                for name in up:
                    self.progress[name].fail(f"join: {exc.message}", exc.hint or "")
            self._note(f"join of {', '.join(up)} failed: {exc.message}")
            return
        for result in results:
            progress = self.progress[result.node]
            with self._lock:
                if result.ok:
                    progress.reach(Stage.JOINED, started + result.seconds)
                else:
                    progress.fail(f"join: {result.error}", "run `provision node join` with -v to see each task")
            self._note(f"{result.node}: {'joined' if result.ok else 'join failed'}")

    # -- all ---------------------------------------------------------------------
    def run(self) -> list[NodeProgress]:
        self.check()
        self.sync()
        self.power()
        self.follow()  # with settings.join, nodes join as they come up
        return list(self.progress.values())


__all__ = ["STAGES", "BootSettings", "NodeBoot", "NodeProgress", "Stage"]

"""Carry a rollout out: wave by wave, each node followed from drain to back in service.

Per node: pin the new version on the boot backend → ``scontrol reboot ASAP
nextstate=RESUME`` (a node that is not responding is power-cycled through its
BMC instead) → waiting for jobs → rebooting → booted (a new boot id on its
console, seen by the join service) → joined (its agent's signed report names
the release it runs: it must be the new one) → resumed (in service in Slurm)
→ the site's check (``--verify``, a one-node Slurm job) → done.

A node that reports a failed join, boots another release, fails the check
or is not back within ``--timeout`` of its reboot fails: the rollout stops,
the wave's nodes still waiting for their jobs get their reboot cancelled and
stay on their version, and the failed nodes are pinned back to their previous
version and power-cycled through their BMCs (their slurmd may be what broke),
then followed until they are back in service. Nodes of later waves are never
touched. Every change is saved (``RolloutStore``) before the next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from provision.console import ConsoleLog
from provision.kube import Kubectl, KubeError
from provision.rollout.plan import Plan, RolloutRequest
from provision.rollout.state import FINAL, IN_FLIGHT, NodePhase, NodeRollout, RolloutState, RolloutStatus, RolloutStore
from provision.slurm import Slurm, SlurmError, SlurmNode

if TYPE_CHECKING:
    from provision.boot.base import BootBackend
    from provision.inventory import Node
    from provision.service.state import NodeRecord

#: After a rolled-back node rejoined: how long Slurm gets to resume it by itself before we ask.
RESUME_GRACE = 30.0


class Progress(Protocol):
    def phase(self, node: str, phase: NodePhase, detail: str) -> None: ...
    def message(self, text: str) -> None: ...


class NullProgress:
    def phase(self, node: str, phase: NodePhase, detail: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def new_state(plan: Plan, request: RolloutRequest) -> RolloutState:
    nodes = {n: NodeRollout(n, plan.previous[n]) for wave in plan.waves for n in wave}
    for name in plan.skipped:
        nodes[name] = NodeRollout(name, plan.previous[name], phase=NodePhase.SKIPPED)
    waves = [list(w) for w in plan.waves] + ([list(plan.skipped)] if plan.skipped else [])
    return RolloutState(plan.image, plan.version, waves, nodes, {**request.as_dict(), "max_out": plan.max_unavailable})


class Rollout:
    """One rollout, carried out by this process (which holds ``store``'s lock)."""

    def __init__(
        self,
        state: RolloutState,
        nodes: Mapping[str, Node],
        *,
        backend: BootBackend,
        slurm: Slurm,
        joins: Callable[[], Mapping[str, NodeRecord]],
        store: RolloutStore,
        kube: Kubectl | None = None,
        progress: Progress | None = None,
        poll: float = 2.0,
    ) -> None:
        self.state = state
        self.nodes = nodes
        self.backend = backend
        self.slurm = slurm
        self.kube = kube
        self.joins = joins
        self.store = store
        self.progress = progress or NullProgress()
        self.poll = poll
        self.began = time.monotonic()
        opts = state.options
        self.timeout = float(opts.get("timeout") or 900.0)
        self.deadline = float(opts["deadline"]) if opts.get("deadline") else None
        self.batch_wait = float(opts.get("batch_wait") or 0.0)
        self.verify = str(opts["verify"]) if opts.get("verify") else None
        self.target = f"{state.image}/{state.version}"

    # -- the whole rollout ----------------------------------------------------------
    def run(self) -> RolloutState:
        state = self.state
        state.status = RolloutStatus.RUNNING
        state.message = ""
        self._save()
        while state.wave < len(state.waves):
            wave = state.waves[state.wave]
            label = "canary" if state.wave == 0 and state.options.get("canary") else f"wave {state.wave + 1}"
            if any(state.nodes[n].phase not in FINAL for n in wave):
                self.progress.message(f"{label}: {', '.join(wave)} → {self.target}")
            if not self._wave(wave):
                return state
            state.wave += 1
            self._save()
            if state.wave < len(state.waves) and self.batch_wait:
                self.progress.message(f"waiting {self.batch_wait:.0f} s before the next wave (--batch-wait)")
                time.sleep(self.batch_wait)
        self._finish()
        return state

    def _finish(self) -> None:
        state = self.state
        names = list(state.nodes)
        _, active = self.backend.versions_of(state.image)
        if active == state.version:  # the default already: the pins are not needed
            self.backend.assign_version(names, None)
            state.message = f"every node on {self.target} (the boot backend's active version)"
        else:
            state.message = (
                f"every node on {self.target}, pinned to it on the boot backend "
                f"(its active version is {active}: `provision image publish {state.image} --version "
                f"{state.version} --activate` makes it the default)"
            )
        state.status = RolloutStatus.DONE
        state.finished = time.time()
        self._save()

    # -- one wave --------------------------------------------------------------------
    def _wave(self, wave: Sequence[str]) -> bool:
        state = self.state
        fresh = [n for n in wave if state.nodes[n].phase is NodePhase.PENDING]
        if fresh:
            self.backend.assign_version(fresh, state.version)
            self._before_reboot(fresh, NodePhase.ASSIGNED, lambda _: f"boots {self.target} from its next boot")
        assigned = [n for n in wave if state.nodes[n].phase is NodePhase.ASSIGNED]
        slurm_now = self._slurm_nodes(assigned) if assigned else {}
        for name in assigned:
            self._request_reboot(name, slurm_now.get(name))
        while True:
            joins, slurm = self.joins(), self._slurm_nodes()
            for name in wave:
                if state.nodes[name].phase in IN_FLIGHT:
                    self._step(name, slurm.get(name), joins.get(name))
            if all(state.nodes[n].phase in FINAL | {NodePhase.FAILED} for n in wave):
                break
            waiting = [n for n in wave if state.nodes[n].phase is NodePhase.WAITING]
            if self.deadline is not None and time.monotonic() - self.began > self.deadline and waiting:
                state.status = RolloutStatus.STOPPED
                state.message = (
                    f"--deadline reached with jobs still running on {', '.join(waiting)}: their reboots stay "
                    "requested in Slurm (nothing is killed); `provision image rollout --resume` follows them"
                )
                self._save()
                return False
            time.sleep(self.poll)
        failed = [n for n in wave if state.nodes[n].phase is NodePhase.FAILED]
        if not failed:
            return True
        self._spare(wave)
        self._roll_back(failed)
        state.status = RolloutStatus.FAILED
        state.finished = time.time()
        state.message = f"stopped: {', '.join(failed)} failed and went back to the version it booted before"
        self._save()
        return False

    def _before_reboot(self, names: Sequence[str], phase: NodePhase, detail: Callable[[str], str]) -> None:
        """Note each node's current boot (the join service's view: a new one means it rebooted), then ``phase``."""
        joins = self.joins()
        for name in names:
            record = joins.get(name)
            self.state.nodes[name].old_boot = record.boot_id if record else None
            self._reach(name, phase, detail(name))

    def _request_reboot(self, name: str, node: SlurmNode | None) -> None:
        if node is not None and ({"REBOOT_REQUESTED", "REBOOT_ISSUED"} & node.flags):
            self._reach(name, NodePhase.WAITING, "reboot already requested in Slurm")  # a resumed rollout
            return
        if self.kube is not None:  # pods leave first; Slurm's jobs are waited for below
            try:
                self.kube.drain(name, timeout=self.timeout)
            except KubeError as exc:
                return self._fail(name, f"k0s drain: {exc.message}")
        if node is not None and node.usable:
            self.slurm.reboot_asap([name], f"provision rollout {self.target}")
            self._reach(name, NodePhase.WAITING, "drained; Slurm reboots it once its jobs end")
            return
        # Not responding (slurmd gone): Slurm cannot reboot it and it runs no job; its BMC can.
        error = self._power_cycle([name]).get(name)
        if error:
            self._fail(name, f"BMC: {error}")
        else:
            self._reach(
                name, NodePhase.REBOOTING, f"power-cycled through its BMC (Slurm: {node.state if node else '?'})"
            )

    def _step(self, name: str, slurm: SlurmNode | None, join: NodeRecord | None) -> None:
        rec = self.state.nodes[name]
        if rec.phase is NodePhase.WAITING and slurm is not None and not slurm.busy:
            self._reach(name, NodePhase.REBOOTING, f"no job left (Slurm: {slurm.state})")
        new_boot = join is not None and join.boot_id is not None and join.boot_id != rec.old_boot
        if rec.phase in (NodePhase.WAITING, NodePhase.REBOOTING) and new_boot and join is not None:
            if rec.phase is NodePhase.WAITING:
                self._reach(name, NodePhase.REBOOTING, "rebooted")
            rec.boot = join.boot_id
            self._reach(name, NodePhase.BOOTED, f"boot {join.boot_id}")
        if rec.phase is NodePhase.BOOTED and join is not None and join.boot_id == rec.boot:
            report = join.this_boot_report()
            if report.get("status"):
                rec.release = str(report.get("release", ""))
                if report["status"] != "joined":
                    return self._fail(name, f"its join agent reported {report['status']} at {report.get('step')}"
                                            f" (on {rec.release or 'an unnamed release'})")  # fmt: skip
                if rec.release != self.target:
                    return self._fail(name, f"booted {rec.release or 'an image without /etc/provision-release'}, "
                                            f"not {self.target}")  # fmt: skip
                self._reach(name, NodePhase.JOINED, f"booted {rec.release}, joined by itself")
        if rec.phase is NodePhase.JOINED and slurm is not None and slurm.usable and self._kube_back(name):
            self._reach(name, NodePhase.RESUMED, f"back in service ({slurm.state})")
            if self.verify:
                ok, output = self.slurm.run_on(name, self.verify, timeout=min(300.0, self.timeout))
                if not ok:
                    return self._fail(name, f"--verify failed: {output}")
            self._reach(name, NodePhase.DONE, self._timing(rec))
            self._save()
            return None
        started = rec.times.get(NodePhase.REBOOTING.value)
        if rec.phase in IN_FLIGHT and started is not None and time.time() - started > self.timeout:
            where = f"; Slurm: {slurm.state}" + (f" ({slurm.reason})" if slurm.reason else "") if slurm else ""
            return self._fail(name, f"not back in service {self.timeout:.0f} s after its reboot "
                                    f"(last step: {rec.phase.value}{where})")  # fmt: skip
        return None

    def _kube_back(self, name: str) -> bool:
        """k0s (when configured): Ready again, then uncordoned. A failed query is asked again at the next poll."""
        if self.kube is None:
            return True
        try:
            if not self.kube.ready([name]).get(name):
                return False
            self.kube.uncordon(name)
        except KubeError as exc:
            self.progress.message(f"{name}: {exc.message} (asking again)")
            return False
        return True

    @staticmethod
    def _timing(rec: NodeRollout) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in rec.durations().items())

    # -- failures --------------------------------------------------------------------
    def _fail(self, name: str, reason: str) -> None:
        rec = self.state.nodes[name]
        rec.error = reason
        console = self.nodes[name].console_log if name in self.nodes else None
        rec.console_tail = ConsoleLog(Path(console)).tail(15) if console else []
        self._reach(name, NodePhase.FAILED, reason)
        self._save()

    def _spare(self, wave: Sequence[str]) -> None:
        """The wave's nodes that did not reboot yet: reboot cancelled, drain lifted, back on their version."""
        spared = [n for n in wave if self.state.nodes[n].phase in (NodePhase.ASSIGNED, NodePhase.WAITING)]
        if not spared:
            return
        for call in (self.slurm.cancel_reboot, self.slurm.resume):
            try:
                call(spared)
            except SlurmError as exc:
                self.progress.message(f"{', '.join(spared)}: {exc.message}")
        self._pin_previous(spared)
        for name in spared:
            if self.kube is not None:
                try:
                    self.kube.uncordon(name)
                except KubeError as exc:
                    self.progress.message(f"{name}: {exc.message}")
            self.state.nodes[name].phase = NodePhase.PENDING
            self.progress.phase(name, NodePhase.PENDING, "left on its version (reboot cancelled)")
        self._save()

    def _pin_previous(self, names: Sequence[str]) -> None:
        _, active = self.backend.versions_of(self.state.image)
        by_version: dict[str, list[str]] = {}
        for name in names:
            by_version.setdefault(self.state.nodes[name].previous, []).append(name)
        for version, group in by_version.items():
            self.backend.assign_version(group, None if version == active else version)

    def _roll_back(self, names: Sequence[str]) -> None:
        state = self.state
        self._pin_previous(names)
        self._before_reboot(names, NodePhase.ROLLING_BACK, lambda n: f"back to {state.image}/{state.nodes[n].previous}")
        errors = self._power_cycle(names)
        following = {}
        for name in names:
            if errors.get(name):
                self._end_rollback(name, False, f"BMC: {errors[name]}")
            else:
                following[name] = time.time()
        asked: set[str] = set()
        while following:
            joins, slurm = self.joins(), self._slurm_nodes(list(following))
            for name, since in list(following.items()):
                rec, join, node = state.nodes[name], joins.get(name), slurm.get(name)
                report = join.this_boot_report() if join else {}
                back = join is not None and join.boot_id != rec.old_boot and bool(report)
                wanted = f"{state.image}/{rec.previous}"
                if back and report.get("status") == "joined" and report.get("release") == wanted:
                    if node is not None and node.usable and self._kube_back(name):
                        self._end_rollback(name, True, f"on {wanted} again, in service ({node.state})")
                        del following[name]
                        continue
                    joined_at = rec.times.setdefault("rolled back joined", time.time())
                    if name not in asked and time.time() - joined_at > RESUME_GRACE:
                        asked.add(name)
                        try:
                            self.slurm.resume([name])
                        except SlurmError as exc:
                            self.progress.message(f"{name}: {exc.message}")
                if time.time() - since > self.timeout:
                    self._end_rollback(name, False, f"not back on {wanted} within {self.timeout:.0f} s")
                    del following[name]
            if following:
                time.sleep(self.poll)

    def _end_rollback(self, name: str, ok: bool, detail: str) -> None:
        self._reach(name, NodePhase.ROLLED_BACK if ok else NodePhase.ROLLBACK_FAILED, detail)
        if not ok:
            self.state.nodes[name].error += f"; rollback: {detail}"
        self._save()

    # -- helpers ---------------------------------------------------------------------
    def _power_cycle(self, names: Sequence[str]) -> dict[str, str]:
        """Network boot next, then a power cycle, through each node's BMC: an error per node that failed."""
        from provision.bmc import BootDevice, PowerAction, bootdev_nodes, fanout_options, power_nodes

        nodes = [self.nodes[n] for n in names]
        errors = {o.node: o.error or "failed" for o in bootdev_nodes(nodes, BootDevice.PXE, persistent_will_do=True,
                                                                     options=fanout_options(len(nodes))) if not o.ok}  # fmt: skip
        ready = [n for n in nodes if n.name not in errors]
        for outcome in power_nodes(ready, PowerAction.CYCLE, fanout_options(len(ready))) if ready else []:
            if not outcome.ok:
                errors[outcome.node] = outcome.error or "failed"
        return errors

    def _slurm_nodes(self, names: Sequence[str] | None = None) -> dict[str, SlurmNode]:
        """Slurm's view; the most selected nodes out at once is kept. A failed query is retried at the next poll."""
        try:
            found = self.slurm.nodes(list(self.state.nodes) if names is None else names)
        except SlurmError as exc:
            self.progress.message(f"slurm: {exc.message} (asking again)")
            return {}
        if names is None:
            self.state.max_out = max(self.state.max_out, sum(1 for s in found.values() if s.out))
        return found

    def _reach(self, name: str, phase: NodePhase, detail: str) -> None:
        """A node's next step: saved before anything else happens (a killed rollout resumes from here)."""
        self.state.nodes[name].reach(phase)
        self._save()
        self.progress.phase(name, phase, detail)

    def _save(self) -> None:
        self.store.save(self.state)

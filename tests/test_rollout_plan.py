"""Rollout planning and Slurm's node states (fast): every refusal changes nothing; waves, canaries first.

The ``scontrol -o show node`` lines under tests/data were captured from the
lab's real slurmctld (Slurm 22.05.8, Debian 12) during a rollout. The plan
runs against a real built-in backend and inventory; ``scontrol`` is a script
that prints such lines (the real one answers in tests/test_rollout.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_boot_builtin import IMAGE, V1, V2, builtin_backend, make_inventory, make_store, sync_site

from provision import inventory
from provision.errors import RolloutError
from provision.kube import Kubectl, KubeError
from provision.rollout import RolloutRequest, make_plan
from provision.rollout.plan import max_out
from provision.service.state import NodeRecord
from provision.slurm import Slurm, parse_nodes

DATA = Path(__file__).parent / "data"
NODES = {f"node0{i}": f"52:54:00:99:00:1{i}" for i in range(1, 5)}


def test_scontrol_lines_of_a_real_slurmctld() -> None:
    nodes = parse_nodes((DATA / "scontrol-show-node-22.05.txt").read_text())
    assert sorted(nodes) == ["r1n01", "r1n02", "r1n03"]
    busy = nodes["r1n02"]
    assert (busy.base, busy.flags) == ("ALLOCATED", frozenset({"DRAIN", "REBOOT_REQUESTED"}))
    assert busy.busy and busy.out and not busy.usable
    assert busy.reason.startswith("provision rollout compute-debian12/20261202-143338 [root@")
    assert nodes["r1n01"].usable and not nodes["r1n01"].out and nodes["r1n01"].boot_time == "2026-12-02T14:43:03"
    rebooting = parse_nodes((DATA / "scontrol-show-node-reboot-issued-22.05.txt").read_text())["r1n01"]
    assert rebooting.state == "DOWN+DRAIN+REBOOT_ISSUED" and rebooting.out and not rebooting.busy
    assert rebooting.reason.endswith(": reboot issued [root@2026-12-02T14:42:47]")


@pytest.mark.parametrize(("value", "selected", "limit"), [("1", 3, 1), ("2", 3, 2), ("25%", 8, 2), ("10%", 3, 1)])
def test_max_unavailable(value: str, selected: int, limit: int) -> None:
    assert max_out(value, selected) == limit


@pytest.mark.parametrize("value", ["0", "-1", "x", "0%", "101%", "1.5"])
def test_max_unavailable_refused(value: str) -> None:
    with pytest.raises(RolloutError, match="--max-unavailable"):
        max_out(value, 4)


def fake_scontrol(tmp_path: Path, states: dict[str, str]) -> Slurm:
    """``scontrol -o show node`` printing one line per node (the fields the plan reads)."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(parents=True)
    lines = "".join(f"NodeName={n} Arch=x86_64 State={s} Partitions=lab BootTime=2026-12-02T14:40:10\n"
                    for n, s in states.items())  # fmt: skip
    (bin_dir / "nodes.txt").write_text(lines)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\nexec cat "{bin_dir}/nodes.txt"\n')
    (bin_dir / "scontrol").chmod(0o755)
    return Slurm(bin_dir)


@pytest.fixture
def site(tmp_path: Path) -> inventory.Site:
    store = make_store(tmp_path / "store")
    site = inventory.load(make_inventory(tmp_path, store=store, nodes=NODES))
    backend = builtin_backend(site)
    sync_site(site, backend, activate=False)  # V2 (the store's current) active
    backend.add_store_version(store, IMAGE, V1)
    backend.assign_version(list(NODES), V1)  # every node boots V1; V2 is rolled out
    return site


def plan_for(site: inventory.Site, tmp_path: Path, states: dict[str, str], **request: object):  # type: ignore[no-untyped-def]
    joins = {n: NodeRecord(boot_id="b-" + n, last_report={"boot_id": "b-" + n, "status": "joined",
                                                          "release": f"{IMAGE}/{V1}"}) for n in NODES}  # fmt: skip
    return make_plan(site, site.nodes, RolloutRequest(**{"image": IMAGE, "version": V2, **request}),  # type: ignore[arg-type]
                     backend=builtin_backend(site), slurm=fake_scontrol(tmp_path, states), joins=joins)  # fmt: skip


def test_waves_canary_idle_first(site: inventory.Site, tmp_path: Path) -> None:
    states = {"node01": "MIXED", "node02": "IDLE", "node03": "ALLOCATED", "node04": "IDLE"}
    plan = plan_for(site, tmp_path, states, canary=1, max_unavailable="2")
    assert plan.waves == (("node02",), ("node01", "node03"), ("node04",))
    assert dict(plan.previous) == dict.fromkeys(NODES, V1) and plan.max_unavailable == 2
    assert plan_for(site, tmp_path / "b", states, canary=0, max_unavailable="50%").waves == (
        ("node01", "node02"), ("node03", "node04"))  # fmt: skip


@pytest.mark.parametrize(
    ("states", "request_", "message"),
    [
        ({}, {"canary": 2}, "--canary 2 takes more nodes out at once than --max-unavailable 1"),
        ({"node03": "IDLE+DRAIN"}, {}, "not in service: node03 (IDLE+DRAIN)"),
        ({"node04": None}, {}, "node04: not in Slurm"),
        ({}, {"version": "20990101-000000"}, "no version '20990101-000000' in the store"),
        ({}, {"image": "no-such-image"}, "image no-such-image: unknown"),
        ({}, {"max_unavailable": "0"}, "--max-unavailable '0'"),
    ],
)
def test_refusals_change_nothing(
    site: inventory.Site, tmp_path: Path, states: dict[str, str | None], request_: dict[str, object], message: str
) -> None:
    everyone = {n: "IDLE" for n in NODES} | states
    backend = builtin_backend(site)
    before = backend.registry_path.read_text()
    with pytest.raises(RolloutError, match=re.escape(message)):
        plan_for(site, tmp_path, {n: s for n, s in everyone.items() if s is not None}, **request_)
    assert backend.registry_path.read_text() == before


def test_a_version_not_published_is_refused(site: inventory.Site, tmp_path: Path) -> None:
    newer = "20260105-000000"
    make_store(tmp_path / "more", versions=(newer,))
    store = site.settings.image_store
    shutil.copytree(tmp_path / "more" / IMAGE / newer, store / IMAGE / newer)  # in the store, not on the backend
    with pytest.raises(RolloutError, match=f"version {newer} is not published to the boot backend"):
        plan_for(site, tmp_path, dict.fromkeys(NODES, "IDLE"), version=newer)


def test_nodes_already_on_the_version_are_skipped(site: inventory.Site, tmp_path: Path) -> None:
    builtin_backend(site).assign_version(["node01"], V2)
    joins_release = f"{IMAGE}/{V2}"
    plan = make_plan(
        site, site.nodes, RolloutRequest(IMAGE, V2), backend=builtin_backend(site),
        slurm=fake_scontrol(tmp_path, dict.fromkeys(NODES, "IDLE")),
        joins={"node01": NodeRecord(boot_id="b", last_report={"boot_id": "b", "status": "joined",
                                                              "release": joins_release})},
    )  # fmt: skip
    assert plan.skipped == ("node01",)
    assert [n for w in plan.waves for n in w] == ["node02", "node03", "node04"]


def fake_kubectl(tmp_path: Path, ready: dict[str, bool]) -> Kubectl:
    """``kubectl`` that answers ``get nodes -o json`` (the fields the plan reads) and records every call;
    a real k0s controller cannot be reached from these machines."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tool = tmp_path / "kubectl"
    items = [{"metadata": {"name": n}, "status": {"conditions": [{"type": "Ready", "status": str(r)}]}}
             for n, r in ready.items()]  # fmt: skip
    (tmp_path / "nodes.json").write_text(json.dumps({"kind": "List", "items": items}))
    tool.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n'
                    f'[ "$1" = get ] && exec cat "{tmp_path}/nodes.json"\nexit 0\n')  # fmt: skip
    tool.chmod(0o755)
    return Kubectl((str(tool),))


def test_k0s_nodes_must_be_ready(site: inventory.Site, tmp_path: Path) -> None:
    slurm = fake_scontrol(tmp_path / "s", dict.fromkeys(NODES, "IDLE"))
    backend = builtin_backend(site)
    request = RolloutRequest(IMAGE, V2)
    absent = fake_kubectl(tmp_path / "a", {"node01": True, "node02": True, "node03": True})
    with pytest.raises(RolloutError, match="node04: not in the k0s cluster"):
        make_plan(site, site.nodes, request, backend=backend, slurm=slurm, joins={}, kube=absent)
    unready = fake_kubectl(tmp_path / "u", {**dict.fromkeys(NODES, True), "node02": False})
    with pytest.raises(RolloutError, match="node02: not Ready in k0s"):
        make_plan(site, site.nodes, request, backend=backend, slurm=slurm, joins={}, kube=unready)
    fine = fake_kubectl(tmp_path / "f", dict.fromkeys(NODES, True))
    assert len(make_plan(site, site.nodes, request, backend=backend, slurm=slurm, joins={}, kube=fine).waves) == 4
    fine.drain("node01", timeout=300)
    fine.uncordon("node01")
    calls = (tmp_path / "f" / "calls").read_text().splitlines()
    assert calls == ["get nodes -o json", "cordon node01",
                     "drain node01 --ignore-daemonsets --delete-emptydir-data --timeout=300s", "uncordon node01"]  # fmt: skip


@pytest.mark.parametrize("value", ["kubectl", [""], [1]])
def test_provision_kubectl_must_be_a_command_line(value: object) -> None:
    with pytest.raises(KubeError, match="provision_kubectl"):
        Kubectl.from_vars({"provision_kubectl": value})
    assert Kubectl.from_vars({}) is None


def test_deadline_stops_waiting_and_kills_nothing(site: inventory.Site, tmp_path: Path) -> None:
    """A node whose jobs outlast --deadline: the rollout stops (status stopped, saved), the reboot stays requested
    in Slurm, nothing is cancelled; the node is left waiting for its jobs, for --resume."""
    from provision.rollout import RolloutStore
    from provision.rollout.runner import Rollout, new_state

    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "nodes.txt").write_text("".join(f"NodeName={n} State=ALLOCATED Partitions=lab\n" for n in NODES))
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$*" >> "{bin_dir}/calls"\n[ "$2" = show ] && exec cat "{bin_dir}/nodes.txt"\nexit 0\n'
    )
    (bin_dir / "scontrol").chmod(0o755)
    slurm = Slurm(bin_dir)
    backend = builtin_backend(site)
    request = RolloutRequest(IMAGE, V2, canary=1, deadline=0.5)
    plan = make_plan(site, site.nodes, request, backend=backend, slurm=slurm, joins={})
    store = RolloutStore(tmp_path / "state")
    nodes = {n.name: n for n in site.nodes}
    state = Rollout(new_state(plan, request), nodes, backend=backend, slurm=slurm, joins=dict, store=store,
                    poll=0.1).run()  # fmt: skip
    canary = plan.waves[0][0]
    assert state.status.value == "stopped" and "--deadline" in state.message and canary in state.message
    saved = store.load()
    assert saved is not None and saved.status.value == "stopped"
    assert saved.nodes[canary].phase.value == "waiting for jobs"
    assert all(saved.nodes[n].phase.value == "pending" for w in plan.waves[1:] for n in w)
    calls = (bin_dir / "calls").read_text()
    assert f"reboot ASAP nextstate=RESUME reason=provision rollout {IMAGE}/{V2} {canary}" in calls
    assert "cancel" not in calls and "update" not in calls  # nothing forced, nothing undone
    assert backend.next_versions([canary]) == {canary: V2}  # still pinned: --resume follows it

"""``provision image rollout`` for real, on the run's shared 3-node rack (tests/vmlab.py).

The rack's nodes run version A of compute-debian12 (the run's build). B is A
with its own /etc/provision-release; C is B with a slurmd that cannot start
(tests/image_versions.py: unpacked, changed, packed and published through the
store). Slurm's own ``scontrol reboot ASAP nextstate=RESUME`` and the lab's
RebootProgram reboot the nodes; each rejoins through its join agent.

* A → B, ``--canary 1 --max-unavailable 1``: a job starts on the next wave's
  node while the canary finishes; that node is drained at once and rebooted
  only after the job ends (it completes, never cancelled). ``provision`` is
  killed (SIGKILL) while it waits; ``--resume`` finishes the rollout (and
  runs ``--verify``, a Slurm job on each node, as the first run asked). Every
  node ends on B (read on the node), idle; ``sinfo``, sampled every 2 s, never
  shows more than one node out.
* B → C: the canary's slurmd does not start; its agent reports it, the canary
  goes back to B by itself (BMC power cycle), the other nodes never leave B
  (same boot), exit 1 with the canary's reason and console tail.

Refusals (nothing changed) are checked first. ``-s`` prints each node's times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from image_versions import derive
from vmlab import PROVISION, Lab, SharedRack, needs_root, ok, wait

from provision.image.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.integration]

IMAGE = "compute-debian12"
IN_SERVICE = {"idle", "mixed", "allocated", "completing"}


class Sampler(threading.Thread):
    """``sinfo`` (and a job's state, once set) every 2 s: the most nodes seen out at once, and when."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.stop = threading.Event()
        self.max_out = 0
        self.out_seen: list[tuple[float, list[str]]] = []
        self.job: str | None = None
        self.job_states: list[tuple[float, str]] = []  # (time, state) at each change

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                states = self.lab.states()
                out = sorted(n for n, s in states.items() if s not in IN_SERVICE)
                self.max_out = max(self.max_out, len(out))
                if out:
                    self.out_seen.append((time.time(), [f"{n}={states[n]}" for n in out]))
                if self.job:
                    line = self.lab.control("scontrol", "-o", "show", "job", self.job)
                    state = line.split("JobState=", 1)[1].split()[0] if "JobState=" in line else "GONE"
                    if not self.job_states or self.job_states[-1][1] != state:
                        self.job_states.append((time.time(), state))
            except (subprocess.SubprocessError, AssertionError, IndexError):
                pass  # slurmctld busy for a moment: the next sample counts
            self.stop.wait(2.0)


def rollout_argv(lab: Lab, *args: str) -> list[str]:
    return [PROVISION, "-i", str(lab.inventory), "--vault-password-file", lab.vault, "image", "rollout", *args]


def state_file(lab: Lab) -> Path:
    return lab.state / "site" / "rollout" / "state.json"


def phases(lab: Lab) -> dict[str, str]:
    try:
        data = json.loads(state_file(lab).read_text())
    except (OSError, ValueError):
        return {}
    return {n["name"]: n["phase"] for n in data["nodes"]}


def release_on(lab: Lab, node: dict[str, Any], known_hosts: Path) -> str:
    """The node's /etc/provision-release as ``IMAGE/VERSION`` (read over SSH: its host key is new each boot)."""
    text = lab.ssh_new(node, "cat /etc/provision-release", known_hosts)
    values = dict(line.split("=", 1) for line in text.split())
    return f"{values['PROVISION_IMAGE']}/{values['PROVISION_VERSION']}"


def print_times(result: dict[str, Any]) -> None:
    for node in result["nodes"]:
        print(f"  {node['name']}: {node['phase']} {node['seconds']}")


@needs_root
def test_rollout_canary_waves_resume_and_rollback(shared_rack: SharedRack, tmp_path: Path) -> None:
    lab = shared_rack.lab
    shared_rack.boot()
    nodes = {n["name"]: n for n in lab.status["nodes"]}
    names = sorted(nodes)
    wait("every node idle", lambda: set(lab.states().values()) == {"idle"}, 900, 5.0)
    store = ImageStore(shared_rack.store)
    version_a = store.current(IMAGE)
    version_b = derive(store, version_a)
    ok(lab.cli("image", "publish", IMAGE, "--version", version_b.version))  # servable; nodes still boot A

    # Refusals change nothing.
    for args, says in (
        ((IMAGE, version_b.version, "--rack", "r1", "--canary", "2"), "--canary 2 takes more nodes out"),
        ((IMAGE, "20990101-000000", "--rack", "r1"), "no version '20990101-000000'"),
        (("no-such-image", "--rack", "r1"), "image no-such-image: unknown"),
        ((IMAGE, "--nodes", "r9n99"), "--nodes: not in the inventory: r9n99"),
    ):
        refused = lab.cli("image", "rollout", *args)
        assert refused.returncode == 1, refused.stderr
        assert says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert not state_file(lab).exists()
    plan = json.loads(ok(lab.cli("image", "rollout", IMAGE, version_b.version, "--rack", "r1", "--dry-run",
                                 "--json")).stdout)  # fmt: skip
    assert [len(w) for w in plan["waves"]] == [1, 1, 1] and sorted(n for w in plan["waves"] for n in w) == names
    assert set(plan["previous"].values()) == {version_a.version}
    assert not state_file(lab).exists()

    # A → B, killed while the second wave's node waits for its job, then resumed.
    sampler = Sampler(lab)
    sampler.start()
    log = tmp_path / "rollout-b.log"
    argv = rollout_argv(lab, IMAGE, version_b.version, "--rack", "r1", "--canary", "1", "--max-unavailable", "1",
                        "--batch-wait", "20s", "--json",
                        "--verify", f"grep -qx PROVISION_VERSION={version_b.version} /etc/provision-release")  # fmt: skip
    with open(log, "w") as stderr:
        killed = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        canary = plan["waves"][0][0]
        wait("the canary on B", lambda: phases(lab).get(canary) == "done", 1200, 2.0)
        busy = json.loads(state_file(lab).read_text())["waves"][1][0]
        job = lab.control("sbatch", "--parsable", f"--nodelist={busy}", "--wrap", "sleep 60").strip()
        sampler.job = job
        wait(f"{busy} drained while its job runs",
             lambda: phases(lab).get(busy) == "waiting for jobs" and any(s == "RUNNING" for _, s in sampler.job_states),
             120, 1.0)  # fmt: skip
        os.killpg(killed.pid, signal.SIGKILL)
        assert killed.wait(30) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert json.loads(state_file(lab).read_text())["status"] == "running"  # as the killed process left it
    resumed = subprocess.run(rollout_argv(lab, "--resume", "--json"), capture_output=True, text=True, timeout=2400)
    sampler.stop.set()
    sampler.join(30)
    assert resumed.returncode == 0, log.read_text()[-3000:] + resumed.stderr[-5000:]
    result = json.loads(resumed.stdout)
    print("A → B (killed, resumed):")
    print_times(result)
    assert result["status"] == "done"
    assert {n["name"]: n["phase"] for n in result["nodes"]} == dict.fromkeys(names, "done")
    assert all("check" in n["seconds"] for n in result["nodes"])  # --verify ran as a Slurm job on each node
    target = f"{IMAGE}/{version_b.version}"
    known_hosts = tmp_path / "known_hosts"
    for name in names:
        assert release_on(lab, nodes[name], known_hosts) == target
    assert set(lab.states().values()) == {"idle"}
    # Never more than one node out of service (sinfo, sampled), and the rollout's own count agrees.
    assert sampler.max_out <= 1 and result["max_out"] <= 1, sampler.out_seen
    assert any(busy in " ".join(out) for _, out in sampler.out_seen)
    # The job ran to its end; the node rebooted only after it.
    states = [s for _, s in sampler.job_states]
    assert "RUNNING" in states and "COMPLETED" in states, sampler.job_states
    assert not {"CANCELLED", "NODE_FAIL", "FAILED"} & set(states), sampler.job_states
    ended = next(t for t, s in sampler.job_states if s == "COMPLETED")
    busy_record = next(n for n in result["nodes"] if n["name"] == busy)
    assert busy_record["times"]["rebooting"] >= ended - 5, (busy_record["times"], sampler.job_states)
    assert busy_record["seconds"]["drain_wait"] >= 10, busy_record

    # B → C: C's slurmd cannot start. The canary goes back to B by itself; nobody else moves.
    version_c = derive(store, version_b, broken_slurmd=True)
    ok(lab.cli("image", "publish", IMAGE, "--version", version_c.version))
    boots = {name: lab.join_status()[name]["boot_id"] for name in names}
    broken = lab.cli("image", "rollout", IMAGE, version_c.version, "--rack", "r1", "--timeout", "600", "--json",
                     timeout=2400)  # fmt: skip
    assert broken.returncode == 1, broken.stderr[-5000:]
    failed = json.loads(broken.stdout)
    print("B → C (broken slurmd):")
    print_times(failed)
    assert failed["status"] == "failed"
    by_name = {n["name"]: n for n in failed["nodes"]}
    canary = failed["waves"][0][0]
    assert by_name[canary]["phase"] == "rolled back", by_name[canary]
    assert "reported failed at restart:slurmd" in by_name[canary]["error"], by_name[canary]
    assert by_name[canary]["console_tail"], "the canary's console tail"
    assert f"{canary}: console tail:" in broken.stderr
    others = [n for n in names if n != canary]
    assert {by_name[n]["phase"] for n in others} == {"pending"}
    after = lab.join_status()
    for name in others:
        assert after[name]["boot_id"] == boots[name], f"{name} rebooted"
    known_hosts = tmp_path / "known_hosts.after"  # the canary booted twice since: new host keys
    for name in names:
        assert release_on(lab, nodes[name], known_hosts) == target, name
        assert after[name]["last_report"]["release"] == target
    wait("every node idle after the rollback", lambda: set(lab.states().values()) == {"idle"}, 300, 5.0)

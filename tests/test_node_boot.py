"""The main job end to end: ``provision node boot --join`` on a virtual rack.

Everything is real: the compute-debian12 image built in this run, QEMU
machines (TCG here) powered through virtual BMCs over IPMI, dnsmasq/iPXE/nginx
in a network namespace, slurmctld + munged + slapd on the control node, and
``playbooks/join.yml`` over SSH with the host key pinned from each machine's
serial console.

* ``test_boot_and_join_two_nodes``: both nodes idle in sinfo, ``srun -N2
  hostname``, ``getent passwd labuser`` through SSSD, ``/opt/cache`` modes,
  the blank disk formatted and mounted; then ``lab down`` leaves nothing.
* ``test_faults_are_reported_per_node``: a dead BMC and a wrong MAC in the
  inventory; the third node still joins, the two are reported with the stage
  they reached, exit code 1.

Each test prints its per-node timeline (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import requires

from provision.image.store import ImageVersion

pytestmark = [pytest.mark.vm, pytest.mark.integration]

PROVISION = str(Path(sys.executable).with_name("provision"))
needs_root = requires(os.geteuid() == 0, "namespaces, taps and QEMU need root; CI runs the suite as root")


def provision(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run(
        [PROVISION, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-4000:]}"
    return result


class Lab:
    """A virtual rack for one test; ``down()`` always runs."""

    def __init__(
        self, tmp_path: Path, nodes: int, store: Path, env: dict[str, str] | None = None, bmc: str = "pyghmi"
    ) -> None:
        self.state = tmp_path / "lab"
        self.env = env or {}
        self.netns = f"provtest-{uuid.uuid4().hex[:6]}"
        up = ["lab", "up", "--nodes", str(nodes), "--netns", self.netns, "--state-dir", str(self.state)]
        up += ["--bmc", bmc]  # provision lab up --bmc: pyghmi, openipmi
        self.status = json.loads(_ok(provision(*up, "--image-store", str(store), "--json", env=self.env)).stdout)
        self.inventory = Path(self.status["inventory"])
        self.vault = self.status["vault_password_file"]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return provision(
            "-i", str(self.inventory), "--vault-password-file", self.vault, *args, timeout=timeout, env=self.env
        )  # fmt: skip

    def control(self, tool: str, *args: str) -> str:
        binary = self.state / "control" / "bin" / tool
        return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, check=True).stdout

    def ssh(self, node: dict[str, Any], command: str) -> str:
        """Run on a node with the pinned host key (StrictHostKeyChecking=yes)."""
        argv = [
            "ip", "netns", "exec", self.netns, "ssh", "-i", str(self.state / "secrets" / "ssh" / "id_ed25519"),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.state / 'site' / 'known_hosts' / node['name']}",
            "-o", f"HostKeyAlias={node['name']}", f"root@{node['ip']}", command,
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{node['name']}: {command}: {result.stderr}"
        return result.stdout

    def down(self) -> list[str]:
        result = _ok(provision("lab", "down", "--state-dir", str(self.state), "--json", env=self.env))
        removed: list[str] = json.loads(result.stdout)["removed"]
        return removed


def _timeline(report: dict[str, Any], accel: str) -> str:
    lines = [f"timeline ({accel}), seconds since power-on:"]
    for node in report["nodes"]:
        stages = " ".join(f"{k}={v}" for k, v in node["stages"].items())
        lines.append(f"  {node['node']}: {'ok' if node['ok'] else 'FAILED'} {stages}")
    return "\n".join(lines)


@needs_root
def test_boot_and_join_two_nodes(compute_image: ImageVersion, tmp_path: Path) -> None:
    lab = Lab(tmp_path, 2, compute_image.path.parents[1])
    try:
        nodes = lab.status["nodes"]
        names = [n["name"] for n in nodes]
        booted = lab.cli("node", "boot", "--rack", "r1", "--join", "--yes", "--json", "--timeout", "900", timeout=1800)
        assert booted.returncode == 0, booted.stderr[-5000:]
        report = json.loads(booted.stdout)
        print(_timeline(report, lab.status["accel"]))
        assert report["summary"] == {"ok": 2, "failed": 0}
        for node in report["nodes"]:
            assert list(node["stages"]) == ["power", "dhcp", "script", "kernel", "initrd", "rootfs", "ssh", "joined"]
            times = list(node["stages"].values())
            assert times == sorted(times), node
            assert node["host_key_pinned"], node
        # The progress lines name every stage of both nodes (stderr, no TTY).
        for name in names:
            assert f"{name}: rootfs" in booted.stderr and f"{name}: joined" in booted.stderr

        states = dict(line.split() for line in lab.control("sinfo", "-h", "-N", "-o", "%N %T").splitlines())
        assert {states[n] for n in names} == {"idle"}, states
        ran = lab.control("srun", "-N2", "hostname").split()
        assert sorted(ran) == sorted(names)

        first = nodes[0]
        # A PMIx step, launched from a node (its configless client config): the plugin loads PMIx 4 there.
        assert sorted(lab.ssh(first, "srun --mpi=pmix -N2 hostname").split()) == sorted(names)
        assert lab.ssh(first, "getent passwd labuser").startswith("labuser:")
        cache = ("/opt/cache/shared", "/opt/cache/persistent", "/opt/cache/world-tmp")
        modes = lab.ssh(first, "stat -c '%n %a' " + " ".join(cache)).split()
        assert modes == [word for path in cache for word in (path, "1777")]
        source, fstype = lab.ssh(first, "findmnt -n -o SOURCE,FSTYPE /mnt/disk").split()
        assert source == "/dev/vda" and fstype == "ext4"
        assert "node-local" in lab.ssh(first, "blkid -s LABEL -o value /dev/vda")
        # Secrets arrived at join time, with the right modes.
        assert lab.ssh(first, "stat -c '%a %U' /etc/munge/munge.key").split() == ["400", "munge"]
    finally:
        removed = lab.down()
    assert f"netns:{lab.netns}" in removed
    assert not Path(f"/run/netns/{lab.netns}").exists()
    assert not lab.state.exists()
    leftovers = subprocess.run(["pgrep", "-f", str(lab.state)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


@needs_root
def test_faults_are_reported_per_node(compute_image: ImageVersion, tmp_path: Path) -> None:
    # The state dir comes from $PROVISION_STATE_DIR here, not the inventory: the
    # host keys are pinned there and the join (playbooks/join.yml) finds them there.
    elsewhere = tmp_path / "state-from-env"
    lab = Lab(tmp_path, 3, compute_image.path.parents[1], env={"PROVISION_STATE_DIR": str(elsewhere)})
    try:
        good, dead_bmc, wrong_mac = lab.status["nodes"]
        hosts_file = lab.inventory / "hosts.yml"
        hosts = yaml.safe_load(hosts_file.read_text())
        rack = hosts["all"]["children"]["compute"]["children"]["rack_r1"]["hosts"]
        rack[dead_bmc["name"]]["provision_bmc_port"] = 9  # nothing answers IPMI there
        rack[wrong_mac["name"]]["provision_mac"] = "52:54:00:99:ff:03"  # not the machine's NIC
        hosts_file.write_text(yaml.safe_dump(hosts, sort_keys=False))

        booted = lab.cli(
            "node", "boot", "--rack", "r1", "--join", "--yes", "--json", "--timeout", "420", "--bmc-timeout", "3s",
            timeout=1800,
        )  # fmt: skip
        assert booted.returncode == 1, booted.stderr[-5000:]
        report = json.loads(booted.stdout)
        print(_timeline(report, lab.status["accel"]))
        by_name = {n["node"]: n for n in report["nodes"]}
        assert report["summary"] == {"ok": 1, "failed": 2}

        assert by_name[good["name"]]["ok"] and by_name[good["name"]]["last_stage"] == "joined"
        assert (elsewhere / "known_hosts" / good["name"]).read_text().startswith(good["name"] + " ssh-ed25519 ")
        assert not (lab.state / "site" / "known_hosts").exists()
        states = dict(line.split() for line in lab.control("sinfo", "-h", "-N", "-o", "%N %T").splitlines())
        assert states[good["name"]] == "idle"

        dead = by_name[dead_bmc["name"]]
        assert dead["last_stage"] is None and dead["error"].startswith("BMC:"), dead
        assert "127.0.0.1:9" in dead["error"]

        lost = by_name[wrong_mac["name"]]
        assert lost["last_stage"] == "power", lost
        assert "not up after 420 s" in lost["error"]
        assert "no DHCP request from 52:54:00:99:ff:03" in lost["hint"]
        assert wrong_mac["mac"] in lost["hint"]  # the machine's real MAC, seen by dnsmasq
        assert lost["console_tail"], "the console tail of the node that never booted"
    finally:
        lab.down()
    assert not Path(f"/run/netns/{lab.netns}").exists()

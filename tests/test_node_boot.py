"""The main job end to end: ``provision node boot --join`` on a virtual rack.

Everything is real: the compute-debian12 image built in this run, QEMU
machines (TCG here) powered through virtual BMCs over IPMI, dnsmasq/iPXE/nginx
in a network namespace, slurmctld + munged + slapd on the control node, the
join service, and each node's own join agent (or, in push mode,
``playbooks/join.yml`` over SSH with the host key pinned from each machine's
serial console).

* ``test_nodes_join_by_themselves_at_every_boot`` (the run's shared 3-node
  rack, which the rollout scenarios go on with): every node idle in sinfo
  through its agent, ``srun -N3 hostname``, ``getent passwd labuser``
  through SSSD, ``/opt/cache`` modes, the blank disk formatted and mounted;
  replayed, foreign, forged and stale requests refused; a power cycle (the
  join service down until the node is up) and ``scontrol reboot`` bring the
  nodes back to idle by themselves. (``lab down`` leaving nothing is
  checked when the shared rack goes, at the end of the run.)
* Through Redfish (``lab up --bmc redfish``): tests/test_gpu_node.py, whose
  one node boots the GPU image that way.
* ``test_faults_are_reported_per_node`` (push mode, state dir from
  ``$PROVISION_STATE_DIR``, OpenIPMI ipmi_sim as the BMCs): a dead BMC and a wrong MAC in the inventory; the
  third node still joins over SSH, the two are reported with the stage they
  reached, exit code 1.

Each test prints its per-node timeline (``-s`` shows it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from vmlab import Lab, SharedRack, needs_root, ok, rejoined, timeline, wait

from provision.image.store import ImageVersion
from provision.probe import ssh_answers

pytestmark = [pytest.mark.vm, pytest.mark.integration]

# The node side of the join protocol, by hand (what roles/join_agent does), to
# make requests the attacks below replay or forge. Prints nonce, boot id and
# the armored signature, separated by lines "--".
SIGN_ON_NODE = r"""
set -eu
url=$(sed -n 's/.*provision\.join=\([^ ]*\).*/\1/p' /proc/cmdline)
claim=${CLAIM:-$(hostname -s)}
key=${KEY:-/etc/ssh/ssh_host_ed25519_key}
boot=${BOOT:-$(cat /proc/sys/kernel/random/boot_id)}
nonce=$(curl -fsS "$url/v1/challenge?node=$claim" | sed -n 's/.*"nonce": *"\([^"]*\)".*/\1/p')
d=$(mktemp -d)
printf 'provision-join-v1\nnode=%s\nboot_id=%s\nnonce=%s\n' "$claim" "$boot" "$nonce" > "$d/m"
ssh-keygen -Y sign -q -f "$key" -n provision-join@v1 "$d/m" >/dev/null 2>&1
printf '%s\n--\n%s\n--\n' "$nonce" "$boot"; cat "$d/m.sig"; rm -rf "$d"
"""
POST_ON_NODE = (
    "url=$(sed -n 's/.*provision\\.join=\\([^ ]*\\).*/\\1/p' /proc/cmdline); "
    "curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' --data-binary @- \"$url/v1/bundle\""
)


def _signed(lab: Lab, node: dict[str, Any], env: str = "", known_hosts: Path | None = None) -> dict[str, str]:
    run = lab.ssh if known_hosts is None else (lambda n, c: lab.ssh_new(n, c, known_hosts))
    nonce, boot, signature = run(node, env + " sh -c " + shlex.quote(SIGN_ON_NODE)).split("\n--\n")
    return {"node": node["name"], "boot_id": boot.strip(), "nonce": nonce.strip(), "signature": signature}


CHALLENGE_ON_NODE = (
    "url=$(sed -n 's/.*provision\\.join=\\([^ ]*\\).*/\\1/p' /proc/cmdline); "
    "curl -s -o /dev/null -w '%{{http_code}}' \"$url/v1/challenge?node={node}\""
)


def _post_via(lab: Lab, node: dict[str, Any], body: dict[str, str], known_hosts: Path | None = None) -> str:
    """POST ``body`` from the node itself (its own source address); the HTTP status."""
    if known_hosts is not None:
        return lab.ssh_new(node, POST_ON_NODE, known_hosts, stdin=json.dumps(body))
    return lab.ssh(node, POST_ON_NODE, stdin=json.dumps(body))


def _post_from_namespace(lab: Lab, url: str, body: dict[str, str]) -> str:
    """POST from the boot server's own address in the lab namespace: another machine on the network."""
    argv = ["ip", "netns", "exec", lab.netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "-H", "Content-Type: application/json", "--data-binary", "@-", f"{url}/v1/bundle"]  # fmt: skip
    return subprocess.run(argv, input=json.dumps(body), capture_output=True, text=True, timeout=30).stdout


@needs_root
def test_nodes_join_by_themselves_at_every_boot(shared_rack: SharedRack, tmp_path: Path) -> None:
    """node boot → idle through the nodes' own agents; then a power cycle (with the join service down until the
    node is up) and `scontrol reboot` bring each node back to idle with no other command; attacks are refused."""
    lab = shared_rack.lab
    nodes = lab.status["nodes"]
    names = [n["name"] for n in nodes]
    first, second = nodes[:2]
    report = shared_rack.boot()
    booted = shared_rack.boot_result
    assert booted is not None
    print(timeline(report, lab.status["accel"]))
    assert report["summary"] == {"ok": len(names), "failed": 0}
    for node in report["nodes"]:
        assert list(node["stages"]) == ["power", "dhcp", "script", "kernel", "initrd", "rootfs", "ssh", "joined"]
        times = list(node["stages"].values())
        assert times == sorted(times), node
        assert node["host_key_pinned"], node
        print(f"{node['node']}: joined {node['stages']['joined'] - node['stages']['ssh']:.1f} s after ssh")
    for name in names:
        assert f"{name}: rootfs" in booted.stderr and f"{name}: joined (its agent reported)" in booted.stderr
    assert {lab.states()[n] for n in names} == {"idle"}
    assert sorted(lab.control("srun", f"-N{len(names)}", "hostname").split()) == sorted(names)
    # The image names itself; the agent reported what it runs.
    # The host files a stateless node makes at boot: its name, a resolver (Enroot bind-mounts both).
    assert lab.ssh(first, "cat /etc/hostname; echo; getent ahostsv4 localhost | head -1").split()[:2] == [
        first["name"], "127.0.0.1"]  # fmt: skip
    assert lab.ssh(first, "readlink -e /etc/resolv.conf").strip() == "/run/systemd/resolve/stub-resolv.conf"
    release = lab.ssh(first, "cat /etc/provision-release")
    assert release.splitlines()[0] == "PROVISION_IMAGE=compute-debian12"
    version = release.splitlines()[1].split("=")[1]
    assert lab.join_status()[first["name"]]["last_report"]["release"] == f"compute-debian12/{version}"

    # What the agent installed, with the right owners and modes; PMIx, SSSD/LDAP, the local disk.
    assert sorted(lab.ssh(first, f"srun --mpi=pmix -N{len(names)} hostname").split()) == sorted(names)
    assert lab.ssh(first, "getent passwd labuser").startswith("labuser:")
    # The nss socket that answered started without the package's services-line check (roles/sssd's drop-in).
    socket = lab.ssh(
        first, "systemctl show -p ExecStartPre --value sssd-nss.socket; systemctl is-active sssd-nss.socket"
    )
    assert socket.split() == ["active"], socket
    cache = ("/opt/cache/shared", "/opt/cache/persistent", "/opt/cache/world-tmp")
    modes = lab.ssh(first, "stat -c '%n %a' " + " ".join(cache)).split()
    assert modes == [word for path in cache for word in (path, "1777")]
    source, fstype = lab.ssh(first, "findmnt -n -o SOURCE,FSTYPE /mnt/disk").split()
    assert source == "/dev/vda" and fstype == "ext4"
    assert lab.ssh(first, "stat -c '%a %U' /etc/munge/munge.key").split() == ["400", "munge"]
    # Nothing of the bundle is left outside its final places.
    assert lab.ssh(first, "ls -A /run/provision-join 2>/dev/null | wc -l").strip() == "0"

    # Attacks, each refused (403) and logged by the service; nothing secret comes back.
    url = f"http://{lab.status['server_address']}:8740"
    captured = _signed(lab, first)
    assert _post_from_namespace(lab, url, captured) == "403"  # the same request from another address
    assert _post_via(lab, first, captured) == "200"  # the node itself: its own, fresh request
    assert _post_via(lab, first, captured) == "403"  # a replay, even from the node's own address
    other = lab.ssh(first, CHALLENGE_ON_NODE.format(node=second["name"]))
    assert other == "403"  # a node asking for another node's bundle
    forged = _signed(lab, first, env="KEY=/tmp/k; ssh-keygen -q -t ed25519 -N '' -f /tmp/k && export KEY;")
    assert _post_via(lab, first, forged) == "403"  # a key that never appeared on the console
    stolen_key = lab.ssh(first, "cat /etc/ssh/ssh_host_ed25519_key")
    old_boot = lab.join_status()[first["name"]]["boot_id"]

    # A power cycle nobody follows, with the join service down until the node is up: it rejoins by itself.
    ok(lab.cli("service", "stop"))
    cycled = time.monotonic()
    ok(lab.cli("node", "power", "cycle", "--nodes", first["name"], "--yes"))
    up = wait(f"{first['name']} sshd after the power cycle",
               lambda: ssh_answers(first["ip"], netns=lab.netns, timeout=2.0), 900)  # fmt: skip
    console = Path(first["console"])
    wait(
        "the agent retrying on the console",
        lambda: "provision: join" in console.read_text(errors="replace").split("provision: boot ")[-1],
        120,
    )
    # Before its join a booted node runs none of the services its bundle configures.
    before_join = lab.ssh_new(first, "systemctl is-active munge sssd slurmd; true", tmp_path / "known_hosts.cycle")
    assert before_join.split() == ["inactive"] * 3
    ok(lab.cli("service", "start"))
    started = time.monotonic()
    after_start = wait(f"{first['name']} idle again", lambda: rejoined(lab, first["name"], old_boot), 300, 1.0)
    print(
        f"power cycle: ssh {up:.0f} s after the power command, idle {after_start:.1f} s after the service "
        f"started ({time.monotonic() - cycled:.0f} s after power-on)"
    )

    # The old boot's key, stolen, is worth nothing now.
    fresh_hosts = tmp_path / "known_hosts.after"
    lab.ssh_new(first, "umask 077; cat > /tmp/stolen", fresh_hosts, stdin=stolen_key)
    for boot in (old_boot, None):
        env = "KEY=/tmp/stolen " + (f"BOOT={boot} " if boot else "")
        stale = _signed(lab, first, env=env, known_hosts=fresh_hosts)
        assert _post_via(lab, first, stale, fresh_hosts) == "403"
    refusals = {e["detail"] for e in json.loads(ok(lab.cli("boot", "events", "--json")).stdout)["join"]
                if e["kind"] == "refused"}  # fmt: skip
    for why in ("is not the node's provision_ip", "already used", "signature not by the host key",
                "earlier boot"):  # fmt: skip
        assert any(why in r for r in refusals), (why, refusals)

    # Slurm's own reboot (the lab's RebootProgram): back to idle by itself.
    second_boot = lab.join_status()[second["name"]]["boot_id"]
    lab.control("scontrol", "reboot", second["name"])
    rebooted = wait(f"{second['name']} idle after scontrol reboot",
                     lambda: rejoined(lab, second["name"], second_boot), 1200, 2.0)  # fmt: skip
    print(f"scontrol reboot: idle again {rebooted:.0f} s after the command")
    assert sorted(lab.control("srun", f"-N{len(names)}", "hostname").split()) == sorted(names)
    assert started > cycled


@needs_root
def test_faults_are_reported_per_node(compute_image: ImageVersion, tmp_path: Path) -> None:
    # The state dir comes from $PROVISION_STATE_DIR here, not the inventory: the
    # host keys are pinned there and the join (playbooks/join.yml) finds them there.
    elsewhere = tmp_path / "state-from-env"
    # Its BMCs are OpenIPMI's ipmi_sim (an implementation provision's client shares nothing with).
    lab = Lab(tmp_path, 3, compute_image.path.parents[1], env={"PROVISION_STATE_DIR": str(elsewhere)}, bmc="openipmi")
    try:
        good, dead_bmc, wrong_mac = lab.status["nodes"]
        hosts_file = lab.inventory / "hosts.yml"
        hosts = yaml.safe_load(hosts_file.read_text())
        rack = hosts["all"]["children"]["compute"]["children"]["rack_r1"]["hosts"]
        rack[dead_bmc["name"]]["provision_bmc_port"] = 9  # nothing answers IPMI there
        rack[wrong_mac["name"]]["provision_mac"] = "52:54:00:99:ff:03"  # not the machine's NIC
        # Push mode: playbooks/join.yml over SSH, with the host keys pinned where $PROVISION_STATE_DIR says.
        hosts["all"].setdefault("vars", {})["provision_join_mode"] = "push"
        hosts_file.write_text(yaml.safe_dump(hosts, sort_keys=False))

        booted = lab.cli(
            "node", "boot", "--rack", "r1", "--join", "--yes", "--json", "--timeout", "600", "--dhcp-timeout", "60",
            "--bmc-timeout", "3s",
            timeout=1800,
        )  # fmt: skip
        assert booted.returncode == 1, booted.stderr[-5000:]
        report = json.loads(booted.stdout)
        print(timeline(report, lab.status["accel"]))
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
        assert "no DHCP request 60 s after power-on" in lost["error"]
        assert "no DHCP request from 52:54:00:99:ff:03" in lost["hint"]
        assert wrong_mac["mac"] in lost["hint"]  # the machine's real MAC, seen by dnsmasq
        assert lost["console_tail"], "the console tail of the node that never booted"
    finally:
        lab.down()
    assert not Path(f"/run/netns/{lab.netns}").exists()

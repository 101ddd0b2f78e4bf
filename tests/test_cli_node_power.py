"""`provision node power|bootdev` end to end: the CLI, a generated inventory, virtual BMCs over UDP."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.lab.vbmc import VbmcFleet, VbmcSpec, free_udp_ports

pytestmark = pytest.mark.integration

PASSWORD = "cli-Secret-pw-5524"
PASSWORD_ENV = "TEST_RACK_BMC_PASSWORD"
GOOD = [f"n{i:02d}" for i in range(1, 9)]
PROVISION = str(Path(sys.executable).parent / "provision")


def write_inventory(path: Path, ports: dict[str, int], rack: str = "t1") -> Path:
    """An Ansible YAML inventory: one rack group, BMCs on 127.0.0.1, password from the environment."""
    lines = [
        "all:",
        "  vars:",
        "    provision_network: 10.10.0.0/16",
        "    provision_bmc_address: 127.0.0.1",
        "    provision_bmc_user: admin",
        "    provision_bmc_protocol: ipmi",
        f"    provision_bmc_password_env: {PASSWORD_ENV}",
        "  children:",
        f"    rack_{rack}:",
        "      hosts:",
    ]
    for index, (name, port) in enumerate(ports.items(), start=1):
        lines += [
            f"        {name}:",
            f'          provision_mac: "52:54:00:00:10:{index:02x}"',
            f"          provision_ip: 10.10.1.{index}",
            f"          provision_bmc_port: {port}",
        ]
    target = path / "hosts.yml"
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def rack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VbmcFleet, Path]]:
    names = [*GOOD, "dead", "wrongpw", "slow"]
    ports = dict(zip(names, free_udp_ports(len(names)), strict=True))
    specs = [VbmcSpec(n, ports[n], "admin", PASSWORD) for n in GOOD]
    specs += [
        VbmcSpec("dead", ports["dead"], "admin", PASSWORD, fault="unreachable"),
        VbmcSpec("wrongpw", ports["wrongpw"], "admin", "not-" + PASSWORD),
        VbmcSpec("slow", ports["slow"], "admin", PASSWORD, fault="slow", delay=0.5),
    ]
    base = tmp_path_factory.mktemp("rack")
    inventory = write_inventory(base, ports)
    with VbmcFleet(specs, base / "vbmc", per_process=4) as fleet:
        yield fleet, inventory


def provision(inventory: Path, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], PASSWORD_ENV: password, "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [PROVISION, "-i", str(inventory), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_power_on_over_a_rack_reports_each_node(rack: tuple[VbmcFleet, Path]) -> None:
    fleet, inventory = rack
    result = provision(inventory, "node", "power", "on", "--rack", "t1", "--retries", "0", "--json")
    assert result.returncode == 1  # two nodes failed
    report = json.loads(result.stdout)
    by_node = {n["node"]: n for n in report["nodes"]}
    assert report["summary"] == {"ok": 9, "failed": 2}
    for name in [*GOOD, "slow"]:
        assert by_node[name]["result"] == "ok"
        assert by_node[name]["value"]["power"] == "on"
        assert fleet.state(name)["power"] == "on"  # read back from the BMC's side
    assert by_node["dead"]["kind"] == "BmcUnreachableError"
    assert "no answer" in by_node["dead"]["error"]
    assert by_node["wrongpw"]["kind"] == "BmcAuthError"
    assert "provision_bmc_password" in by_node["wrongpw"]["hint"]
    assert fleet.state("wrongpw")["power"] == "off"


def test_power_status_table(rack: tuple[VbmcFleet, Path]) -> None:
    _, inventory = rack
    result = provision(inventory, "node", "power", "status", "--nodes", "n0[1-3],wrongpw", "--retries", "0")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "RESULT", "TIME", "ERROR"]
    assert any(line.startswith("wrongpw") and "authentication failed" in line for line in lines)
    assert sum(1 for line in lines if line.startswith("n0")) == 3
    assert "hint: check provision_bmc_user and provision_bmc_password" in result.stderr
    assert "power status: 3 ok, 1 failed" in result.stderr


def test_boot_device_lands_on_each_bmc(rack: tuple[VbmcFleet, Path]) -> None:
    fleet, inventory = rack
    result = provision(inventory, "node", "bootdev", "pxe", "--persistent", "--uefi", "--nodes", "n[01-08]", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [n["value"] for n in report["nodes"]] == [{"device": "pxe", "persistent": True, "uefi": True}] * 8
    for name in GOOD:
        state = fleet.state(name)
        assert (state["bootdev"], state["persistent"], state["uefi"]) == ("pxe", True, True)
    shown = provision(inventory, "node", "bootdev", "show", "--nodes", "n01", "--json")
    assert json.loads(shown.stdout)["nodes"][0]["value"] == {"device": "pxe", "persistent": True, "uefi": True}
    once = provision(inventory, "node", "bootdev", "disk", "--nodes", "n02")
    assert once.returncode == 0, once.stderr
    assert (fleet.state("n02")["bootdev"], fleet.state("n02")["persistent"]) == ("disk", False)


def test_destructive_action_over_many_nodes_needs_yes(rack: tuple[VbmcFleet, Path]) -> None:
    fleet, inventory = rack
    provision(inventory, "node", "power", "on", "--nodes", "n0[4-5]")  # not destructive: no question
    before = [fleet.state(n)["history"] for n in ("n04", "n05")]
    result = provision(inventory, "node", "power", "off", "--nodes", "n0[4-5]")
    assert result.returncode == 1
    assert "refusing to power off 2 nodes" in result.stderr
    assert "hint: pass --yes" in result.stderr
    assert [fleet.state(n)["history"] for n in ("n04", "n05")] == before  # nothing happened
    single = provision(inventory, "node", "power", "off", "--nodes", "n04")  # one node: no question
    assert single.returncode == 0, single.stderr
    assert fleet.state("n04")["power"] == "off"


def test_dry_run_prints_the_plan_and_changes_nothing(rack: tuple[VbmcFleet, Path]) -> None:
    fleet, inventory = rack
    before = {n: fleet.state(n)["history"] for n in GOOD}
    args = ["node", "power", "cycle", "--nodes", "n[01-08]", "--batch", "3", "--batch-wait", "30s", "--dry-run"]
    result = provision(inventory, *args, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["batches"] == 3 and plan["batch_wait"] == 30.0
    assert [n["node"] for n in plan["nodes"]] == GOOD
    assert plan["nodes"][0]["bmc"].startswith("127.0.0.1:")
    table = provision(inventory, *args)
    assert "would power cycle 8 nodes, 64 at a time, in 3 batch(es), 30 s between batches" in table.stderr
    assert {n: fleet.state(n)["history"] for n in GOOD} == before


def test_batches_are_spaced(rack: tuple[VbmcFleet, Path]) -> None:
    _, inventory = rack
    started = time.monotonic()
    args = ["node", "power", "status", "--nodes", "n0[1-4]", "--batch", "2", "--batch-wait", "1s"]
    result = provision(inventory, *args)
    assert result.returncode == 0, result.stderr
    assert "waiting 1 s before batch 2" in result.stderr
    assert time.monotonic() - started >= 1.0


def test_bad_option_is_one_line_and_nonzero(rack: tuple[VbmcFleet, Path]) -> None:
    _, inventory = rack
    result = provision(inventory, "node", "power", "status", "--all", "--batch-wait", "soon")
    assert result.returncode == 2
    assert "'soon' is not a duration" in result.stderr


def test_missing_password_names_the_variable(rack: tuple[VbmcFleet, Path]) -> None:
    _, inventory = rack
    result = provision(inventory, "node", "power", "status", "--nodes", "n01", "--json", password="")
    assert result.returncode == 1
    node = json.loads(result.stdout)["nodes"][0]
    assert PASSWORD_ENV in node["error"] and PASSWORD_ENV in node["hint"]


def test_node_list_still_works(rack: tuple[VbmcFleet, Path]) -> None:
    fleet, inventory = rack
    result = provision(inventory, "node", "list", "--rack", "t1", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)
    assert [n["name"] for n in nodes][:8] == GOOD
    assert nodes[0]["bmc"]["port"] == fleet.specs[0].port


def _cmdlines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_password_never_in_argv_logs_or_json(rack: tuple[VbmcFleet, Path]) -> None:
    """ps of every process (the CLI, its forked workers, the virtual BMCs), --debug logs, --json."""
    _, inventory = rack
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(_cmdlines())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # 'slow' keeps the run alive for a while; --processes 2 forks workers.
        args = ["--debug", "node", "power", "status", "--all", "--json", "--retries", "0", "--processes", "2"]
        result = provision(inventory, *args)
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 1  # dead and wrongpw
    report = json.loads(result.stdout)
    assert {n["node"] for n in report["nodes"] if n["result"] == "ok"} == {*GOOD, "slow"}
    assert any("provision" in line and "power status" in line for line in seen)  # the watcher saw the CLI
    assert any("provision.lab.vbmc" in line for line in seen)
    assert all(PASSWORD not in line for line in seen)
    assert PASSWORD not in result.stdout
    assert PASSWORD not in result.stderr
    assert "logged in (cipher suite 17)" in result.stderr  # --debug logging was on

"""provision's Redfish path against an emulator it shares no code with: sushy-tools' sushy-emulator.

Two emulators (PyPI sushy-tools, its "fake" systems driver) run on 127.0.0.1
over HTTPS with a certificate signed by a CA made here with ``openssl``, HTTP
basic auth from an htpasswd (bcrypt) file: ``one`` holds a single system
(discovered as the single member of /redfish/v1/Systems), ``many`` five
(addressed by ``provision_bmc_system_id``). The CLI drives them
(`provision -i INV node power|bootdev ... --json`) and every outcome is read
back from the emulator with plain ``requests`` calls.

The fake driver applies a power change 1 to 11 s after the request (as a
real BMC takes its time), so the power test runs each action on its own
system and polls the emulator for the state each one heads to.

sushy-emulator always reports ``BootSourceOverrideEnabled: Continuous`` (it
ignores "Once") and offers no BiosSetup target: a one-time override is read
back as persistent and fails the node, as the IPMI path fails a BMC that
does not keep a setting; asking for bios names what the BMC offers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import requires

from provision.lab.redfishsim import (
    Pki,
    emulator_argv,
    fake_system,
    free_tcp_ports,
    make_pki,
    wait_answering,
    write_emulator_config,
    write_htpasswd,
)

pytestmark = pytest.mark.integration

USER = "admin"
PASSWORD = "rf-Secret-" + os.urandom(4).hex()
PASSWORD_ENV = "TEST_RF_BMC_PASSWORD"
WRONG_ENV = "TEST_RF_WRONG_PASSWORD"
PROVISION = str(Path(sys.executable).parent / "provision")
EMULATOR = str(Path(sys.executable).parent / "sushy-emulator")
HAVE_EMULATOR = Path(EMULATOR).exists() and shutil.which("openssl") is not None
NEEDS_EMULATOR = "sushy-emulator (PyPI sushy-tools, in the test extras) and openssl"
POWER_SYSTEMS = {"p-on": "Off", "p-off": "On", "p-soft": "On", "p-cycle": "On", "p-reset": "On"}
POWER_NODES = ",".join(POWER_SYSTEMS)


@dataclass
class Emulator:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def start_emulator(base: Path, name: str, pki: Pki, systems: dict[str, str]) -> Emulator:
    work = base / name
    work.mkdir()
    htpasswd = work / "htpasswd"
    write_htpasswd(htpasswd, USER, PASSWORD)
    fake = [
        fake_system(
            system,
            f"52:54:00:00:30:{index:02x}",
            f"10.30.0.{index}",
            uuid=f"00000000-0000-4000-8000-{index:012d}",
            power=power,
        )
        for index, (system, power) in enumerate(systems.items(), start=1)
    ]
    config = work / "emulator.conf"
    write_emulator_config(config, systems=fake, auth_file=htpasswd, state_dir=work / "state")
    (port,) = free_tcp_ports(1)
    argv = emulator_argv(EMULATOR, config, port, pki)
    log = work / "emulator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    emulator = Emulator(port, process, log)
    if wait_answering(f"{emulator.url}/redfish/v1/", pki.ca, process):
        return emulator
    process.kill()
    pytest.fail(f"sushy-emulator did not start: {log.read_text()[-2000:]}")


@dataclass
class Rig:
    pki: Pki
    one: Emulator
    many: Emulator
    dead_port: int
    inventory: Path

    def get(self, emulator: Emulator, path: str) -> dict[str, Any]:
        answer = requests.get(f"{emulator.url}{path}", auth=(USER, PASSWORD), verify=str(self.pki.ca), timeout=5)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    def system(self, emulator: Emulator, name: str) -> dict[str, Any]:
        return self.get(emulator, f"/redfish/v1/Systems/{name}")

    def only_system(self) -> dict[str, Any]:
        (member,) = self.get(self.one, "/redfish/v1/Systems")["Members"]
        return self.get(self.one, member["@odata.id"])


def write_inventory(base: Path, pki: Pki, one: int, many: int, dead: int) -> Path:
    ca = {"provision_bmc_ca_file": str(pki.ca)}
    nodes: dict[str, tuple[int, dict[str, object]]] = {
        "rf1": (one, ca),
        "pinned": (one, {"provision_bmc_tls_fingerprint": pki.fingerprint.upper()}),
        "wrongpin": (one, {"provision_bmc_tls_fingerprint": "ab" * 32}),
        "untrusted": (one, {}),  # system CAs only: this test CA is not among them
        "wrongpw": (one, {**ca, "provision_bmc_password_env": WRONG_ENV}),
        "session": (one, {**ca, "provision_bmc_redfish_auth": "session"}),
        "nosystem": (many, ca),  # five systems and no provision_bmc_system_id
        "dead": (dead, ca),
    }
    for system in POWER_SYSTEMS:
        nodes[system] = (many, {**ca, "provision_bmc_system_id": system})
    lines = [
        "all:",
        "  vars:",
        "    provision_network: 10.30.0.0/16",
        "    provision_bmc_address: 127.0.0.1",
        f"    provision_bmc_user: {USER}",
        "    provision_bmc_protocol: redfish",
        "    provision_bmc_redfish_auth: basic",
        f"    provision_bmc_password_env: {PASSWORD_ENV}",
        "  children:",
        "    rack_rf:",
        "      hosts:",
    ]
    for index, (name, (port, extra)) in enumerate(nodes.items(), start=1):
        lines += [
            f"        {name}:",
            f'          provision_mac: "52:54:00:00:31:{index:02x}"',
            f"          provision_ip: 10.30.1.{index}",
            f"          provision_bmc_port: {port}",
        ]
        lines += [f"          {key}: {json.dumps(value)}" for key, value in extra.items()]
    target = base / "hosts.yml"
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if not HAVE_EMULATOR:
        pytest.fail(f"missing prerequisite: {NEEDS_EMULATOR}")
    base = tmp_path_factory.mktemp("redfish")
    pki = make_pki(base)
    one = start_emulator(base, "one", pki, {"node": "Off"})
    many = start_emulator(base, "many", pki, POWER_SYSTEMS)
    (dead,) = free_tcp_ports(1)
    try:
        yield Rig(pki, one, many, dead, write_inventory(base, pki, one.port, many.port, dead))
    finally:
        for emulator in (one, many):
            emulator.process.terminate()
            try:
                emulator.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                emulator.process.kill()
                emulator.process.wait()


def provision(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        PASSWORD_ENV: PASSWORD,
        WRONG_ENV: "X" + PASSWORD[1:],
    }
    return subprocess.run(
        [PROVISION, "-i", str(inventory), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def by_node(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in json.loads(result.stdout)["nodes"]}


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_power_actions_land_on_the_emulator(rig: Rig) -> None:
    status = provision(rig.inventory, "node", "power", "status", "--nodes", POWER_NODES, "--json")
    assert status.returncode == 0, status.stderr
    assert {k: v["value"]["power"] for k, v in by_node(status).items()} == {
        "p-on": "off",
        "p-off": "on",
        "p-soft": "on",
        "p-cycle": "on",
        "p-reset": "on",
    }
    reported = {}
    for action in ("on", "off", "soft", "cycle", "reset"):
        result = provision(rig.inventory, "node", "power", action, "--nodes", f"p-{action}", "--json")
        assert result.returncode == 0, result.stderr
        node = by_node(result)[f"p-{action}"]
        assert node["result"] == "ok" and node["value"]["action"] == action
        reported[action] = node["value"]["power"]
    assert reported == {"on": "on", "off": "off", "soft": "off", "cycle": "on", "reset": "on"}
    # Each system got exactly one Reset action (its access log); cycle and reset end On again.
    log = rig.many.log.read_text()
    for index in range(1, len(POWER_SYSTEMS) + 1):
        action = f"POST /redfish/v1/Systems/00000000-0000-4000-8000-{index:012d}/Actions/ComputerSystem.Reset"
        assert log.count(action) == 1, index
    deadline = time.monotonic() + 15
    want = {"p-on": "On", "p-off": "Off", "p-soft": "Off", "p-cycle": "On", "p-reset": "On"}
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = {name: rig.system(rig.many, name)["PowerState"] for name in want}
        if seen == want:
            break
        time.sleep(0.5)
    assert seen == want
    again = provision(rig.inventory, "node", "power", "status", "--nodes", POWER_NODES, "--json")
    assert {k: v["value"]["power"] for k, v in by_node(again).items()} == {
        "p-on": "on",
        "p-off": "off",
        "p-soft": "off",
        "p-cycle": "on",
        "p-reset": "on",
    }


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_boot_override_is_set_and_read_back(rig: Rig) -> None:
    pxe = provision(rig.inventory, "node", "bootdev", "pxe", "--persistent", "--uefi", "--nodes", "rf1", "--json")
    assert pxe.returncode == 0, pxe.stderr
    assert by_node(pxe)["rf1"]["value"] == {"device": "pxe", "persistent": True, "uefi": True}
    boot = rig.only_system()["Boot"]
    assert (boot["BootSourceOverrideTarget"], boot["BootSourceOverrideMode"]) == ("Pxe", "UEFI")

    disk = provision(rig.inventory, "node", "bootdev", "disk", "--persistent", "--nodes", "rf1", "--json")
    assert disk.returncode == 0, disk.stderr
    assert by_node(disk)["rf1"]["value"] == {"device": "disk", "persistent": True, "uefi": False}
    boot = rig.only_system()["Boot"]
    assert (boot["BootSourceOverrideTarget"], boot["BootSourceOverrideMode"]) == ("Hdd", "Legacy")
    shown = provision(rig.inventory, "node", "bootdev", "show", "--nodes", "rf1", "--json")
    assert by_node(shown)["rf1"]["value"] == {"device": "disk", "persistent": True, "uefi": False}

    # The emulator keeps no "Once": the override reads back as Continuous and the node fails, saying so.
    once = provision(rig.inventory, "node", "bootdev", "pxe", "--uefi", "--nodes", "rf1", "--json")
    assert once.returncode == 1
    node = by_node(once)["rf1"]
    assert node["kind"] == "BmcError"
    assert node["error"] == (
        f"BMC 127.0.0.1:{rig.one.port}: boot device reads back as pxe (persistent, UEFI) after setting pxe (once, UEFI)"
    )
    assert rig.only_system()["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    # What `node boot` asks for: PXE next, and a BMC that keeps it persistent will do (stateless nodes).
    from provision import inventory
    from provision.bmc import BootDevice, bootdev_nodes

    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        node = inventory.load(rig.inventory).select(nodes="rf1")[0]
        (outcome,) = bootdev_nodes([node], BootDevice.PXE, uefi=True, persistent_will_do=True)
    finally:
        del os.environ[PASSWORD_ENV]
    assert outcome.ok and outcome.value == {"device": "pxe", "persistent": True, "uefi": True}, outcome

    bios = provision(rig.inventory, "node", "bootdev", "bios", "--persistent", "--nodes", "rf1", "--json")
    assert bios.returncode == 1
    assert "BiosSetup" in by_node(bios)["rf1"]["error"]


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_tls_auth_and_dead_bmcs_fail_alone(rig: Rig) -> None:
    nodes = "rf1,pinned,wrongpin,untrusted,wrongpw,session,nosystem,dead"
    started = time.monotonic()
    result = provision(rig.inventory, "node", "power", "status", "--nodes", nodes, "--retries", "0", "--json")
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    got = by_node(result)
    where = f"BMC 127.0.0.1:{rig.one.port}"
    assert got["rf1"]["result"] == "ok" and got["pinned"]["result"] == "ok"
    assert got["wrongpin"]["kind"] == "BmcTlsError"
    assert all(n["seconds"] < 5 for n in got.values()), {k: n["seconds"] for k, n in got.items()}
    assert got["wrongpin"]["error"] == (
        f"{where}: TLS: the certificate does not match the pinned SHA-256 fingerprint (provision_bmc_tls_fingerprint)"
    )
    assert got["untrusted"]["kind"] == "BmcTlsError"
    assert got["untrusted"]["error"].startswith(f"{where}: TLS: certificate verify failed")
    assert "provision_bmc_ca_file" in got["untrusted"]["hint"]
    assert got["wrongpw"]["kind"] == "BmcAuthError"
    assert got["wrongpw"]["error"] == f"{where}: system: HTTP 401, credentials refused"
    assert "provision_bmc_password" in got["wrongpw"]["hint"]
    # sushy-emulator has no SessionService: session auth is refused with the way out.
    assert got["session"]["error"] == f"{where}: connect: the BMC offers no SessionService"
    assert got["session"]["hint"] == "set provision_bmc_redfish_auth: basic for this node"
    assert (
        got["nosystem"]["error"]
        == f"BMC 127.0.0.1:{rig.many.port}: /redfish/v1/Systems does not hold exactly one system"
    )
    assert got["dead"]["kind"] == "BmcUnreachableError"
    assert got["dead"]["error"].startswith(f"BMC 127.0.0.1:{rig.dead_port}: no answer (connect): connection refused")
    assert PASSWORD not in result.stdout + result.stderr


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_the_password_stays_out_of_argv_logs_and_json(rig: Rig) -> None:
    result = provision(rig.inventory, "--debug", "node", "power", "status", "--nodes", "rf1,wrongpw", "--json")
    assert json.loads(result.stdout)["summary"] == {"ok": 1, "failed": 1}
    assert "Authorization" not in result.stderr or "Basic" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    for emulator in (rig.one, rig.many):
        assert PASSWORD not in Path(f"/proc/{emulator.process.pid}/cmdline").read_text()


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_insecure_is_warned_about(rig: Rig, tmp_path: Path) -> None:
    text = rig.inventory.read_text().replace(
        "        untrusted:\n", "        untrusted:\n          provision_bmc_tls_insecure: true\n"
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(text)
    result = provision(inventory, "node", "power", "status", "--nodes", "untrusted,rf1", "--json")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())  # the log handler wraps lines
    assert said.count("TLS certificate checking is OFF") == 1 and "BMCs of untrusted (provision_bmc_tls" in said


@requires(HAVE_EMULATOR, NEEDS_EMULATOR)
def test_a_rack_mixes_ipmi_and_redfish(rig: Rig, tmp_path: Path) -> None:
    """One command over IPMI and Redfish nodes: each protocol's engine, one report."""
    from provision.lab.vbmc import VbmcFleet, free_udp_ports, make_specs

    (port,) = free_udp_ports(1)
    text = rig.inventory.read_text() + (
        f'        ipmi1:\n          provision_mac: "52:54:00:00:31:f1"\n          provision_ip: 10.30.1.241\n'
        f"          provision_bmc_protocol: ipmi\n          provision_bmc_port: {port}\n"
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(text)
    with VbmcFleet(make_specs(1, base_port=port, user=USER, password=PASSWORD), tmp_path / "vbmc") as fleet:
        result = provision(inventory, "node", "bootdev", "disk", "--persistent", "--nodes", "ipmi1,rf1,dead", "--json")
        assert result.returncode == 1
        got = by_node(result)
        assert set(got) == {"ipmi1", "rf1", "dead"}
        for name in ("ipmi1", "rf1"):
            assert got[name]["value"] == {"device": "disk", "persistent": True, "uefi": False}, got[name]
        assert got["dead"]["kind"] == "BmcUnreachableError"
        assert fleet.state("node01")["bootdev"] == "disk"
        assert rig.only_system()["Boot"]["BootSourceOverrideTarget"] == "Hdd"

"""provision's IPMI client against a BMC it shares no code or lineage with: OpenIPMI's ipmi_sim.

ipmi_sim (C, Debian package openipmi) runs on 127.0.0.1 on a free port with
a lan.conf (0600: it holds the test password) and a chassis-control script,
written here, that keeps the power and boot device in files. The CLI drives
it (`provision -i INV node power|bootdev ... --json`) and the outcome is read
back from those files, the simulator's side. ipmi_sim offers cipher suites
0-11 (no SHA-256): it refuses suite 17 with a two-byte "invalid
authentication algorithm" answer, so every command here also proves the
fall-back to suite 3.

Faults: a wrong password, an unknown user and a dead port are reported per
node, the two that answered at once. An impostor (a UDP responder that
answers RAKP1 with a random RAKP2) gets RAKP3 with an error status and no
key exchange code; a chassis script that reports another boot device than
the one set fails the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires
from test_ipmi_lan import FakeBmc

from provision.ipmi import wire
from provision.lab.vbmc import free_udp_ports

pytestmark = pytest.mark.integration

PASSWORD = "sim-Secret-" + os.urandom(4).hex()
PASSWORD_ENV = "TEST_SIM_BMC_PASSWORD"
WRONG_ENV = "TEST_SIM_WRONG_PASSWORD"
PROVISION = str(Path(sys.executable).parent / "provision")
HAVE_IPMI_SIM = shutil.which("ipmi_sim") is not None
NEEDS_IPMI_SIM = "ipmi_sim (Debian package openipmi; ./run setup installs it)"

# ipmi_sim calls: SCRIPT <mc> get power|boot ... ("parm:value" lines) and
# SCRIPT <mc> set parm value ... (power 0/1, reset 1, boot none/pxe/default/cdrom/bios).
# The state lives beside the script; "boot-report", when present, is what
# "get boot" answers instead of the stored device (a BMC that does not keep it).
CHASSIS_SCRIPT = """#!/bin/sh
dir=$(dirname "$0")
shift
op=$1
shift
case $op in
get)
    for parm in "$@"; do
        case $parm in
        power) echo "power:$(cat "$dir/power")" ;;
        boot)
            if [ -f "$dir/boot-report" ]; then echo "boot:$(cat "$dir/boot-report")"
            else echo "boot:$(cat "$dir/boot")"; fi ;;
        *) echo "unknown parameter $parm"; exit 1 ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        echo "$1 $2" >> "$dir/history"
        case $1 in
        power) echo "$2" > "$dir/power" ;;
        boot) echo "$2" > "$dir/boot" ;;
        shutdown) echo 0 > "$dir/power" ;;
        esac
        shift 2
    done ;;
*) exit 1 ;;
esac
"""


@dataclass
class Sim:
    port: int
    dead_port: int
    state: Path  # the chassis script's directory
    inventory: Path
    process: subprocess.Popen[bytes]

    def read(self, name: str) -> str:
        path = self.state / name
        return path.read_text().strip() if path.exists() else ""

    def history(self) -> list[str]:
        return self.read("history").splitlines()

    def reset_state(self, power: str = "0", boot: str = "none") -> None:
        (self.state / "power").write_text(power + "\n")
        (self.state / "boot").write_text(boot + "\n")
        for name in ("history", "boot-report"):
            (self.state / name).unlink(missing_ok=True)


def write_inventory(path: Path, port: int, dead_port: int) -> Path:
    nodes = {
        "sim1": (port, {}),
        "wrongpw": (port, {"provision_bmc_password_env": WRONG_ENV}),
        "wronguser": (port, {"provision_bmc_user": "nobody"}),
        "dead": (dead_port, {}),
    }
    lines = [
        "all:",
        "  vars:",
        "    provision_network: 10.20.0.0/16",
        "    provision_bmc_address: 127.0.0.1",
        "    provision_bmc_user: admin",
        f"    provision_bmc_password_env: {PASSWORD_ENV}",
        "  children:",
        "    rack_sim:",
        "      hosts:",
    ]
    for index, (name, (bmc_port, extra)) in enumerate(nodes.items(), start=1):
        lines += [
            f"        {name}:",
            f'          provision_mac: "52:54:00:00:20:{index:02x}"',
            f"          provision_ip: 10.20.1.{index}",
            f"          provision_bmc_port: {bmc_port}",
        ]
        lines += [f"          {key}: {value}" for key, value in extra.items()]
    target = path / "hosts.yml"
    target.write_text("\n".join(lines) + "\n")
    return target


def answers(port: int, timeout: float) -> bool:
    """Whether something on 127.0.0.1:port answers Get Channel Authentication Capabilities."""
    request = wire.build_v15_packet(wire.channel_auth_capabilities_request(1, wire.PRIV_OPERATOR))
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            sock.sendto(request, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                if wire.session_less_message(sock.recv(4096)) is not None:
                    return True
            time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    base = tmp_path_factory.mktemp("ipmi-sim")
    port, dead_port = free_udp_ports(2)
    state = base / "chassis"
    state.mkdir()
    script = state / "chassis-control"
    script.write_text(CHASSIS_SCRIPT)
    script.chmod(0o755)
    lan_conf = base / "lan.conf"
    fd = os.open(lan_conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds the password
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "\n".join(
                [
                    'name "provision-test"',
                    "set_working_mc 0x20",
                    "  startlan 1",
                    f"    addr 127.0.0.1 {port}",
                    "    priv_limit admin",
                    "    allowed_auths_callback md5",
                    "    allowed_auths_user md5",
                    "    allowed_auths_operator md5",
                    "    allowed_auths_admin md5",
                    "    guid a123456789abcdefa123456789abcdef",
                    "  endlan",
                    f'  chassis_control "{script} 0x20"',
                    f'  user 2 true "admin" "{PASSWORD}" admin 10 md5',
                    "",
                ]
            )
        )
    emu = base / "bmc.emu"
    emu.write_text("mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n")
    (base / "sim-state").mkdir()
    argv = ["ipmi_sim", "-n", "-c", str(lan_conf), "-f", str(emu), "-s", str(base / "sim-state")]
    log = (base / "ipmi_sim.log").open("wb")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    running = Sim(port, dead_port, state, write_inventory(base, port, dead_port), process)
    running.reset_state()
    try:
        if not answers(port, timeout=10):
            pytest.fail(f"ipmi_sim did not come up on 127.0.0.1:{port}: {(base / 'ipmi_sim.log').read_text()}")
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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


def one(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    report = json.loads(result.stdout)
    (node,) = report["nodes"]
    assert isinstance(node, dict)
    return node


@requires(HAVE_IPMI_SIM, NEEDS_IPMI_SIM)
def test_power_actions_land_on_the_simulator(sim: Sim) -> None:
    sim.reset_state(power="0")
    steps = [("status", "off", "0"), ("on", "on", "1"), ("status", "on", "1"), ("off", "off", "0")]
    for action, reported, on_the_bmc in steps:
        started = time.monotonic()
        result = provision(sim.inventory, "node", "power", action, "--nodes", "sim1", "--json")
        assert result.returncode == 0, result.stderr
        node = one(result)
        assert node["result"] == "ok" and node["value"]["power"] == reported  # type: ignore[index]
        assert sim.read("power") == on_the_bmc, action
        assert isinstance(node["seconds"], float) and node["seconds"] < 1.0  # no waiting for suite 17
        assert time.monotonic() - started < 10
    assert sim.history() == ["power 1", "power 0"]

    cycle = provision(sim.inventory, "node", "power", "cycle", "--nodes", "sim1", "--json")
    assert cycle.returncode == 0, cycle.stderr
    assert one(cycle)["value"] == {"power": "on", "action": "cycle"}
    deadline = time.monotonic() + 5  # ipmi_sim powers on again one second after the off
    while sim.read("power") != "1" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sim.history()[-2:] == ["power 0", "power 1"]

    reset = provision(sim.inventory, "node", "power", "reset", "--nodes", "sim1", "--json")
    assert reset.returncode == 0, reset.stderr
    assert one(reset)["value"] == {"power": "on", "action": "reset"}
    assert sim.history()[-1] == "reset 1" and sim.read("power") == "1"


@requires(HAVE_IPMI_SIM, NEEDS_IPMI_SIM)
def test_boot_device_is_set_and_read_back(sim: Sim) -> None:
    sim.reset_state()
    pxe = provision(sim.inventory, "node", "bootdev", "pxe", "--nodes", "sim1", "--json")
    assert pxe.returncode == 0, pxe.stderr
    assert one(pxe)["value"] == {"device": "pxe", "persistent": False, "uefi": False}
    assert sim.read("boot") == "pxe"
    shown = provision(sim.inventory, "node", "bootdev", "show", "--nodes", "sim1", "--json")
    assert one(shown)["value"] == {"device": "pxe", "persistent": False, "uefi": False}

    disk = provision(sim.inventory, "node", "bootdev", "disk", "--nodes", "sim1")
    assert disk.returncode == 0, disk.stderr
    assert sim.read("boot") == "default"  # ipmi_sim's name for selector 2, "force boot from default hard drive"
    shown = provision(sim.inventory, "node", "bootdev", "show", "--nodes", "sim1", "--json")
    assert one(shown)["value"] == {"device": "disk", "persistent": False, "uefi": False}


@requires(HAVE_IPMI_SIM, NEEDS_IPMI_SIM)
def test_a_boot_device_the_bmc_does_not_keep_fails_the_node(sim: Sim) -> None:
    sim.reset_state()
    (sim.state / "boot-report").write_text("bios\n")  # acknowledges every set, reports BIOS setup
    result = provision(sim.inventory, "node", "bootdev", "pxe", "--nodes", "sim1", "--json")
    assert result.returncode == 1
    node = one(result)
    assert node["result"] == "failed" and node["kind"] == "BmcError"
    assert f"BMC 127.0.0.1:{sim.port}: boot device reads back as bios (once, legacy) after setting pxe" in str(
        node["error"]
    )
    assert sim.read("boot") == "pxe"  # it was set; the BMC just does not report it

    # ipmi_sim keeps no "persistent" flag: asking for one is a mismatch too, said in the table
    (sim.state / "boot-report").unlink()
    persistent = provision(sim.inventory, "node", "bootdev", "pxe", "--persistent", "--nodes", "sim1", "--json")
    assert persistent.returncode == 1
    assert "reads back as pxe (once, legacy) after setting pxe (persistent, legacy)" in str(one(persistent)["error"])


@requires(HAVE_IPMI_SIM, NEEDS_IPMI_SIM)
def test_faults_are_reported_per_node_and_fast(sim: Sim) -> None:
    sim.reset_state(power="1")
    result = provision(
        sim.inventory, "node", "power", "status", "--nodes", "sim1,wrongpw,wronguser,dead", "--retries", "0", "--json"
    )
    assert result.returncode == 1
    by_node = {n["node"]: n for n in json.loads(result.stdout)["nodes"]}
    assert by_node["sim1"]["result"] == "ok" and by_node["sim1"]["value"] == {"power": "on"}
    wrongpw, wronguser, dead = by_node["wrongpw"], by_node["wronguser"], by_node["dead"]
    assert wrongpw["kind"] == "BmcAuthError" and "RAKP2 code does not match" in wrongpw["error"]
    assert wronguser["kind"] == "BmcAuthError" and "unauthorized name (0x0d)" in wronguser["error"]
    for answered in (by_node["sim1"], wrongpw, wronguser):
        assert answered["seconds"] < 1.0, answered  # it answered: no waiting
    for refused in (wrongpw, wronguser):
        assert "provision_bmc_user and provision_bmc_password" in refused["hint"]
    assert dead["kind"] == "BmcUnreachableError"
    assert dead["error"].startswith(f"BMC 127.0.0.1:{sim.dead_port}: no answer to Get Channel Authentication")
    assert PASSWORD not in result.stdout and PASSWORD not in result.stderr


@requires(HAVE_IPMI_SIM, NEEDS_IPMI_SIM)
def test_the_password_stays_out_of_argv_logs_and_json(sim: Sim) -> None:
    lan_conf = sim.inventory.parent / "lan.conf"
    assert stat.S_IMODE(lan_conf.stat().st_mode) == 0o600
    assert PASSWORD not in Path(f"/proc/{sim.process.pid}/cmdline").read_text()
    result = provision(sim.inventory, "--debug", "node", "power", "status", "--nodes", "sim1,wrongpw", "--json")
    assert json.loads(result.stdout)["summary"] == {"ok": 1, "failed": 1}
    assert PASSWORD not in result.stdout + result.stderr


def test_an_impostor_gets_no_key_exchange_code(tmp_path: Path) -> None:
    """A peer that answers Open Session and RAKP1 without knowing the password gets RAKP3 with an error only."""

    def open_response(request: bytes) -> bytes:
        return (
            bytes([request[0], 0, 4, 0])
            + request[4:8]
            + b"\x0a\x0b\x0c\x0d"
            + bytes([0, 0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 8, 4, 0, 0, 0, 2, 0, 0, 8, 1, 0, 0, 0])
        )

    def random_rakp2(request: bytes) -> bytes:  # Rc, GUID and a code made without the password
        return bytes([request[0], 0, 0, 0]) + console_sids[-1] + os.urandom(16 + 16 + 32)

    console_sids: list[bytes] = []

    def remember(request: bytes) -> bytes:
        console_sids.append(request[4:8])
        return open_response(request)

    impostor = FakeBmc(remember, rakp1=random_rakp2)
    try:
        inventory = write_inventory(tmp_path, impostor.port, impostor.port)
        result = provision(inventory, "node", "power", "status", "--nodes", "sim1", "--retries", "0", "--json")
        deadline = time.monotonic() + 2
        while not any(p.payload_type == wire.PAYLOAD_RAKP3 for p in impostor.received) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        impostor.close()
    node = one(result)
    assert node["kind"] == "BmcAuthError" and "RAKP2 code does not match" in str(node["error"])
    (rakp3,) = [p for p in impostor.received if p.payload_type == wire.PAYLOAD_RAKP3]
    rakp1 = next(p for p in impostor.received if p.payload_type == wire.PAYLOAD_RAKP1)
    assert rakp3.session_id == 0 and not rakp3.authenticated
    payload = rakp3.payload
    assert payload[1] == wire.RMCP_INVALID_ICV  # "invalid integrity check value"
    assert payload[4:8] == b"\x0a\x0b\x0c\x0d"  # the (impostor's) managed system session id
    assert len(payload) == 8, "RAKP3 after a RAKP2 mismatch must carry no key exchange authentication code"
    assert payload[0] == (rakp1.payload[0] + 1) & 0xFF

"""Virtual BMCs speak real IPMI: ipmitool and FreeIPMI talk to them over UDP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.lab.vbmc import VbmcFleet, VbmcSpec, free_udp_ports, read_state

pytestmark = pytest.mark.integration

PASSWORD = "vbmc-Test-pw-7781"


def ipmitool(
    port: int, *args: str, suite: str | None = None, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    argv = ["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port), "-U", "admin", "-E"]
    if suite is not None:
        argv += ["-C", suite]
    # -E: the password comes from IPMI_PASSWORD, not argv.
    env = {"PATH": os.environ["PATH"], "IPMI_PASSWORD": password}
    return subprocess.run([*argv, "-R", "2", "-N", "1", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VbmcFleet]:
    ports = free_udp_ports(4)
    specs = [
        VbmcSpec("both", ports[0], "admin", PASSWORD),
        VbmcSpec("only3", ports[1], "admin", PASSWORD, suites=(3,)),
        VbmcSpec("only17", ports[2], "admin", PASSWORD, suites=(17,)),
        VbmcSpec("flags", ports[3], "admin", PASSWORD),
    ]
    with VbmcFleet(specs, tmp_path_factory.mktemp("vbmc")) as running:
        yield running


def port(fleet: VbmcFleet, name: str) -> int:
    return next(s.port for s in fleet.specs if s.name == name)


@pytest.mark.parametrize("suite", ["17", "3"])
def test_ipmitool_lanplus_reads_power_status(fleet: VbmcFleet, suite: str) -> None:
    result = ipmitool(port(fleet, "both"), "chassis", "power", "status", suite=suite)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Chassis Power is off"


def test_ipmitool_power_on_lands_in_bmc_state(fleet: VbmcFleet) -> None:
    p = port(fleet, "both")
    assert ipmitool(p, "chassis", "power", "on").returncode == 0
    assert fleet.state("both")["power"] == "on"
    assert ipmitool(p, "chassis", "power", "status").stdout.strip() == "Chassis Power is on"
    assert ipmitool(p, "chassis", "power", "off").returncode == 0
    assert fleet.state("both")["power"] == "off"


def test_bmc_refuses_a_suite_it_does_not_offer(fleet: VbmcFleet) -> None:
    refused = ipmitool(port(fleet, "only3"), "chassis", "power", "status", suite="17")
    assert refused.returncode != 0
    assert "no matching cipher suite" in refused.stderr
    assert ipmitool(port(fleet, "only17"), "chassis", "power", "status", suite="3").returncode != 0
    assert ipmitool(port(fleet, "only17"), "chassis", "power", "status", suite="17").returncode == 0


def test_cipher_suite_zero_is_never_offered(fleet: VbmcFleet) -> None:
    result = ipmitool(port(fleet, "both"), "chassis", "power", "status", suite="0")
    assert result.returncode != 0


def test_wrong_password_is_refused(fleet: VbmcFleet) -> None:
    result = ipmitool(port(fleet, "both"), "chassis", "power", "status", password="not-the-password")
    assert result.returncode != 0
    assert "Chassis Power" not in result.stdout


def test_ipmitool_sees_the_cipher_suites_on_offer(fleet: VbmcFleet) -> None:
    result = ipmitool(port(fleet, "both"), "channel", "getciphers", "ipmi", "1", suite="3")
    assert result.returncode == 0, result.stderr
    ids = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert ids == {"3", "17"}


def test_one_time_boot_override_is_consumed_by_the_boot(fleet: VbmcFleet) -> None:
    p = port(fleet, "flags")
    assert ipmitool(p, "chassis", "bootdev", "pxe", "options=efiboot").returncode == 0
    state = fleet.state("flags")
    assert (state["bootdev"], state["persistent"], state["uefi"]) == ("pxe", False, True)
    assert ipmitool(p, "chassis", "power", "on").returncode == 0
    state = fleet.state("flags")
    assert "boot:pxe" in state["history"]
    assert state["bootdev"] == "none"  # consumed
    assert ipmitool(p, "chassis", "bootdev", "disk", "options=persistent").returncode == 0
    assert ipmitool(p, "chassis", "power", "reset").returncode == 0
    state = fleet.state("flags")
    assert state["history"][-2:] == ["boot:disk", "reset"]
    assert (state["bootdev"], state["persistent"]) == ("disk", True)  # persistent stays


def test_power_cycle_of_an_off_node_is_refused_in_present_state(fleet: VbmcFleet) -> None:
    p = port(fleet, "only3")
    assert ipmitool(p, "chassis", "power", "off", suite="3").returncode == 0
    result = ipmitool(p, "chassis", "power", "cycle", suite="3")
    assert result.returncode != 0
    assert fleet.state("only3")["power"] == "off"


HOOKS_SCRIPT = """
import json, sys
from provision.lab.vbmc import SimulatedMachine, VbmcSpec, create, free_udp_ports

class Recorder(SimulatedMachine):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.boot_device = None
    def start(self):
        self.calls.append("start"); super().start()
    def stop(self):
        self.calls.append("stop"); super().stop()
    def reset(self):
        self.calls.append("reset")
    def set_boot_device(self, device, persistent, uefi):
        self.boot_device = [device, persistent, uefi]

machine = Recorder()
bmc = create(VbmcSpec("hooks", free_udp_ports(1)[0], "admin", "pw"), machine=machine)
bmc.boot_valid, bmc.bootdev = True, "pxe"
codes = [bmc.power_on(), bmc.power_reset(), bmc.power_off(), bmc.power_cycle()]
print(json.dumps({"codes": codes, "calls": machine.calls, "boot_device": machine.boot_device}))
"""


def test_machine_hooks_are_called() -> None:
    """The BMC drives whatever machine it is given (in a child: pyghmi's server state is per process)."""
    import json

    result = subprocess.run([sys.executable, "-c", HOOKS_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["codes"] == [0, 0, 0, 0xD5]  # cycle while off: not in present state
    assert out["calls"] == ["start", "reset", "stop"]
    assert out["boot_device"] == ["none", False, False]  # the one-time pxe was consumed by the first boot


def _two_free_ports() -> int:
    import socket

    for _ in range(50):
        base = free_udp_ports(1)[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free UDP ports")


def test_module_entry_point_serves_until_terminated(tmp_path: Path) -> None:
    base = _two_free_ports()
    env = {"PATH": os.environ["PATH"], "PROVISION_VBMC_PASSWORD": PASSWORD}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provision.lab.vbmc",
            "--count",
            "2",
            "--base-port",
            str(base),
            "--state-dir",
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "2 virtual BMCs" in line
        assert PASSWORD not in " ".join(proc.args)  # type: ignore[arg-type]
        result = ipmitool(base, "chassis", "power", "on")
        assert result.returncode == 0, result.stderr
        assert read_state(tmp_path, "node01")["power"] == "on"
        assert read_state(tmp_path, "node02")["power"] == "off"
    finally:
        proc.terminate()
        proc.wait(10)


def test_qemu_machine_adapter_boots_the_device_the_bmc_chose() -> None:
    """provision.lab.vm.Machine behind a BMC: the boot device picks start(boot=...)."""
    from provision.lab.vbmc import QemuMachine
    from provision.lab.vm import BootFrom

    class FakeQemu:  # the shape of provision.lab.vm.Machine, without QEMU
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []
            self.is_running = False

        def start(self, boot: BootFrom | None = None) -> None:
            self.calls.append(("start", boot))
            self.is_running = True

        def stop(self) -> None:
            self.calls.append(("stop", None))
            self.is_running = False

        def reset(self) -> None:
            self.calls.append(("reset", None))

    qemu = FakeQemu()
    machine = QemuMachine(qemu)
    machine.set_boot_device("pxe", False, False)
    machine.start()
    machine.reset()  # same device: the reset button
    machine.set_boot_device("disk", True, False)
    machine.reset()  # another device: QEMU restarts with it
    assert qemu.calls == [
        ("start", BootFrom.NETWORK),
        ("reset", None),
        ("stop", None),
        ("start", BootFrom.DISK),
    ]
    assert machine.is_running

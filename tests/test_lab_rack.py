"""``provision lab up/down``: a virtual rack, for real.

One integration test builds a two-machine rack (namespace, bridge, taps, a
virtual BMC process owning two QEMU machine specs, the control node, the
built-in boot server) through the CLI, drives it with the normal commands on
the generated inventory over real IPMI, and removes it again (twice). No image
is needed: the test powers a machine on and off without waiting for a boot.
The fast tests check bad input and the machine-spec round trip the BMC process
relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import requires

from provision.lab.rack import Rack, RackConfig, RackError
from provision.lab.vbmc import machine_spec_from_json, machine_spec_to_json
from provision.lab.vm import Accel, BootFrom, MachineSpec, Nic
from provision.proc import pid_alive

PROVISION = str(Path(sys.executable).with_name("provision"))
needs_root = requires(os.geteuid() == 0, "namespaces need root; CI runs the suite as root")


def provision(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env_extra or {})}
    if "PYTHONPATH" in os.environ:  # a checkout run without installing it: the CLI imports the same code
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [PROVISION, *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def _comms_in(netns: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    comms = []
    for pid in pids:
        with contextlib.suppress(OSError):
            comms.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return comms


def _bmc_password(all_yml: str, vault_password: str) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    ciphertext = all_yml.split("provision_bmc_password: !vault |\n", 1)[1]
    text = "\n".join(line.strip() for line in ciphertext.splitlines() if line.startswith("  "))
    return str(VaultLib([("default", VaultSecret(vault_password.encode()))]).decrypt(text).decode())


# -- fast -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes: 0 is out of range"),
        ({"rack": "R 1"}, "--rack: 'R 1' is not a rack name"),
        ({"netns": "bad/name"}, "--netns: 'bad/name' is not a namespace name"),
        ({"network": "10.99.0.300/24"}, "network: '10.99.0.300/24' is not a CIDR"),
        ({"network": "10.99.0.0/30"}, "too small"),
        ({"image": "../compute"}, "--image: '../compute' is not an image name"),
    ],
)
def test_config_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RackError, match=message):
        RackConfig(**kwargs)  # type: ignore[arg-type]


def test_config_addresses() -> None:
    config = RackConfig(nodes=2, rack="r7")
    assert config.server_address == "10.99.0.1"
    assert [config.node_name(i) for i in range(2)] == ["r7n01", "r7n02"]
    assert [config.node_ip(i) for i in range(2)] == ["10.99.0.11", "10.99.0.12"]
    assert config.node_mac(1) == "52:54:00:99:00:02"


def test_machine_spec_travels_as_json(tmp_path: Path) -> None:
    spec = MachineSpec(
        name="r1n01",
        workdir=tmp_path,
        memory_mib=1536,
        nics=(Nic(mac="52:54:00:99:00:01", tap="ltr101"),),
        boot=BootFrom.NETWORK,
        disk=tmp_path / "d.raw",
        netns="ns1",
        accel=Accel.TCG,
    )
    data = json.loads(json.dumps(machine_spec_to_json(spec)))
    assert machine_spec_from_json(data) == spec


def test_down_without_a_rack_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("kept")
    assert Rack(tmp_path).down() == []
    assert (tmp_path / "mine.txt").read_text() == "kept"


@pytest.mark.parametrize(
    ("system", "action"),
    [
        ({"power_state": "Off"}, "off"),
        ({"power_state": "On", "pending_power": None}, "on"),
        ({"power_state": "Off", "pending_power": {"power_state": "On", "apply_time": 1}}, "on"),
        ({"power_state": "On", "pending_power": {"power_state": "Off", "apply_time": 1}}, "off"),
        ({"power_state": "Off", "pending_power": {"power_state": "ForceRestart", "apply_time": 1}}, "restart"),
    ],
)
def test_redfish_notification_plan(system: dict[str, object], action: str) -> None:
    """The power a notified system is in or heads to (a pending change counts at once)."""
    from provision.lab.redfishsim import plan

    assert plan({"name": "r1n01", **system}) == action


class _SleepMachine:
    """Stands in for provision.lab.vm.Machine: a process in its own session, and the boot it was given."""

    boots: ClassVar[list[object]] = []

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, boot: object = None) -> None:
        _SleepMachine.boots.append(boot)
        self._proc = subprocess.Popen(["sleep", "60"], start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


def test_redfish_notifications_drive_the_chassis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the receiver does with the emulator's notifications, through provision.lab.chassis (pids, history)."""
    from provision.lab import chassis, vm
    from provision.lab.redfishsim import apply

    monkeypatch.setattr(vm, "Machine", _SleepMachine)
    monkeypatch.setattr(_SleepMachine, "boots", [])
    spec = MachineSpec(name="r1n01", workdir=tmp_path, nics=(Nic(mac="52:54:00:99:00:01", tap="ltr101"),))
    chassis.write_spec(tmp_path, "r1n01", machine_spec_to_json(spec))
    system = {"name": "r1n01", "power_state": "Off", "boot_device": "Pxe"}
    pending_on = {"power_state": "On", "apply_time": 100}
    restart = {"power_state": "ForceRestart", "apply_time": 200}
    assert apply(tmp_path, {**system, "boot_mode": "Legacy"}) == ["boot Pxe"]
    assert apply(tmp_path, {**system, "pending_power": pending_on}) == ["on"]
    first = chassis.load(tmp_path, "r1n01")["pid"]
    assert pid_alive(first)
    assert apply(tmp_path, {**system, "power_state": "On"}) == []  # the pending change applied: nothing to do
    assert apply(tmp_path, {**system, "pending_power": restart}) == ["restart"]
    assert apply(tmp_path, {**system, "pending_power": restart, "boot_mode": "UEFI"}) == []  # the same restart
    second = chassis.load(tmp_path, "r1n01")["pid"]
    assert second != first and pid_alive(second) and not pid_alive(first)
    assert apply(tmp_path, {**system, "power_state": "On", "boot_device": "Hdd"}) == ["boot Hdd"]
    hdd = {**system, "boot_device": "Hdd"}
    assert apply(tmp_path, {**hdd, "power_state": "On", "pending_power": {"power_state": "Off"}}) == ["off"]
    assert not pid_alive(second)
    assert apply(tmp_path, {**hdd, "pending_power": pending_on}) == ["on"]
    chassis.power_off(chassis.load(tmp_path, "r1n01"))
    assert chassis.load(tmp_path, "r1n01")["history"] == ["boot Pxe", "on", "restart", "boot Hdd", "off", "on"]
    assert _SleepMachine.boots == [BootFrom.NETWORK, BootFrom.NETWORK, BootFrom.DISK]


def test_lab_pki_and_htpasswd(tmp_path: Path) -> None:
    """The lab's BMC certificate (signed by a CA whose key is gone), its fingerprint, the bcrypt htpasswd (0600)."""
    import bcrypt

    from provision.lab.redfishsim import make_pki, write_htpasswd

    pki = make_pki(tmp_path / "pki")
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == ["bmc.key", "bmc.pem", "ca.pem"]
    assert stat.S_IMODE(pki.key.stat().st_mode) == 0o600
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.ca), str(pki.cert)], capture_output=True)
    assert verify.returncode == 0, verify.stderr
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pki.cert)], capture_output=True, text=True
    ).stdout
    assert shown.strip().split("=", 1)[1].replace(":", "").lower() == pki.fingerprint
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, "admin", "s3cret-Pw")
    assert stat.S_IMODE(htpasswd.stat().st_mode) == 0o600
    user, digest = htpasswd.read_text().strip().split(":", 1)
    assert user == "admin" and bcrypt.checkpw(b"s3cret-Pw", digest.encode()) and "s3cret" not in digest


def test_redfish_lab_without_the_emulator_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No sushy-emulator: one error with the way out, before anything is built."""
    from provision.lab import redfishsim
    from provision.lab.rack import BmcKind

    if os.geteuid() != 0:
        pytest.fail("missing prerequisite: root (the suite runs as root)")
    monkeypatch.setattr(redfishsim, "find_emulator", lambda: None)
    with pytest.raises(RackError, match="--bmc redfish: sushy-emulator is not installed") as raised:
        Rack(tmp_path / "lab").up(RackConfig(nodes=1, netns=f"provtest-{uuid.uuid4().hex[:6]}", bmc=BmcKind.REDFISH))
    assert "sushy-tools" in (raised.value.hint or "")
    assert not (tmp_path / "lab").exists()


# -- integration: the real rack ------------------------------------------------------


@pytest.mark.integration
@needs_root
def test_lab_up_drive_and_down(tmp_path: Path) -> None:
    state = tmp_path / "lab"
    netns = f"provtest-{uuid.uuid4().hex[:6]}"
    assert "--state-dir" in _ok(provision("lab", "up", "--help")).stdout
    up = _ok(provision("lab", "up", "--nodes", "2", "--netns", netns, "--state-dir", str(state), "--json"))
    try:
        info = json.loads(up.stdout)
        nodes = [n["name"] for n in info["nodes"]]
        assert nodes == ["r1n01", "r1n02"]
        assert info["accel"] in ("kvm", "tcg")
        assert len({n["bmc_port"] for n in info["nodes"]}) == 2
        assert info["boot"]["images"] == {"compute-debian12": "not published"}
        inventory = Path(info["inventory"])
        vault_file = Path(info["vault_password_file"])
        assert stat.S_IMODE(vault_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(vault_file.parent.stat().st_mode) == 0o700
        all_yml = (inventory / "group_vars" / "all.yml").read_text()
        assert "provision_bmc_password: !vault |" in all_yml
        assert "slurm_conf_server: 10.99.0.1:6817" in all_yml
        assert f"provision_boot_netns: {netns}" in all_yml
        vault_password = vault_file.read_text().strip()
        bmc_password = _bmc_password(all_yml, vault_password)
        assert len(bmc_password) >= 16
        for text in (up.stdout, up.stderr, (state / "vbmc.log").read_text()):
            assert vault_password not in text and bmc_password not in text

        site = ["-i", str(inventory), "--vault-password-file", str(vault_file)]
        check = _ok(provision(*site, "inventory", "check"))
        assert "2 nodes" in check.stdout

        status = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert {n["node"]: n["value"]["power"] for n in status["nodes"]} == {"r1n01": "off", "r1n02": "off"}

        bootdev = json.loads(_ok(provision(*site, "node", "bootdev", "pxe", "--nodes", "r1n01", "--json")).stdout)
        assert bootdev["nodes"][0]["value"]["device"] == "pxe"
        bmc_state = json.loads((state / "vbmc" / "r1n01.json").read_text())
        assert bmc_state["bootdev"] == "pxe"

        # Services of the rack run inside its namespace.
        comms = _comms_in(netns)
        for daemon in ("dnsmasq", "nginx", "slurmctld", "munged", "slapd"):
            assert daemon in comms, comms
        assert not any(c.startswith("qemu") for c in comms)

        _ok(provision(*site, "node", "power", "on", "--nodes", "r1n01"))
        rack_status = json.loads(_ok(provision("lab", "status", "--state-dir", str(state), "--json")).stdout)
        by_name = {n["name"]: n for n in rack_status["nodes"]}
        pid = by_name["r1n01"]["qemu_pid"]
        assert pid and by_name["r1n01"]["power"] == "on"
        assert by_name["r1n02"]["qemu_pid"] is None and by_name["r1n02"]["power"] == "off"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert Path(cmdline[0]).name == "qemu-system-x86_64"
        assert "mac=52:54:00:99:00:01" in " ".join(cmdline)
        assert "-boot" in cmdline and cmdline[cmdline.index("-boot") + 1] == "n"  # the BMC's pxe override
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
        on = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert {n["node"]: n["value"]["power"] for n in on["nodes"]} == {"r1n01": "on", "r1n02": "off"}

        # The wiring works end to end without an image: iPXE on the tap gets DHCP from dnsmasq in the
        # namespace, then its boot script from nginx, which says no image is published (~6 s under TCG).
        console = state / "machines" / "r1n01.console.log"
        expected = "provision: r1n01: image compute-debian12 has no active version"
        deadline = time.monotonic() + 90
        while expected not in console.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert expected in console.read_text(errors="replace"), console.read_text(errors="replace")[-500:]

        # reset: the same QEMU process is reset through its monitor (no boot device change pending).
        _ok(provision(*site, "node", "power", "reset", "--nodes", "r1n01"))
        assert pid_alive(pid)
        assert json.loads((state / "vbmc" / "r1n01.json").read_text())["history"][-1] == "reset"

        # A second `lab up` on the same state dir, or on an existing namespace, is refused and changes nothing.
        again = provision("lab", "up", "--nodes", "2", "--netns", netns, "--state-dir", str(state))
        assert again.returncode == 1 and "already recorded" in again.stderr, again.stderr
        other = tmp_path / "other"
        clash = provision("lab", "up", "--nodes", "1", "--netns", netns, "--state-dir", str(other))
        assert clash.returncode == 1 and f"network namespace {netns} already exists" in clash.stderr, clash.stderr
        assert not other.exists()
        assert pid_alive(pid) and Path(f"/run/netns/{netns}").exists()

        _ok(provision(*site, "node", "power", "off", "--nodes", "r1n01"))
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid)
    finally:
        down = provision("lab", "down", "--state-dir", str(state), "--json")
    _ok(down)
    removed = json.loads(down.stdout)["removed"]
    assert f"netns:{netns}" in removed and "tap:ltr101" in removed and "tap:ltr102" in removed
    assert not Path(f"/run/netns/{netns}").exists()
    assert not state.exists()
    pids = [info["vbmc_pid"], *info["control"].values(), *info["boot"]["services"].values()]
    assert all(pids), pids
    for pid_ in pids:
        assert not pid_alive(pid_), pid_
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "ltr101" not in links and "labbr0" not in links
    again = _ok(provision("lab", "down", "--state-dir", str(state), "--json"))
    assert json.loads(again.stdout)["removed"] == []


@pytest.mark.integration
@needs_root
def test_failed_up_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure half-way (here: the control node) removes what was built: BMC process, taps, namespace, files."""
    from provision.errors import ProvisionError
    from provision.lab import control

    def broken_start(self: object, timeout: float = 60.0) -> None:
        raise control.ControlPlaneError("slurmctld did not start (injected)")

    monkeypatch.setattr(control.ControlPlane, "start", broken_start)
    netns = f"provtest-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "lab"
    rack = Rack(state)
    with pytest.raises(ProvisionError, match="injected"):
        rack.up(RackConfig(nodes=1, netns=netns))
    assert not Path(f"/run/netns/{netns}").exists()
    assert not state.exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", f"provision.lab.vbmc --serve-stdin --state-dir {state}"], capture_output=True
    )
    assert leftovers.returncode == 1, leftovers.stdout


@pytest.mark.integration
@needs_root
def test_down_when_the_inventory_is_broken(tmp_path: Path) -> None:
    """`lab down` still removes everything when the boot server cannot be stopped through the inventory."""
    state = tmp_path / "lab"
    netns = f"provtest-{uuid.uuid4().hex[:6]}"
    up = _ok(provision("lab", "up", "--nodes", "1", "--netns", netns, "--state-dir", str(state), "--json"))
    info = json.loads(up.stdout)
    Path(info["vault_password_file"]).unlink()  # the generated inventory no longer loads
    down = json.loads(_ok(provision("lab", "down", "--state-dir", str(state), "--json")).stdout)["removed"]
    assert any(item.startswith("boot:not stopped cleanly") for item in down), down
    pids = [info["vbmc_pid"], *info["control"].values(), *info["boot"]["services"].values()]
    assert all(pids) and not any(pid_alive(p) for p in pids), pids
    assert not Path(f"/run/netns/{netns}").exists() and not state.exists()


def _one_node_lab(tmp_path: Path, bmc: str) -> tuple[Path, str, dict[str, Any]]:
    """``lab up --nodes 1 --bmc BMC`` in a fresh namespace: its state dir, namespace and --json status."""
    state = tmp_path / "lab"
    netns = f"provtest-{uuid.uuid4().hex[:6]}"
    up = _ok(
        provision("lab", "up", "--bmc", bmc, "--nodes", "1", "--netns", netns, "--state-dir", str(state), "--json")
    )
    return state, netns, json.loads(up.stdout)


@pytest.mark.integration
@needs_root
def test_lab_with_openipmi_bmcs_powers_qemu(tmp_path: Path) -> None:
    """`lab up --bmc openipmi`: ipmi_sim per machine; node power on/status/off through it start and kill QEMU."""
    from provision.lab.ipmisim import read_chassis

    state, netns, info = _one_node_lab(tmp_path, "openipmi")
    try:
        assert info["bmc"] == "openipmi" and info["vbmc_pid"] is None
        (sim_pid,) = info["bmc_pids"]
        assert Path(f"/proc/{sim_pid}/comm").read_text().strip() == "ipmi_sim"
        inventory = Path(info["inventory"])
        assert "provision_bmc_protocol: ipmi" in (inventory / "group_vars" / "all.yml").read_text()
        lan_conf = state / "vbmc" / "r1n01.lan.conf"
        assert stat.S_IMODE(lan_conf.stat().st_mode) == 0o600
        password = _bmc_password(
            (inventory / "group_vars" / "all.yml").read_text(), Path(info["vault_password_file"]).read_text().strip()
        )
        assert password not in Path(f"/proc/{sim_pid}/cmdline").read_text()
        site = ["-i", str(inventory), "--vault-password-file", info["vault_password_file"]]

        off = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert off["nodes"][0]["value"] == {"power": "off"}
        _ok(provision(*site, "node", "bootdev", "pxe", "--nodes", "r1n01"))
        _ok(provision(*site, "node", "power", "on", "--nodes", "r1n01"))
        pid = read_chassis(state / "vbmc", "r1n01")["pid"]
        assert pid and pid_alive(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert Path(cmdline[0]).name == "qemu-system-x86_64" and "mac=52:54:00:99:00:01" in " ".join(cmdline)
        assert cmdline[cmdline.index("-boot") + 1] == "n"  # the pxe override, through ipmi_sim
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
        on = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert on["nodes"][0]["value"] == {"power": "on"}
        rack_status = json.loads(_ok(provision("lab", "status", "--state-dir", str(state), "--json")).stdout)
        assert rack_status["nodes"][0]["qemu_pid"] == pid and rack_status["nodes"][0]["power"] == "on"

        _ok(provision(*site, "node", "power", "off", "--nodes", "r1n01"))
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid)
        off = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert off["nodes"][0]["value"] == {"power": "off"}
        assert read_chassis(state / "vbmc", "r1n01")["history"] == ["boot pxe", "power 1", "power 0"]
    finally:
        down = provision("lab", "down", "--state-dir", str(state), "--json")
    _ok(down)
    assert f"bmc:{sim_pid}" in json.loads(down.stdout)["removed"]
    assert not pid_alive(sim_pid)
    assert not Path(f"/run/netns/{netns}").exists() and not state.exists()
    assert not Rack(state).qemu_pids()
    again = _ok(provision("lab", "down", "--state-dir", str(state), "--json"))
    assert json.loads(again.stdout)["removed"] == []


@pytest.mark.integration
@needs_root
def test_lab_with_redfish_bmc_powers_qemu(tmp_path: Path) -> None:
    """`lab up --bmc redfish`: sushy-emulator for the rack; bootdev, power on/status/off through it drive QEMU.

    The machine side is checked: the QEMU process (its argv, namespace), its console (iPXE gets DHCP from
    dnsmasq and its script from the lab's boot server), and its end on power off.
    """
    from provision.lab.ipmisim import read_chassis

    state, netns, info = _one_node_lab(tmp_path, "redfish")
    try:
        redfish = info["redfish"]
        assert info["bmc"] == "redfish" and info["vbmc_pid"] is None
        assert sorted(info["bmc_pids"]) == sorted([redfish["emulator_pid"], redfish["receiver_pid"]])
        assert info["nodes"][0]["bmc_port"] == redfish["port"]
        emulator_argv = Path(f"/proc/{redfish['emulator_pid']}/cmdline").read_text().split("\0")
        assert Path(emulator_argv[1]).name == "sushy-emulator" and "--fake" in emulator_argv
        inventory = Path(info["inventory"])
        all_yml = (inventory / "group_vars" / "all.yml").read_text()
        for line in (
            "provision_bmc_protocol: redfish",
            "provision_bmc_redfish_auth: basic",
            f"provision_bmc_ca_file: {state / 'vbmc' / 'ca.pem'}",
        ):
            assert line in all_yml
        assert "provision_bmc_system_id: r1n01" in (inventory / "hosts.yml").read_text()
        password = _bmc_password(all_yml, Path(info["vault_password_file"]).read_text().strip())
        for pid in info["bmc_pids"]:
            assert password not in Path(f"/proc/{pid}/cmdline").read_text()
        assert stat.S_IMODE((state / "vbmc").stat().st_mode) == 0o700
        for secret in ("htpasswd", "bmc.key", "emulator.conf", "receiver.json"):
            assert stat.S_IMODE((state / "vbmc" / secret).stat().st_mode) == 0o600, secret
        for path in (state / "vbmc").rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
        site = ["-i", str(inventory), "--vault-password-file", info["vault_password_file"]]

        off = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
        assert off["nodes"][0]["value"] == {"power": "off"}
        # sushy-emulator keeps every boot override as Continuous: a one-time one is reported as not kept.
        once = provision(*site, "node", "bootdev", "pxe", "--nodes", "r1n01", "--json")
        assert once.returncode == 1 and "reads back as pxe (persistent, legacy)" in once.stdout, once.stdout
        pxe = json.loads(
            _ok(provision(*site, "node", "bootdev", "pxe", "--persistent", "--nodes", "r1n01", "--json")).stdout
        )
        assert pxe["nodes"][0]["value"] == {"device": "pxe", "persistent": True, "uefi": False}
        assert read_chassis(state / "vbmc", "r1n01")["pid"] is None  # a boot device starts nothing

        _ok(provision(*site, "node", "power", "on", "--nodes", "r1n01"))
        pid = read_chassis(state / "vbmc", "r1n01")["pid"]
        assert pid and pid_alive(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert Path(cmdline[0]).name == "qemu-system-x86_64" and "mac=52:54:00:99:00:01" in " ".join(cmdline)
        assert cmdline[cmdline.index("-boot") + 1] == "n"  # the emulator's Pxe
        assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"
        console = state / "machines" / "r1n01.console.log"
        expected = "provision: r1n01: image compute-debian12 has no active version"
        deadline = time.monotonic() + 90
        while expected not in console.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert expected in console.read_text(errors="replace"), console.read_text(errors="replace")[-500:]
        # The emulator applies a power change 1 to 11 s after it was asked for (on a read).
        deadline = time.monotonic() + 20
        power = "off"
        while power != "on" and time.monotonic() < deadline:
            on = json.loads(_ok(provision(*site, "node", "power", "status", "--all", "--json")).stdout)
            power = on["nodes"][0]["value"]["power"]
            time.sleep(1)
        assert power == "on"
        rack_status = json.loads(_ok(provision("lab", "status", "--state-dir", str(state), "--json")).stdout)
        assert rack_status["nodes"][0]["qemu_pid"] == pid and rack_status["nodes"][0]["power"] == "on"
        assert rack_status["redfish"]["emulator_pid"] == redfish["emulator_pid"]
        assert rack_status["redfish"]["receiver_pid"] == redfish["receiver_pid"]
        text = _ok(provision("lab", "status", "--state-dir", str(state))).stdout
        assert f"sushy-emulator https://127.0.0.1:{redfish['port']} pid {redfish['emulator_pid']}" in text

        _ok(provision(*site, "node", "power", "off", "--nodes", "r1n01"))
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid)
        assert read_chassis(state / "vbmc", "r1n01")["history"] == ["boot Pxe", "on", "off"]
    finally:
        down = provision("lab", "down", "--state-dir", str(state), "--json")
    _ok(down)
    removed = json.loads(down.stdout)["removed"]
    for pid_ in (redfish["emulator_pid"], redfish["receiver_pid"]):
        assert f"bmc:{pid_}" in removed
        assert not pid_alive(pid_)
    assert not Path(f"/run/netns/{netns}").exists() and not state.exists()
    assert not Rack(state).qemu_pids()
    again = _ok(provision("lab", "down", "--state-dir", str(state), "--json"))
    assert json.loads(again.stdout)["removed"] == []

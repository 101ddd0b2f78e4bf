"""``provision node boot``'s parts: checks before any change, stage tracking, console markers, the SSH probe.

The full run (real machines, real BMCs, real join) is tests/test_node_boot.py;
here the boot backend's log is replaced by events built in the test (a faked
edge), everything else is the real code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import requires, run_provision
from test_boot_builtin import MACS, make_inventory, make_store

from provision import bringup, inventory
from provision.boot.base import BootHost
from provision.boot.builtin import BuiltinBackend, BuiltinConfig
from provision.boot.events import BootEvent, Client, Phase
from provision.bringup import BootSettings, NodeBoot, Stage
from provision.console import ConsoleLog
from provision.errors import BootError
from provision.lab.netns import Netns
from provision.probe import ProbeError, ssh_answers

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIHR1cnRsZXNhbGx0aGV3YXlkb3dudHVydGxlc2FsbCEh"  # a well-formed ssh-ed25519 public key


# -- console ------------------------------------------------------------------------


def test_console_log_reads_this_boot_only(tmp_path: Path) -> None:
    path = tmp_path / "node.console.log"
    path.write_text(f"old boot\r\n[ 3.1] provision: ssh-host-key ssh-ed25519 {KEY[:-4]}AAAA\r\n")
    console = ConsoleLog(path)
    console.mark()
    assert console.host_keys() == [] and console.tail() == []
    with open(path, "a") as fh:
        fh.write(
            f"\x1b[0m[  5.2] provision: ssh-host-key ssh-ed25519 {KEY}\r\n[  9.9] provision: node ready (multi-user)\r\n"
        )
    keys = console.host_keys()
    assert [(k.type, k.key) for k in keys] == [("ssh-ed25519", KEY)]
    assert keys[0].known_hosts_line("r1n01") == f"r1n01 ssh-ed25519 {KEY}"
    assert console.ready() and console.tail(1) == ["[  9.9] provision: node ready (multi-user)"]
    # A new QEMU truncates the file: read from its start again.
    path.write_text("SeaBIOS\n")
    assert console.tail() == ["SeaBIOS"] and console.host_keys() == []


# -- probe --------------------------------------------------------------------------


def _banner_server(greeting: bytes) -> tuple[int, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.sendall(greeting)
                time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_ssh_probe_wants_an_ssh_banner() -> None:
    port, thread = _banner_server(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert ssh_answers("127.0.0.1", port, timeout=2.0)
    thread.join(5)
    port, thread = _banner_server(b"HTTP/1.1 400 Bad Request\r\n")
    assert not ssh_answers("127.0.0.1", port, timeout=2.0)
    thread.join(5)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free = closed.getsockname()[1]
    closed.close()
    assert not ssh_answers("127.0.0.1", free, timeout=1.0)


def test_ssh_probe_refuses_a_missing_namespace() -> None:
    with pytest.raises(ProbeError, match="network namespace provtest-none does not exist"):
        ssh_answers("10.99.0.11", netns="provtest-none")


@pytest.mark.integration
@requires(os.geteuid() == 0, "network namespaces need root; CI runs the suite as root")
def test_ssh_probe_runs_inside_the_namespace() -> None:
    ns = Netns(f"provtest-{uuid.uuid4().hex[:6]}")
    ns.create()
    try:
        subprocess.run(ns.exec_argv(["ip", "link", "set", "lo", "up"]), check=True)
        server = subprocess.Popen(
            ns.exec_argv(["socat", "TCP-LISTEN:2222,bind=127.0.0.1,reuseaddr", "SYSTEM:echo SSH-2.0-inside"])
        )
        try:
            deadline = time.monotonic() + 10
            while not ssh_answers("127.0.0.1", 2222, netns=ns.name, timeout=1.0):
                assert time.monotonic() < deadline, "socat in the namespace never answered"
                time.sleep(0.2)
            # The same port on this process's own loopback has nothing: the probe really was inside.
            assert not ssh_answers("127.0.0.1", 2222, timeout=1.0)
        finally:
            server.kill()
            server.wait()
    finally:
        ns.teardown()


# -- checks before any change ---------------------------------------------------------


def _state_files(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*")) if state.exists() else []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "nope"], "--image: unknown image 'nope'"),
        (["--image", "compute-debian12"], "image compute-debian12 is not published to the builtin boot backend"),
        (["--timeout", "0"], "--timeout: 0.0 must be positive"),
    ],
)
def test_bad_boot_requests_change_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    site = make_inventory(tmp_path, store=make_store(tmp_path / "store"))
    state = tmp_path / "state"
    before = _state_files(state)
    result = run_provision("-i", str(site), "node", "boot", "--all", "--yes", *args)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert _state_files(state) == before


# -- following a boot -------------------------------------------------------------------


class _EventsBackend(BuiltinBackend):
    """The built-in backend with its log-reading edge (boot_events) fed by the test."""

    def __init__(self, config: BuiltinConfig) -> None:
        super().__init__(config)
        self.events: list[BootEvent] = []

    def boot_events(self, hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
        return list(self.events)


def _booting(tmp_path: Path, timeout: float, dhcp_timeout: float = 300.0) -> tuple[NodeBoot, _EventsBackend, datetime]:
    site = inventory.load(make_inventory(tmp_path, store=make_store(tmp_path / "store")))
    fake = _EventsBackend(BuiltinConfig.from_vars(site.settings.backend_vars()))
    run = NodeBoot(site, site.nodes, BootSettings(timeout=timeout, dhcp_timeout=dhcp_timeout, poll=0.05), backend=fake)
    powered_at = run.start_clock()
    for progress in run.progress.values():
        progress.reach(Stage.POWER, 0.4)
    return run, fake, powered_at


def test_follow_turns_log_events_into_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, fake, powered_at = _booting(tmp_path, timeout=5.0)
    probed: list[str] = []

    def fake_probe(host: str, port: int = 22, **_: Any) -> bool:
        probed.append(host)
        return True

    monkeypatch.setattr(bringup, "ssh_answers", fake_probe)
    t = powered_at + timedelta(seconds=1)
    ev = [
        (Phase.DHCP_DISCOVER, Client.PXE, 0),
        (Phase.DHCP_ACK, Client.PXE, 1),
        (Phase.NODE_SCRIPT, Client.IPXE, 2),
        (Phase.KERNEL, Client.IPXE, 3),
        (Phase.INITRD, Client.IPXE, 4),
        (Phase.ROOTFS, Client.OS, 9),
    ]
    fake.events = [
        BootEvent(t + timedelta(seconds=s), p, mac=MACS["node01"], node="node01", client=c) for p, c, s in ev
    ]
    # node02 only got as far as a lease; the OS's own DHCP later is not a boot lease.
    fake.events += [
        BootEvent(t - timedelta(minutes=5), Phase.DHCP_ACK, mac=MACS["node02"], node="node02", client=Client.PXE),
        BootEvent(t, Phase.DHCP_ACK, mac=MACS["node02"], node="node02", client=Client.OS),
        BootEvent(t, Phase.DHCP_DISCOVER, mac="52:54:00:99:00:99", client=Client.PXE),
    ]
    run.follow()
    one, two = run.progress["node01"], run.progress["node02"]
    assert list(one.reached) == [
        Stage.POWER,
        Stage.DHCP,
        Stage.SCRIPT,
        Stage.KERNEL,
        Stage.INITRD,
        Stage.ROOTFS,
        Stage.SSH,
    ]
    assert one.reached[Stage.ROOTFS] == pytest.approx(10.0, abs=1.0) and one.up
    assert probed == ["10.99.0.11"]  # node02 is probed only once its root is fetched
    assert two.failed and two.last is Stage.POWER
    assert two.error == "not up after 5 s (last stage: power)"
    assert f"no DHCP request from {MACS['node02']}" in two.hint and "52:54:00:99:00:99" in two.hint


def test_a_node_silent_past_the_dhcp_timeout_fails_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong MAC is reported after --dhcp-timeout, not after the whole --timeout; the others carry on."""
    run, fake, powered_at = _booting(tmp_path, timeout=30.0, dhcp_timeout=1.0)
    monkeypatch.setattr(bringup, "ssh_answers", lambda *a, **k: True)
    t = powered_at + timedelta(seconds=1)
    fake.events = [
        BootEvent(t, Phase.DHCP_ACK, mac=MACS["node01"], node="node01", client=Client.PXE),
        BootEvent(t, Phase.ROOTFS, mac=MACS["node01"], node="node01", client=Client.OS),
        BootEvent(t, Phase.DHCP_DISCOVER, mac="52:54:00:99:00:99", client=Client.PXE),
    ]
    started = time.monotonic()
    run.follow()
    assert time.monotonic() - started < 10.0  # not the 30 s --timeout
    one, two = run.progress["node01"], run.progress["node02"]
    assert one.up and not one.failed
    assert two.failed and two.error == "no DHCP request 1 s after power-on (last stage: power)"
    assert "52:54:00:99:00:99" in two.hint


def test_boot_settings_refuse_a_bad_timeout() -> None:
    with pytest.raises(BootError, match="--timeout"):
        BootSettings(timeout=-1)
    with pytest.raises(BootError, match="--dhcp-timeout"):
        BootSettings(dhcp_timeout=0)


# -- provision node join ------------------------------------------------------------------


def test_node_join_reports_each_node(tmp_path: Path) -> None:
    """The join playbook's admin-side checks fail before any connection: one result per node, exit 1."""
    import json

    site = make_inventory(tmp_path, store=make_store(tmp_path / "store"))
    result = run_provision("-i", str(site), "node", "join", "--all", "--json", timeout=600)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"] == {"ok": 0, "failed": 2}
    for node in report["nodes"]:
        assert node["result"] == "failed"
        assert "Require a Slurm controller to ask" in node["error"], node
        assert "slurm_controller_host" in node["error"]

"""provision.bmc over real IPMI (RMCP+ on UDP) against virtual BMCs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from provision.bmc import (
    AUTH_HINT,
    BmcAuthError,
    BmcUnreachableError,
    BootDevice,
    BootSetting,
    PowerAction,
    PowerState,
    boot_device_operation,
    bootdev_get_nodes,
    bootdev_nodes,
    fanout_options,
    power_nodes,
    power_operation,
    set_boot_operation,
)
from provision.inventory import Bmc, BmcProtocol, Node, Secret
from provision.ipmi.client import Client
from provision.lab.vbmc import VbmcFleet, VbmcSpec, free_udp_ports

pytestmark = pytest.mark.integration

PASSWORD = "bmc-Test-pw-3391"
GOOD = [f"n{i:02d}" for i in range(1, 9)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VbmcFleet]:
    ports = iter(free_udp_ports(len(GOOD) + 7))
    specs = [VbmcSpec(name, next(ports), "admin", PASSWORD) for name in GOOD]
    specs += [
        VbmcSpec("wrongpw", next(ports), "admin", "another-password"),
        VbmcSpec("dead", next(ports), "admin", PASSWORD, fault="unreachable"),
        VbmcSpec("only3", next(ports), "admin", PASSWORD, suites=(3,)),
        VbmcSpec("only17", next(ports), "admin", PASSWORD, suites=(17,)),
        VbmcSpec("stock", next(ports), "admin", PASSWORD, lax_suites=True),
        VbmcSpec("ops", next(ports), "admin", PASSWORD),
        VbmcSpec("boots", next(ports), "admin", PASSWORD),
    ]
    with VbmcFleet(specs, tmp_path_factory.mktemp("vbmc"), per_process=8) as running:
        yield running


class IpmiClient:
    """One BMC over one kept session: provision.bmc's operations, one at a time."""

    def __init__(self, address: str, user: str, password: str, *, port: int) -> None:
        self._client = Client(address, user, password, port=port)

    @property
    def cipher_suite(self) -> int | None:
        return self._client.cipher_suite

    def power_status(self) -> PowerState:
        return self.power(PowerAction.STATUS)

    def power(self, action: PowerAction) -> PowerState:
        state: PowerState = self._client.run(power_operation(action))
        return state

    def set_boot_device(self, device: BootDevice, *, persistent: bool, uefi: bool) -> BootSetting:
        setting: BootSetting = self._client.run(set_boot_operation(device, persistent=persistent, uefi=uefi))
        return setting

    def boot_device(self) -> BootSetting:
        setting: BootSetting = self._client.run(boot_device_operation())
        return setting

    def __enter__(self) -> IpmiClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._client.close()


def port(fleet: VbmcFleet, name: str) -> int:
    return next(s.port for s in fleet.specs if s.name == name)


def client(fleet: VbmcFleet, name: str, password: str = PASSWORD, user: str = "admin") -> IpmiClient:
    return IpmiClient("127.0.0.1", user, password, port=port(fleet, name))


def node(fleet: VbmcFleet, name: str, password: str = PASSWORD) -> Node:
    bmc = Bmc("127.0.0.1", "admin", Secret("test", lambda: password), port=port(fleet, name), protocol=BmcProtocol.IPMI)
    return Node(name=name, rack="r1", mac="", ip="", image=None, bmc=bmc)


@pytest.mark.parametrize(
    ("name", "suite"),
    [
        ("n01", 17),  # offers 3 and 17: the client's first choice
        ("only17", 17),
        ("only3", 3),  # rejects the 17 proposal: the client falls back
        ("stock", 3),  # answers a 17 proposal with suite 3 (pyghmi's server): the client follows
    ],
)
def test_cipher_suite_negotiation(fleet: VbmcFleet, name: str, suite: int) -> None:
    with client(fleet, name) as c:
        assert c.cipher_suite == suite
        assert c.power_status() == PowerState.OFF


def test_power_actions_land_on_the_bmc(fleet: VbmcFleet) -> None:
    with client(fleet, "ops") as c:
        assert c.power(PowerAction.ON) == PowerState.ON
        assert fleet.state("ops")["power"] == "on"
        assert c.power_status() == PowerState.ON
        assert c.power(PowerAction.RESET) == PowerState.ON
        assert c.power(PowerAction.CYCLE) == PowerState.ON
        assert c.power(PowerAction.SOFT) == PowerState.OFF
        assert fleet.state("ops")["power"] == "off"
        # cycle and reset of an off node power it on (ipmipower's --on-if-off)
        assert c.power(PowerAction.CYCLE) == PowerState.ON
        assert c.power(PowerAction.OFF) == PowerState.OFF
    state = fleet.state("ops")
    assert state["power"] == "off"
    actions = [event for event in state["history"] if not event.startswith("boot:")]
    assert actions == ["on", "reset", "cycle", "soft", "on", "off"]


@pytest.mark.parametrize(
    ("device", "persistent", "uefi"),
    [(BootDevice.PXE, False, True), (BootDevice.DISK, True, False), (BootDevice.BIOS, False, False)],
)
def test_boot_device_lands_and_reads_back(fleet: VbmcFleet, device: BootDevice, persistent: bool, uefi: bool) -> None:
    with client(fleet, "boots") as c:
        setting = c.set_boot_device(device, persistent=persistent, uefi=uefi)
        assert c.boot_device() == setting
    state = fleet.state("boots")
    assert (state["bootdev"], state["persistent"], state["uefi"]) == (str(device), persistent, uefi)


def test_wrong_password_is_an_auth_error_naming_the_fields(fleet: VbmcFleet) -> None:
    with pytest.raises(BmcAuthError) as info:
        client(fleet, "wrongpw")
    assert "authentication failed" in info.value.message
    assert info.value.hint == AUTH_HINT
    assert "provision_bmc_password" in AUTH_HINT and "provision_bmc_user" in AUTH_HINT
    assert PASSWORD not in str(info.value) and PASSWORD not in (info.value.hint or "")


def test_unknown_user_is_an_auth_error(fleet: VbmcFleet) -> None:
    with pytest.raises(BmcAuthError):
        client(fleet, "n01", user="nobody")


def test_unreachable_bmc(fleet: VbmcFleet) -> None:
    with pytest.raises(BmcUnreachableError) as info:
        client(fleet, "dead")
    assert "no answer" in info.value.message
    assert "provision_bmc_address" in (info.value.hint or "")


def test_fan_out_reports_each_node_and_the_rest_carry_on(fleet: VbmcFleet) -> None:
    nodes = [node(fleet, name) for name in [*GOOD[:4], "dead", "wrongpw", *GOOD[4:]]]
    outcomes = power_nodes(nodes, PowerAction.ON, fanout_options(len(nodes), retries=0, timeout=30))
    by_node = {o.node: o for o in outcomes}
    assert [o.node for o in outcomes] == [n.name for n in nodes]  # inventory order
    assert {n for n, o in by_node.items() if o.ok} == set(GOOD)
    assert by_node["dead"].kind == "BmcUnreachableError"
    assert by_node["wrongpw"].kind == "BmcAuthError"
    assert by_node["wrongpw"].hint == AUTH_HINT
    for name in GOOD:
        assert fleet.state(name)["power"] == "on"
        assert by_node[name].value == {"power": "on", "action": "on"}
    assert fleet.state("wrongpw")["power"] == "off"


WORKERS_SCRIPT = """
import json, os, sys
from provision.bmc import PowerAction, fanout_options, power_nodes
from provision.inventory import Bmc, Node, Secret
ports = json.loads(sys.argv[1])
nodes = [Node(f"n{i}", "r1", "", "", None, Bmc("127.0.0.1", "admin", Secret("env", lambda: os.environ["PW"]), port=p))
         for i, p in enumerate(ports * 4)]
outcomes = power_nodes(nodes, PowerAction.STATUS, fanout_options(len(nodes), processes=4, fanout=8))
print(json.dumps([o.as_dict() for o in outcomes]))
"""


def test_fan_out_over_worker_processes(fleet: VbmcFleet) -> None:
    """--processes: one event loop per forked worker, from a fresh parent; the same BMC four times each."""
    import json
    import os
    import subprocess
    import sys

    ports = [port(fleet, name) for name in GOOD]
    env = {"PATH": os.environ["PATH"], "PW": PASSWORD}
    result = subprocess.run(
        [sys.executable, "-c", WORKERS_SCRIPT, json.dumps(ports)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert len(outcomes) == 32
    assert [o["result"] for o in outcomes] == ["ok"] * 32, [o["error"] for o in outcomes if o["error"]]


def test_fan_out_forks_cleanly_from_a_process_with_an_open_session(fleet: VbmcFleet) -> None:
    with client(fleet, "n01") as c:  # a session (and its socket) open while the workers fork
        c.power_status()
        nodes = [node(fleet, name) for name in GOOD] * 2
        outcomes = power_nodes(nodes, PowerAction.STATUS, fanout_options(len(nodes), processes=2, fanout=4))
        assert c.power_status() == PowerState(fleet.state("n01")["power"])  # the session still works
    assert [o.result for o in outcomes] == ["ok"] * 16, [o.error for o in outcomes if o.error]


def test_boot_device_over_many_nodes_and_read_back(fleet: VbmcFleet) -> None:
    nodes = [node(fleet, name) for name in GOOD[:4]] + [node(fleet, "wrongpw")]
    outcomes = bootdev_nodes(nodes, BootDevice.DISK, persistent=True, options=fanout_options(len(nodes), retries=0))
    assert [o.value for o in outcomes[:4]] == [{"device": "disk", "persistent": True, "uefi": False}] * 4
    assert outcomes[4].kind == "BmcAuthError"
    shown = bootdev_get_nodes(nodes[:4])
    assert [o.value for o in shown] == [{"device": "disk", "persistent": True, "uefi": False}] * 4
    state = fleet.state(GOOD[0])
    assert (state["bootdev"], state["persistent"]) == ("disk", True)
    assert state["history"][-1] == "bootdev:disk"


def test_node_without_a_bmc_or_with_a_dead_redfish_bmc_fails_alone(fleet: VbmcFleet) -> None:
    redfish = Bmc("127.0.0.1", "admin", Secret("t", lambda: PASSWORD), port=1, protocol=BmcProtocol.REDFISH)
    nodes = [
        node(fleet, "n01"),
        Node("nobmc", "r1", "", "", None, None),
        Node("rf", "r1", "", "", None, redfish),
    ]
    outcomes = power_nodes(nodes, PowerAction.STATUS, fanout_options(len(nodes), retries=0))
    assert [o.result for o in outcomes] == ["ok", "failed", "failed"]
    assert "no BMC in the inventory" in (outcomes[1].error or "")
    assert outcomes[2].kind == "BmcUnreachableError"  # the Redfish engine tried port 1 (tests/test_redfish.py)
    assert outcomes[2].error == "BMC 127.0.0.1:1: no answer (connect): connection refused"

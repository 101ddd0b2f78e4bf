"""A lab machine's chassis, kept on disk: the power and boot device of one QEMU machine, by pid.

The BMC kinds whose BMC is not provision's own process (``openipmi``:
ipmi_sim's chassis-control program, ``provision.lab.ipmisim``; ``redfish``:
the receiver of sushy-emulator's notifications, ``provision.lab.redfishsim``)
drive the rack's QEMU machines through these functions. Per machine, in the
BMC state directory: ``NAME.spec.json`` (its ``MachineSpec`` as JSON) and
``NAME.chassis.json`` (``pid`` of its QEMU process or null, ``boot`` as the
BMC kind records it, ``history`` of what the chassis was told).

Power on starts QEMU in the rack's namespace (``provision.lab.vm.Machine``,
own session, so it outlives the caller); power off kills its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from provision.files import write_atomic
from provision.proc import pid_alive


def _paths(state: Path, name: str) -> tuple[Path, Path]:
    return state / f"{name}.spec.json", state / f"{name}.chassis.json"


def write_spec(state: Path, name: str, machine: dict[str, Any]) -> None:
    """Record the machine (a ``MachineSpec`` as JSON, see ``vbmc.machine_spec_to_json``) this chassis drives."""
    state.mkdir(parents=True, exist_ok=True)
    spec, _ = _paths(state, name)
    write_atomic(spec, json.dumps(machine) + "\n")


def load(state: Path, name: str) -> dict[str, Any]:
    """What the machine's chassis last recorded: pid, boot device, history."""
    _, chassis = _paths(state, name)
    if chassis.exists():
        data: dict[str, Any] = json.loads(chassis.read_text())
        return data
    return {"pid": None, "boot": "none", "history": []}


def save(state: Path, name: str, data: dict[str, Any]) -> None:
    _, path = _paths(state, name)
    write_atomic(path, json.dumps(data) + "\n")


def running(data: dict[str, Any]) -> bool:
    return bool(data.get("pid")) and pid_alive(int(data["pid"]))


def power_on(state: Path, name: str, data: dict[str, Any], boot: Any = None) -> bool:
    """Start the machine unless it runs (``boot``: a ``BootFrom``, None for its spec's); whether it started."""
    from provision.lab.vbmc import machine_spec_from_json
    from provision.lab.vm import Machine

    if running(data):
        return False
    spec, _ = _paths(state, name)
    machine = Machine(machine_spec_from_json(json.loads(spec.read_text())))
    machine.start(boot)
    data["pid"] = machine.pid
    return True


def power_off(data: dict[str, Any]) -> bool:
    """Pull the plug; whether a running machine was stopped."""
    pid = data.get("pid")
    stopped = False
    if pid and pid_alive(int(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = True
    data["pid"] = None
    return stopped


__all__ = ["load", "power_off", "power_on", "running", "save", "write_spec"]

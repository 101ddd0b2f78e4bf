"""The lab's ``--bmc openipmi`` kind: OpenIPMI's ipmi_sim in front of each QEMU machine.

One ``ipmi_sim`` process per machine on 127.0.0.1 (its own UDP port), with
a lan.conf (0600: it holds the BMC password) and a chassis-control script
that runs ``python -m provision.lab.ipmisim chassis STATE NAME ...``. That
program keeps the machine's power and boot device beside its spec and
drives the QEMU process by pid: power 1 starts it in the rack's namespace
(``provision.lab.vm.Machine``, own session, so it outlives the script),
power 0 kills its process group, reset restarts it through the QEMU
monitor, the boot device (pxe or default) picks ``-boot n`` or ``-boot c``
at the next start.

ipmi_sim's calls: ``SCRIPT <mc> get power|boot ...`` (answer ``parm:value``
lines) and ``SCRIPT <mc> set parm value ...`` (power 0/1, reset 1, boot
none/pxe/default/cdrom/bios, shutdown 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision.files import write_atomic
from provision.proc import pid_alive, spawn

_CHASSIS_SCRIPT = """#!/bin/sh
# ipmi_sim's chassis control for {name}: written by `provision lab up --bmc openipmi`.
PYTHONPATH={pythonpath} exec {python} -m provision.lab.ipmisim chassis {state} {name} "$@"
"""


def _paths(state: Path, name: str) -> tuple[Path, Path]:
    return state / f"{name}.spec.json", state / f"{name}.chassis.json"


def _load(state: Path, name: str) -> dict[str, Any]:
    _, chassis = _paths(state, name)
    if chassis.exists():
        data: dict[str, Any] = json.loads(chassis.read_text())
        return data
    return {"pid": None, "boot": "none", "history": []}


def _machine(state: Path, name: str) -> Any:
    from provision.lab.vbmc import machine_spec_from_json
    from provision.lab.vm import Machine

    spec, _ = _paths(state, name)
    return Machine(machine_spec_from_json(json.loads(spec.read_text())))


def _running(data: dict[str, Any]) -> bool:
    return bool(data.get("pid")) and pid_alive(int(data["pid"]))


def _start(state: Path, name: str, data: dict[str, Any]) -> None:
    from provision.lab.vm import BootFrom

    if _running(data):
        return
    machine = _machine(state, name)
    machine.start({"pxe": BootFrom.NETWORK, "default": BootFrom.DISK}.get(data["boot"]))
    data["pid"] = machine.pid
    if data["boot"] != "none":
        data["boot"] = "none"  # ipmi_sim's overrides are one-time: consumed by this boot


def _stop(data: dict[str, Any]) -> None:
    pid = data.get("pid")
    if pid and pid_alive(int(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
    data["pid"] = None


def chassis(state: Path, name: str, args: Sequence[str]) -> int:
    """The chassis-control program ipmi_sim runs (``args`` after the MC address)."""
    if not args:
        return 1
    data = _load(state, name)
    op, rest = args[0], list(args[1:])
    if op == "get":
        for parm in rest:
            if parm == "power":
                print(f"power:{1 if _running(data) else 0}")
            elif parm == "boot":
                print(f"boot:{data['boot']}")
            else:
                print(f"unknown parameter {parm}")
                return 1
        return 0
    if op != "set":
        return 1
    for parm, value in zip(rest[::2], rest[1::2], strict=False):
        data["history"].append(f"{parm} {value}")
        if parm == "power":
            if value == "1":
                _start(state, name, data)
            else:
                _stop(data)
        elif parm == "reset" and _running(data):
            _stop(data)  # QEMU fixes its boot order at start: a reset is a restart
            _start(state, name, data)
        elif parm == "shutdown":
            _stop(data)
        elif parm == "boot":
            data["boot"] = value
    _, path = _paths(state, name)
    write_atomic(path, json.dumps(data) + "\n")
    return 0


def read_chassis(state: Path, name: str) -> dict[str, Any]:
    """What a machine's chassis control last recorded: pid, boot device, history."""
    return _load(state, name)


def start(
    state: Path, name: str, *, port: int, user: str, password: str, machine: dict[str, Any], log_path: Path
) -> subprocess.Popen[bytes]:
    """One ipmi_sim for one machine (a ``MachineSpec`` as JSON); the password only in a 0600 lan.conf."""
    state.mkdir(parents=True, exist_ok=True)
    spec, _ = _paths(state, name)
    write_atomic(spec, json.dumps(machine) + "\n")
    script = state / f"{name}.chassis"
    script.write_text(
        _CHASSIS_SCRIPT.format(
            name=name, state=state, python=sys.executable, pythonpath=Path(__file__).resolve().parents[2]
        )
    )
    script.chmod(0o755)
    lan_conf = state / f"{name}.lan.conf"
    lines = [
        f'name "{name}"',
        "set_working_mc 0x20",
        "  startlan 1",
        f"    addr 127.0.0.1 {port}",
        "    priv_limit admin",
        *(f"    allowed_auths_{level} md5" for level in ("callback", "user", "operator", "admin")),
        "    guid " + os.urandom(16).hex(),
        "  endlan",
        f'  chassis_control "{script} 0x20"',
        f'  user 2 true "{user}" "{password}" admin 10 md5',
        "",
    ]
    write_atomic(lan_conf, "\n".join(lines), mode=0o600)
    emu = state / f"{name}.emu"
    emu.write_text("mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n")
    sim_state = state / f"{name}.sim"
    sim_state.mkdir(exist_ok=True)
    argv = ["ipmi_sim", "-n", "-c", str(lan_conf), "-f", str(emu), "-s", str(sim_state)]
    return spawn(argv, log_path=log_path)


__all__ = ["chassis", "read_chassis", "start"]

if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "chassis":
        # argv: chassis STATE NAME <mc> op args...
        sys.exit(chassis(Path(sys.argv[2]), sys.argv[3], sys.argv[5:]))
    print("usage: python -m provision.lab.ipmisim chassis STATE NAME MC get|set ...", file=sys.stderr)
    sys.exit(2)

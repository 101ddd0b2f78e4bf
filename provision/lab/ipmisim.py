"""The lab's ``--bmc openipmi`` kind: OpenIPMI's ipmi_sim in front of each QEMU machine.

One ``ipmi_sim`` process per machine on 127.0.0.1 (its own UDP port), with
a lan.conf (0600: it holds the BMC password) and a chassis-control script
that runs ``python -m provision.lab.ipmisim chassis STATE NAME ...``. That
program keeps the machine's power and boot device beside its spec and
drives the QEMU process by pid (``provision.lab.chassis``): power 1 starts it in the rack's namespace
(``provision.lab.vm.Machine``, own session, so it outlives the script),
power 0 kills its process group, reset restarts it through the QEMU
monitor, the boot device (pxe or default) picks ``-boot n`` or ``-boot c``
at the next start.

ipmi_sim's calls: ``SCRIPT <mc> get power|boot ...`` (answer ``parm:value``
lines) and ``SCRIPT <mc> set parm value ...`` (power 0/1, reset 1, boot
none/pxe/default/cdrom/bios, shutdown 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision.files import write_atomic
from provision.lab import chassis as chassis_state
from provision.proc import spawn

_CHASSIS_SCRIPT = """#!/bin/sh
# ipmi_sim's chassis control for {name}: written by `provision lab up --bmc openipmi`.
PYTHONPATH={pythonpath} exec {python} -m provision.lab.ipmisim chassis {state} {name} "$@"
"""


def _start(state: Path, name: str, data: dict[str, Any]) -> None:
    from provision.lab.vm import BootFrom

    boot = {"pxe": BootFrom.NETWORK, "default": BootFrom.DISK}.get(data["boot"])
    if chassis_state.power_on(state, name, data, boot) and data["boot"] != "none":
        data["boot"] = "none"  # ipmi_sim's overrides are one-time: consumed by this boot


def chassis(state: Path, name: str, args: Sequence[str]) -> int:
    """The chassis-control program ipmi_sim runs (``args`` after the MC address)."""
    if not args:
        return 1
    data = chassis_state.load(state, name)
    op, rest = args[0], list(args[1:])
    if op == "get":
        for parm in rest:
            if parm == "power":
                print(f"power:{1 if chassis_state.running(data) else 0}")
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
                chassis_state.power_off(data)
        elif parm == "reset" and chassis_state.running(data):
            chassis_state.power_off(data)  # QEMU fixes its boot order at start: a reset is a restart
            _start(state, name, data)
        elif parm == "shutdown":
            chassis_state.power_off(data)
        elif parm == "boot":
            data["boot"] = value
    chassis_state.save(state, name, data)
    return 0


def read_chassis(state: Path, name: str) -> dict[str, Any]:
    """What a machine's chassis control last recorded: pid, boot device, history."""
    return chassis_state.load(state, name)


def start(
    state: Path, name: str, *, port: int, user: str, password: str, machine: dict[str, Any], log_path: Path
) -> subprocess.Popen[bytes]:
    """One ipmi_sim for one machine (a ``MachineSpec`` as JSON); the password only in a 0600 lan.conf."""
    chassis_state.write_spec(state, name, machine)
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

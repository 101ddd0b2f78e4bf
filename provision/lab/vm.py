"""QEMU machines: the virtual hardware of tests and of the virtual rack.

KVM is used only when a short probe shows it can run firmware (on some hosts
``/dev/kvm`` exists but cannot, see the README); otherwise TCG. The probe
result is cached per process; ``PROVISION_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from provision.errors import ProvisionError
from provision.proc import netns_argv, spawn

QEMU = "qemu-system-x86_64"
# iPXE reaches this line in well under a second when the accelerator works.
_PROBE_MARK = b"iPXE initialising devices"


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class VmError(ProvisionError):
    """A virtual machine could not be started or did not behave."""


class BootFrom(StrEnum):
    NETWORK = "network"  # the NIC's iPXE ROM (PXE)
    DISK = "disk"
    KERNEL = "kernel"  # -kernel/-initrd/-append


def _probe_kvm(timeout: float = 8.0) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="provision-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            QEMU, "-accel", "kvm", "-cpu", "host", "-m", "128", "-nographic", "-nodefaults",
            "-serial", f"file:{serial}", "-monitor", "none", "-no-reboot",
            "-device", "virtio-net-pci", "-boot", "n",
        ]  # fmt: skip
        proc = spawn(argv, log_path=Path(tmp) / "qemu.log")
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if serial.exists() and _PROBE_MARK in serial.read_bytes():
                    return True
                time.sleep(0.2)
            return False
        finally:
            proc.kill()
            proc.wait()


@functools.cache
def detect_accel() -> Accel:
    """KVM if it can run firmware and a kernel here, else TCG."""
    forced = os.environ.get("PROVISION_ACCEL")
    if forced:
        try:
            return Accel(forced)
        except ValueError as exc:
            raise VmError(f"PROVISION_ACCEL={forced!r} is not kvm or tcg", hint="unset it or use kvm|tcg") from exc
    return Accel.KVM if _probe_kvm() else Accel.TCG


@dataclass(frozen=True)
class Nic:
    """A NIC: on a tap device (in the machine's netns) or QEMU user networking."""

    mac: str
    tap: str | None = None
    user_options: str = "restrict=off"
    model: str = "virtio-net-pci"


@dataclass(frozen=True)
class MachineSpec:
    name: str
    workdir: Path
    memory_mib: int = 2048
    cpus: int = 1
    nics: tuple[Nic, ...] = ()
    boot: BootFrom = BootFrom.NETWORK
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disk: Path | None = None
    netns: str | None = None
    accel: Accel | None = None

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def monitor_socket(self) -> Path:
        return self.workdir / f"{self.name}.monitor.sock"


class Machine:
    """One QEMU process: start, stop (hard), reset, console."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self.accel: Accel | None = None

    def argv(self, boot: BootFrom | None = None) -> list[str]:
        spec = self.spec
        accel = spec.accel or detect_accel()
        self.accel = accel
        boot = boot or spec.boot
        cpu = "host" if accel is Accel.KVM else "qemu64"
        accel_arg = "kvm" if accel is Accel.KVM else "tcg,thread=multi"
        argv = [
            QEMU, "-name", spec.name, "-accel", accel_arg, "-cpu", cpu,
            "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
            "-nographic", "-nodefaults", "-serial", f"file:{spec.serial_log}",
            "-monitor", f"unix:{spec.monitor_socket},server,nowait",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        for index, nic in enumerate(spec.nics):
            if nic.tap:
                netdev = f"tap,id=net{index},ifname={nic.tap},script=no,downscript=no"
            else:
                netdev = f"user,id=net{index},{nic.user_options}".rstrip(",")
            argv += ["-netdev", netdev, "-device", f"{nic.model},netdev=net{index},mac={nic.mac}"]
        if spec.disk:
            argv += ["-drive", f"file={spec.disk},if=virtio,format=raw,cache=unsafe"]
        if boot is BootFrom.KERNEL:
            if not (spec.kernel and spec.initrd):
                raise VmError(f"{spec.name}: kernel boot needs a kernel and an initrd")
            argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.append or ""]
        else:
            argv += ["-boot", "n" if boot is BootFrom.NETWORK else "c"]
        return netns_argv(spec.netns, argv)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, boot: BootFrom | None = None) -> None:
        if self.is_running:
            return
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        self.spec.monitor_socket.unlink(missing_ok=True)
        self._proc = spawn(self.argv(boot), log_path=self.spec.workdir / f"{self.spec.name}.qemu.log")
        time.sleep(0.3)
        if self._proc.poll() is not None:
            log_text = (self.spec.workdir / f"{self.spec.name}.qemu.log").read_text(errors="replace")
            raise VmError(f"{self.spec.name}: qemu exited at start: {log_text.strip()[-300:]}")

    def stop(self, timeout: float = 5.0) -> None:
        """Pull the plug."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise VmError(f"{self.spec.name}: qemu did not stop") from exc

    def reset(self) -> None:
        """Press the reset button (through QEMU's monitor)."""
        if not self.is_running:
            raise VmError(f"{self.spec.name}: cannot reset a machine that is off")
        self.monitor("system_reset")

    def monitor(self, command: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.spec.monitor_socket.exists():
            if time.monotonic() > deadline:
                raise VmError(f"{self.spec.name}: no QEMU monitor socket")
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.spec.monitor_socket))
            sock.recv(4096)  # banner
            sock.sendall(command.encode() + b"\n")
            time.sleep(0.1)
            return sock.recv(65536).decode(errors="replace")

    def console(self) -> str:
        path = self.spec.serial_log
        return path.read_text(errors="replace") if path.exists() else ""

    def console_tail(self, lines: int = 20) -> str:
        text = self.console().replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_console(self, pattern: str, timeout: float, *, since: int = 0) -> float:
        """Wait until the serial console matches pattern; return seconds waited."""
        regex = re.compile(pattern)
        start = time.monotonic()
        while True:
            if regex.search(self.console()[since:]):
                return time.monotonic() - start
            if not self.is_running:
                raise VmError(f"{self.spec.name}: machine stopped before {pattern!r}", hint=self.console_tail(5))
            if time.monotonic() - start > timeout:
                raise VmError(
                    f"{self.spec.name}: {pattern!r} not seen on the console within {timeout:.0f} s",
                    hint="console tail: " + self.console_tail(3).replace("\n", " | "),
                )
            time.sleep(0.5)

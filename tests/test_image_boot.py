"""Boot the built kernel + initramfs in QEMU; the squashfs comes over HTTP from loopback.

QEMU user networking maps 10.0.2.2 to the host's loopback, where a small
threaded HTTP server in the test serves the published image directory. A
blank virtual disk checks the storage layout's boot unit: it must be
formatted, labelled and mounted at /mnt/disk.
"""

from __future__ import annotations

import functools
import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.image.store import ImageVersion
from provision.lab.vm import BootFrom, Machine, MachineSpec, Nic

pytestmark = pytest.mark.vm


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ssh_banner(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                banner = conn.recv(256).decode(errors="replace").strip()
                if banner:
                    return banner
        except OSError:
            pass
        if time.monotonic() > deadline:
            return ""
        time.sleep(2)


@pytest.fixture
def http_root(base_image: ImageVersion) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(base_image.path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://10.0.2.2:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_boots_to_login_from_http_squashfs(base_image: ImageVersion, http_root: str, tmp_path: Path) -> None:
    disk = tmp_path / "scratch.img"
    with open(disk, "wb") as handle:
        handle.truncate(256 * 2**20)
    ssh_port = free_port()
    append = base_image.cmdline(f"{http_root}/rootfs.squashfs") + " panic=10"
    machine = Machine(
        MachineSpec(
            name="imgboot",
            workdir=tmp_path,
            memory_mib=2048,
            nics=(Nic(mac="52:54:00:aa:00:01", user_options=f"restrict=off,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),),
            boot=BootFrom.KERNEL,
            kernel=base_image.kernel,
            initrd=base_image.initrd,
            append=append,
            disk=disk,
        )
    )
    machine.start()
    try:
        machine.wait_for_console(r"provision: node ready \(multi-user\)", timeout=600)
        machine.wait_for_console(r"login: ", timeout=60)
        console = machine.console()
        # sshd refuses to start without host keys: the image has none, the boot made them.
        assert ssh_banner(ssh_port, timeout=120).startswith("SSH-2.0-OpenSSH"), machine.console_tail(20)
    finally:
        machine.stop()
    assert "provision-local-disk: formatting blank /dev/vda as ext4" in console
    assert "provision-local-disk: mounted /dev/vda at /mnt/disk" in console
    assert "Failed to start" not in console, machine.console_tail(40)
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(disk)], capture_output=True, text=True)
    assert label.stdout.strip() == "node-local"

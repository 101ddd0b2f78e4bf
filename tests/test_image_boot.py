"""Boot the built kernel + initramfs in QEMU; the squashfs comes over HTTP from loopback.

QEMU user networking maps 10.0.2.2 to the host's loopback, where a small
threaded HTTP server in the test serves the published image directory. A
blank virtual disk checks the storage layout's boot unit: it must be
formatted, labelled and mounted at /mnt/disk.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.image.store import ImageVersion
from provision.vm import BootFrom, Machine, MachineSpec, Nic

pytestmark = pytest.mark.vm


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


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
    append = base_image.cmdline(f"{http_root}/rootfs.squashfs") + " panic=10"
    machine = Machine(
        MachineSpec(
            name="imgboot",
            workdir=tmp_path,
            memory_mib=2048,
            nics=(Nic(mac="52:54:00:aa:00:01"),),
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
    finally:
        machine.stop()
    assert "provision-local-disk: formatting blank /dev/vda as ext4" in console
    assert "provision-local-disk: mounted /dev/vda at /mnt/disk" in console
    assert "Failed to start" not in console, machine.console_tail(40)
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", console)
    # sshd refuses to start without host keys: the image has none, the boot made them.
    assert re.search(r"Started ssh\.service", plain), machine.console_tail(40)
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(disk)], capture_output=True, text=True)
    assert label.stdout.strip() == "node-local"

"""One GPU node end to end: booted through Redfish, joined, a container job (Pyxis + Enroot) on it.

compute-gpu-debian12, built in this run, boots on a one-node virtual rack
(``lab up --image compute-gpu-debian12 --bmc redfish``: sushy-tools'
sushy-emulator is the BMC, HTTPS with the lab's CA, basic auth; it keeps a
one-time PXE override as persistent, which ``node boot`` accepts, a stateless
node network-boots every time) and joins by itself to ``idle``.

On it, the test makes a small squashfs container image from a rootfs it
assembles (dash and cat with their libraries, an /etc/os-release naming a
made-up OS), copies it to the node's local disk and runs ``srun
--container-image=<file> cat /etc/os-release`` from the node. The job must
print the container's OS, and Enroot must have kept its data under /mnt/disk
and its cache under /opt/cache (the local-disk half, /opt/cache/disk), as
enroot.conf says. The NVIDIA module must be there for the running kernel
(``modinfo nvidia-current``: Debian's name for it); loading it needs a GPU,
which the lab has not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GPU_IMAGE
from vmlab import SharedRack, needs_root, timeline

from provision.image.store import ImageVersion

pytestmark = [pytest.mark.vm, pytest.mark.integration]

OS_RELEASE = (
    'NAME="Provision Test Container"\nID=provtest\nVERSION_ID="1.0"\nPRETTY_NAME="Provision Test Container 1.0"\n'
)
DATA = "/mnt/disk/scratch/tmp/enroot/data/user-0"
CACHE = "/opt/cache/disk/tmp/enroot/cache/group-0"


def _libraries(binary: str) -> list[Path]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    return [Path(word) for line in out.splitlines() for word in line.split() if word.startswith("/")]


def make_container(tmp_path: Path) -> Path:
    """A squashfs image of a tiny rootfs: /bin/sh (dash, Enroot's rc needs a shell), cat, os-release."""
    root = tmp_path / "rootfs"
    for merged in ("bin", "lib", "lib64"):  # a merged-/usr layout, as Debian's
        (root / "usr" / merged).mkdir(parents=True)
        (root / merged).symlink_to(f"usr/{merged}")
    for binary in ("/bin/dash", "/bin/cat"):
        for path in [Path(binary).resolve(), *_libraries(binary)]:
            target = root / path.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    (root / "bin/sh").symlink_to("dash")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/os-release").write_text(OS_RELEASE)
    for name in ("proc", "sys", "dev", "tmp", "run", "root"):
        (root / name).mkdir(exist_ok=True)
    image = tmp_path / "provtest.sqsh"
    subprocess.run(
        ["mksquashfs", str(root), str(image), "-noappend", "-all-root", "-comp", "zstd", "-quiet"], check=True
    )
    return image


@pytest.fixture(scope="module")
def gpu_node(gpu_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRack]:
    """The module's one-node rack on compute-gpu-debian12 behind a Redfish BMC; booted once, by the first test."""
    if os.geteuid() != 0:
        pytest.fail("namespaces, taps and QEMU need root; CI runs the suite as root")
    rack = SharedRack(
        tmp_path_factory.mktemp("gpu-node"), gpu_image.path.parents[1], nodes=1, bmc="redfish", image=GPU_IMAGE
    )
    try:
        yield rack
    finally:
        rack.down()


@needs_root
def test_a_node_boots_and_joins_through_redfish(gpu_node: SharedRack) -> None:
    """Power, PXE and power-on through Redfish; the node joins by itself to ``idle``."""
    report = gpu_node.boot()
    print(timeline(report, gpu_node.lab.status["accel"]))
    assert report["summary"] == {"ok": 1, "failed": 0}
    assert list(report["nodes"][0]["stages"])[-1] == "joined"
    assert gpu_node.lab.states() == {"r1n01": "idle"}
    assert gpu_node.lab.status["bmc"] == "redfish"


@needs_root
def test_srun_container_image_on_a_joined_node(gpu_node: SharedRack, tmp_path: Path) -> None:
    image = make_container(tmp_path)
    gpu_node.boot()
    lab = gpu_node.lab
    node = lab.status["nodes"][0]
    assert lab.ssh(node, "sinfo -h -N -o %T").split() == ["idle"]

    # The driver: built for the kernel the node runs (vermagic), not loadable without a GPU.
    # Debian installs it as nvidia-current.ko; `modprobe nvidia` reaches it through an install rule.
    kernel = lab.ssh(node, "uname -r").strip()
    assert lab.ssh(node, "modinfo -F vermagic nvidia-current").split()[0] == kernel
    assert "nvidia-current" in lab.ssh(node, "modprobe -n -v nvidia 2>&1 || true")
    assert lab.ssh(node, "command -v nvidia-smi").strip() == "/usr/bin/nvidia-smi"
    assert lab.ssh(node, "systemctl is-enabled nvidia-persistenced").strip() == "enabled"

    sqsh = "/mnt/disk/scratch/tmp/provtest.sqsh"
    lab.copy(node, image, sqsh)
    out = lab.ssh(node, f"srun --container-image={sqsh} --container-name=provtest cat /etc/os-release")
    assert 'NAME="Provision Test Container"' in out and "ID=provtest" in out, out
    # The job ran in the container, not on the node (Debian there).
    assert "debian" not in out.lower()

    # Enroot's data (the named container's rootfs) on the local disk, its cache under /opt/cache/disk.
    assert "pyxis_provtest" in lab.ssh(node, f"ls {DATA}").split()
    assert lab.ssh(node, f"test -d {CACHE} && echo yes").strip() == "yes"
    for path in (DATA, CACHE):
        assert lab.ssh(node, f"findmnt -n -o SOURCE -T {path}").strip().startswith("/dev/vda"), path
    conf = lab.ssh(node, "cat /etc/enroot/enroot.conf")
    assert "ENROOT_DATA_PATH /mnt/disk/" in conf and "ENROOT_CACHE_PATH /opt/cache/disk/" in conf


def test_container_image_is_a_squashfs_with_the_os_release(tmp_path: Path) -> None:
    """The test's own image (no VM): a squashfs whose /etc/os-release names the test OS."""
    if shutil.which("mksquashfs") is None:
        pytest.fail("missing prerequisite: squashfs-tools (./run setup)")
    image = make_container(tmp_path)
    listing = subprocess.run(["unsquashfs", "-cat", str(image), "etc/os-release"], capture_output=True, text=True)
    assert listing.stdout == OS_RELEASE

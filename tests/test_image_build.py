"""`provision image build` for real: the shared base-debian12 build, its rootfs, initramfs and manifest.

The build itself runs once per session (the ``base_image`` fixture in
conftest.py); these tests inspect what it published. The rootfs checks run
testinfra's local backend against the squashfs mounted read-only (paths
prefixed with the mount point; systemd queried offline with ``chroot``).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
from conftest import mounted_squashfs

from provision.image.scan import scan
from provision.image.store import ImageVersion, sha256_file

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def rootfs(base_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The published squashfs, mounted read-only for the module's tests."""
    with mounted_squashfs(base_image.squashfs, tmp_path_factory.mktemp("rootfs")) as mnt:
        yield mnt


@pytest.fixture(scope="module")
def host() -> Any:
    return testinfra.get_host("local://")


def test_build_report_and_manifest(base_image: ImageVersion, base_image_build: dict[str, Any]) -> None:
    manifest = json.loads(base_image.manifest.read_text())
    assert manifest["name"] == "base-debian12" and manifest["version"] == base_image.version
    assert manifest["distro"] == "debian" and manifest["release"] == "bookworm"
    assert manifest["kernel"]["version"].endswith("-amd64")
    assert "rd.live.overlay.overlayfs=1" in manifest["kernel"]["cmdline"]
    names = {p["name"]: p["version"] for p in manifest["packages"]}
    assert {"linux-image-amd64", "systemd", "dracut-live", "openssh-server"} <= set(names)
    assert all(names.values())
    assert [r["name"] for r in manifest["roles"]] == ["stateless", "storage_layout"]
    assert all(len(r["sha256"]) == 64 and "revision" in r for r in manifest["roles"])
    assert manifest["variables"] == {"storage_layout_world_mode": "1777"}
    assert set(manifest["stages"]) == {"bootstrap", "roles", "initramfs", "scan", "squashfs"}
    for filename, entry in manifest["artefacts"].items():
        assert sha256_file(base_image.path / filename) == entry["sha256"]
        assert (base_image.path / filename).stat().st_size == entry["size"]
    assert manifest["sizes"]["squashfs_bytes"] < manifest["sizes"]["rootfs_bytes"]
    assert base_image_build["version"] == base_image.version
    # current points at it, and nothing of the build is left in the store.
    store = base_image.path.parent.parent
    assert os.readlink(store / "base-debian12" / "current") == base_image.version
    assert not list(store.glob(".build-*"))


def test_rootfs_is_stateless(rootfs: Path, host: Any) -> None:
    assert host.file(f"{rootfs}/etc/machine-id").exists
    assert host.file(f"{rootfs}/etc/machine-id").size == 0
    assert list((rootfs / "etc/ssh").glob("ssh_host_*")) == []
    assert not host.file(f"{rootfs}/etc/resolv.conf").exists
    assert not host.file(f"{rootfs}/etc/hostname").exists
    assert "Stateless node" in host.file(f"{rootfs}/etc/fstab").content_string
    assert not list((rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert not [p for p in (rootfs / "var/lib/apt/lists").glob("*") if p.is_file()]
    assert not [p for p in (rootfs / "var/log").rglob("*") if p.is_file() and not p.is_symlink()]
    assert not (rootfs / "root/.ansible").exists()
    assert not (rootfs / "usr/sbin/policy-rc.d").exists()
    assert scan(rootfs) == []


def test_rootfs_units_enabled_offline(rootfs: Path, host: Any) -> None:
    for unit in ("provision-local-disk.service", "provision-ssh-keygen.service", "ssh.service", "systemd-networkd"):
        result = host.run(f"chroot {rootfs} systemctl is-enabled {unit}")
        assert result.stdout.strip() == "enabled", (unit, result.stdout, result.stderr)
    dropin = host.file(f"{rootfs}/etc/systemd/system/ssh.service.d/provision-keygen.conf")
    assert dropin.contains("After=provision-ssh-keygen.service")
    assert host.file(f"{rootfs}/usr/local/sbin/provision-local-disk").mode == 0o755
    assert host.file(f"{rootfs}/etc/dracut.conf.d/provision.conf").contains("livenet")


def test_storage_layout_tree(rootfs: Path, host: Any) -> None:
    for name in ("shared", "persistent", "world-tmp"):
        d = host.file(f"{rootfs}/opt/cache/{name}")
        assert d.is_directory and d.mode == 0o1777, name
    assert host.file(f"{rootfs}/opt/cache/disk").is_directory
    assert host.file(f"{rootfs}/mnt/disk").is_directory
    script = host.file(f"{rootfs}/usr/local/sbin/provision-local-disk").content_string
    assert "SCRATCH=/mnt/disk" in script and "MODE=1777" in script


def test_file_capabilities_survive(rootfs: Path, host: Any) -> None:
    """xattrs are kept through the cache, overlay and squashfs: ping keeps cap_net_raw."""
    result = host.run(f"getcap {rootfs}/usr/bin/ping")
    assert "cap_net_raw" in result.stdout, result.stdout + result.stderr


def test_initramfs_for_the_images_kernel(base_image: ImageVersion, host: Any) -> None:
    kver = json.loads(base_image.manifest.read_text())["kernel"]["version"]
    mods = host.run(f"lsinitrd --mod {base_image.initrd}")
    assert mods.rc == 0, mods.stderr
    for module in ("livenet", "dmsquash-live", "url-lib", "network", "systemd"):
        assert module in mods.stdout.split(), module
    listing = host.run(f"lsinitrd {base_image.initrd}").stdout
    assert f"usr/lib/modules/{kver}/" in listing or f"lib/modules/{kver}/" in listing
    assert "squashfs.ko" in listing and "overlay.ko" in listing and "virtio_net.ko" in listing
    if platform.release() != kver:
        assert f"modules/{platform.release()}/" not in listing, "built for the host's kernel"
    assert host.file(str(base_image.kernel)).size > 4 * 2**20

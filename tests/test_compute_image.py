"""compute-debian12 with every compute role, built for real and inspected.

The build runs once per session (``compute_image`` in conftest.py). The GPU
stack (NVIDIA driver, Enroot) is configuration only here: it is installed in
compute-gpu-debian12 (tests/test_compute_gpu_image.py). What the roles could
not install here (Apptainer, CVMFS, s5cmd: their download sites are
unreachable) is configuration only; see the README matrix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
from conftest import mounted_squashfs

from provision.image.scan import scan
from provision.image.store import ImageVersion

pytestmark = pytest.mark.vm

COMPUTE_ROLES = [
    "stateless", "storage_layout", "node_tools", "nvidia_driver", "munge", "slurm_node",
    "sssd", "wireguard", "enroot", "apptainer", "cvmfs", "postboot", "join_agent",
]  # fmt: skip


@pytest.fixture(scope="module")
def rootfs(compute_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted_squashfs(compute_image.squashfs, tmp_path_factory.mktemp("compute-rootfs")) as mnt:
        yield mnt


@pytest.fixture(scope="module")
def host() -> Any:
    return testinfra.get_host("local://")


def test_manifest_lists_every_compute_role(compute_image: ImageVersion) -> None:
    manifest = json.loads(compute_image.manifest.read_text())
    assert [r["name"] for r in manifest["roles"]] == COMPUTE_ROLES
    packages = {p["name"] for p in manifest["packages"]}
    assert {"slurmd", "munge", "sssd", "wireguard-tools", "libpmix2"} <= packages


def test_packages_installed(rootfs: Path, host: Any) -> None:
    result = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Package}} ${{Status}}\\n'")
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.endswith("install ok installed")}
    wanted = {
        "slurmd", "munge", "sssd", "wireguard-tools", "libpmix2", "hwloc",
        "curl", "wget", "bash", "tar", "unzip", "xz-utils", "screen", "squashfs-tools",
        "cpio", "s3cmd", "slirp4netns", "grepcidr", "git-lfs",
    }  # fmt: skip
    assert wanted <= installed, sorted(wanted - installed)


def test_services_enabled_but_never_started(rootfs: Path, host: Any) -> None:
    for unit in ("munge.service", "slurmd.service", "sssd.service", "provision-local-disk.service"):
        result = host.run(f"chroot {rootfs} systemctl is-enabled {unit}")
        assert result.stdout.strip() == "enabled", (unit, result.stdout, result.stderr)
    # Nothing ran inside the build: no pid files, no sockets, no logs.
    assert not list((rootfs / "run").glob("munge/*"))
    assert not [p for p in (rootfs / "var/log").rglob("*") if p.is_file() and not p.is_symlink()]


def test_configless_slurmd_waits_for_its_key(rootfs: Path, host: Any) -> None:
    dropins = "".join(p.read_text() for p in (rootfs / "etc/systemd/system/slurmd.service.d").glob("*.conf"))
    assert "Restart=on-failure" in dropins
    assert not (rootfs / "etc/slurm/slurm.conf").exists()  # configless: fetched from slurmctld
    passwd = host.file(f"{rootfs}/etc/passwd").content_string
    assert any(line.startswith("slurm:") and ":64030:" in line for line in passwd.splitlines())
    # sssd, too, starts only once a join delivered its settings along with the key.
    for unit in ("slurmd", "sssd"):
        dropins = "".join(p.read_text() for p in (rootfs / f"etc/systemd/system/{unit}.service.d").glob("*.conf"))
        assert "ConditionPathExists=/etc/munge/munge.key" in dropins, unit


def test_join_units_are_ordered_for_one_restart(rootfs: Path) -> None:
    """The join agent restarts the bundle's services in one systemctl call: the units order themselves."""

    def ordering(unit: str, key: str) -> set[str]:
        words: set[str] = set()
        for dropin in (rootfs / f"etc/systemd/system/{unit}.d").glob("*.conf"):
            for line in dropin.read_text().splitlines():
                if line.startswith(f"{key}="):
                    words |= set(line.split("=", 1)[1].split())
        return words

    assert {"munge.service", "sssd.service", "sssd-nss.socket"} <= ordering("slurmd.service", "After")
    # sssd is ready once its monitor and backend are: the nss and pam responders start on first use through
    # their sockets, which sssd.service pulls in (and no other responder's); no services line to start them first.
    wants = rootfs / "etc/systemd/system/sssd.service.wants"
    assert {p.name for p in wants.iterdir()} == {"sssd-nss.socket", "sssd-pam.socket", "sssd-pam-priv.socket"}
    # Without a services line the package's check before each socket always passes: reset, one process less
    # before the nss socket slurmd waits for; no other socket has the drop-in.
    for socket in ("sssd-nss.socket", "sssd-pam.socket", "sssd-pam-priv.socket"):
        dropin = (rootfs / f"etc/systemd/system/{socket}.d/provision-no-check.conf").read_text().splitlines()
        assert dropin[-2:] == ["[Socket]", "ExecStartPre="], socket
    assert sorted(p.parent.name for p in (rootfs / "etc/systemd/system").glob("*/provision-no-check.conf")) == [
        "sssd-nss.socket.d", "sssd-pam-priv.socket.d", "sssd-pam.socket.d"]  # fmt: skip
    assert not [
        line for line in (rootfs / "etc/sssd/sssd.conf").read_text().splitlines() if line.startswith("services")
    ]
    assert "slurmd.service" in ordering("wg-quick@wg0.service", "Before")


def test_host_files_every_node_has(rootfs: Path, host: Any) -> None:
    """/etc/hosts, /etc/hostname and /etc/resolv.conf, as tools (Enroot's mounts among them) expect on any host:
    the loopback names in the image, the hostname written at each boot, resolv.conf the resolver's stub."""
    hosts = (rootfs / "etc/hosts").read_text().split()
    assert hosts[:2] == ["127.0.0.1", "localhost"]
    assert not (rootfs / "etc/hostname").exists()  # node state: none in the image
    assert "f /etc/hostname 0644 root root - %H" in (rootfs / "etc/tmpfiles.d/provision-hostname.conf").read_text()
    assert os.readlink(rootfs / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    result = host.run(f"chroot {rootfs} systemctl is-enabled systemd-resolved.service")
    assert result.stdout.strip() == "enabled", result.stderr


def test_storage_layout_and_modes(rootfs: Path, host: Any) -> None:
    for name in ("shared", "persistent", "world-tmp"):
        assert host.file(f"{rootfs}/opt/cache/{name}").mode == 0o1777, name
    enroot_conf = host.file(f"{rootfs}/etc/enroot/enroot.conf").content_string
    assert "/mnt/disk" in enroot_conf  # cache and data on local disk, one source of truth


def test_no_secrets_in_the_image(rootfs: Path) -> None:
    assert scan(rootfs) == []
    assert not (rootfs / "etc/munge/munge.key").exists()
    assert not [p for p in rootfs.glob("etc/wireguard/**/*") if p.is_file() and "private" in p.read_text()]
    sssd_conf = rootfs / "etc/sssd/sssd.conf"
    assert sssd_conf.exists() and "ldap_default_authtok" not in sssd_conf.read_text()

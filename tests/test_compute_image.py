"""compute-debian12 with every compute role, built for real and inspected.

The build runs once per session (``compute_image`` in conftest.py). The GPU
stack is installed for real: the NVIDIA driver from Debian's non-free built by
DKMS for the image's kernel, Enroot and Pyxis from their pinned release
tarballs. What the roles could not install here (Apptainer, CVMFS, s5cmd:
their download sites are unreachable) is configuration only; see the README
matrix.
"""

from __future__ import annotations

import json
import subprocess
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
    "sssd", "wireguard", "enroot", "pyxis", "apptainer", "cvmfs", "postboot",
]  # fmt: skip
ENROOT_VERSION = "4.1.2"
PYXIS_VERSION = "0.24.0"
SLURM_PLUGIN_DIR = "usr/lib/x86_64-linux-gnu/slurm-wlm"


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


def image_kernel(rootfs: Path) -> str:
    kernels = [p.name for p in (rootfs / "lib/modules").iterdir() if p.is_dir()]
    assert len(kernels) == 1, kernels
    return kernels[0]


def test_nvidia_module_built_for_the_image_kernel(compute_image: ImageVersion, rootfs: Path, host: Any) -> None:
    kernel = image_kernel(rootfs)
    assert json.loads(compute_image.manifest.read_text())["kernel"]["version"] == kernel
    vermagic = host.run(f"chroot {rootfs} modinfo -k {kernel} -F vermagic nvidia-current")
    assert vermagic.rc == 0, vermagic.stderr
    assert vermagic.stdout.split()[0] == kernel  # the image's kernel, never the build host's
    version = host.run(f"chroot {rootfs} modinfo -k {kernel} -F version nvidia-current").stdout.strip()
    dkms_package = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Version}}' nvidia-kernel-dkms").stdout
    assert version and dkms_package.startswith(version), (version, dkms_package)


def test_nvidia_user_space_without_x(rootfs: Path, host: Any) -> None:
    for tool in ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-persistenced"):  # alternatives: resolve inside
        assert host.run(f"chroot {rootfs} test -x {tool}").rc == 0, tool
    enabled = host.run(f"chroot {rootfs} systemctl is-enabled nvidia-persistenced.service")
    assert enabled.stdout.strip() == "enabled", enabled.stderr
    assert not (rootfs / "run/nvidia-persistenced").exists()  # enabled, never started in the build
    assert not (rootfs / "var/lib/dkms/mok.key").exists()  # DKMS's signing key never ships
    installed = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Package}}\\n'").stdout.split()
    assert {"nvidia-kernel-dkms", "nvidia-smi", "nvidia-persistenced", "libcuda1"} <= set(installed)
    assert not [p for p in installed if p.startswith(("xserver-xorg", "nvidia-driver"))]


def test_enroot_from_the_pinned_source(rootfs: Path, host: Any) -> None:
    # `enroot version` would create its directories (a read-only tree here): read the script's own.
    assert f'export ENROOT_VERSION="{ENROOT_VERSION}"' in (rootfs / "usr/bin/enroot").read_text()
    installed = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Package}}\\n'").stdout.split()
    assert not [p for p in installed if p.startswith("enroot")]  # built from the tarball, not a package
    # What enroot's package would depend on (column, ps, lsns, jq, parallel, mksquashfs, zstd).
    runtime = {"bsdextrautils", "procps", "util-linux", "jq", "parallel", "squashfs-tools", "zstd", "gawk"}
    assert runtime <= set(installed), sorted(runtime - set(installed))
    caps = host.run(f"getcap {rootfs}/usr/bin/enroot-aufs2ovlfs {rootfs}/usr/bin/enroot-mksquashovlfs").stdout
    assert "cap_sys_admin,cap_mknod=ep" in caps and "enroot-mksquashovlfs cap_sys_admin=ep" in caps, caps
    # The utilities are static (musl from Debian's musl-tools): no ELF interpreter.
    assert b"ld-linux" not in (rootfs / "usr/bin/enroot-nsenter").read_bytes()
    assert not [p for p in ("enroot", "pyxis") if (rootfs / "var/cache/provision" / p).exists()]  # build trees removed


def test_enroot_paths_on_the_local_disk(rootfs: Path) -> None:
    conf = dict(
        line.split(None, 1) for line in (rootfs / "etc/enroot/enroot.conf").read_text().splitlines()
        if line.startswith("ENROOT_")
    )  # fmt: skip
    assert conf["ENROOT_DATA_PATH"].startswith("/mnt/disk/scratch/tmp/")
    assert conf["ENROOT_CACHE_PATH"].startswith("/opt/cache/disk/tmp/")
    assert conf["ENROOT_TEMP_PATH"].startswith("/mnt/disk/")


def test_pyxis_from_the_pinned_source_loads_in_srun(rootfs: Path, tmp_path: Path) -> None:
    plugin = rootfs / SLURM_PLUGIN_DIR / "spank_pyxis.so"
    assert (rootfs / "usr/share/pyxis/VERSION").read_text().split()[0] == PYXIS_VERSION
    assert PYXIS_VERSION.encode() in plugin.read_bytes()
    entry = (rootfs / "etc/slurm/plugstack.conf.d/pyxis.conf").read_text()
    assert f"required /{SLURM_PLUGIN_DIR}/spank_pyxis.so" in entry
    includes = [line for line in (rootfs / "etc/slurm/plugstack.conf").read_text().splitlines() if "include" in line]
    assert includes == ["include /etc/slurm/plugstack.conf.d/*.conf"]
    # The same Slurm release's srun (the host's Debian 12 slurm-client) loads it: --container-image exists.
    (tmp_path / "plugstack.conf").write_text(f"required {plugin}\n")
    (tmp_path / "slurm.conf").write_text(
        f"ClusterName=t\nSlurmctldHost=localhost\nPlugStackConfig={tmp_path / 'plugstack.conf'}\n"
        "NodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n"
    )
    result = subprocess.run(
        ["srun", "--help"], env={"SLURM_CONF": str(tmp_path / "slurm.conf"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "--container-image" in result.stdout, result.stdout + result.stderr


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

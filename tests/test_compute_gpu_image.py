"""compute-gpu-debian12: compute-debian12 with the GPU stack installed, built for real and inspected.

The build runs once per session (``gpu_image`` in conftest.py): the NVIDIA
driver from Debian's non-free built by DKMS for the image's kernel (through
the kept compiler cache), Enroot and Pyxis from their pinned release
tarballs. compute-debian12 itself (tests/test_compute_image.py) keeps these
as configuration only.
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

from provision.image.ccache import IN_CHROOT, CompilerCache
from provision.image.definition import load
from provision.image.scan import scan
from provision.image.store import ImageVersion

pytestmark = pytest.mark.vm

ENROOT_VERSION = "4.1.2"
PYXIS_VERSION = "0.24.0"
SLURM_PLUGIN_DIR = "usr/lib/x86_64-linux-gnu/slurm-wlm"


@pytest.fixture(scope="module")
def rootfs(gpu_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted_squashfs(gpu_image.squashfs, tmp_path_factory.mktemp("gpu-rootfs")) as mnt:
        yield mnt


@pytest.fixture(scope="module")
def host() -> Any:
    return testinfra.get_host("local://")


@pytest.fixture(scope="module")
def installed(rootfs: Path, host: Any) -> set[str]:
    out = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Package}} ${{Status}}\\n'").stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith("install ok installed")}


def test_compute_debian12_plus_the_gpu_stack() -> None:
    gpu, plain = load("compute-gpu-debian12"), load("compute-debian12")
    assert [r for r in gpu.roles if r != "pyxis"] == list(plain.roles)
    # One bootstrap tree for both: the same bootstrap inputs.
    assert (gpu.packages, gpu.mirrors, gpu.components) == (plain.packages, plain.mirrors, plain.components)
    assert gpu.variables["nvidia_driver_install"] and not plain.variables["nvidia_driver_install"]


def test_manifest_lists_the_gpu_roles(gpu_image: ImageVersion) -> None:
    manifest = json.loads(gpu_image.manifest.read_text())
    roles = [r["name"] for r in manifest["roles"]]
    assert roles[roles.index("enroot") : roles.index("enroot") + 2] == ["enroot", "pyxis"]
    assert "nvidia_driver" in roles


def image_kernel(rootfs: Path) -> str:
    kernels = [p.name for p in (rootfs / "lib/modules").iterdir() if p.is_dir()]
    assert len(kernels) == 1, kernels
    return kernels[0]


def test_nvidia_module_built_for_the_image_kernel(gpu_image: ImageVersion, rootfs: Path, host: Any) -> None:
    kernel = image_kernel(rootfs)
    assert json.loads(gpu_image.manifest.read_text())["kernel"]["version"] == kernel
    vermagic = host.run(f"chroot {rootfs} modinfo -k {kernel} -F vermagic nvidia-current")
    assert vermagic.rc == 0, vermagic.stderr
    assert vermagic.stdout.split()[0] == kernel  # the image's kernel, never the build host's
    version = host.run(f"chroot {rootfs} modinfo -k {kernel} -F version nvidia-current").stdout.strip()
    dkms_package = host.run(f"chroot {rootfs} dpkg-query -W -f '${{Version}}' nvidia-kernel-dkms").stdout
    assert version and dkms_package.startswith(version), (version, dkms_package)


def test_nvidia_user_space_without_x(rootfs: Path, host: Any, installed: set[str]) -> None:
    for tool in ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-persistenced"):  # alternatives: resolve inside
        assert host.run(f"chroot {rootfs} test -x {tool}").rc == 0, tool
    enabled = host.run(f"chroot {rootfs} systemctl is-enabled nvidia-persistenced.service")
    assert enabled.stdout.strip() == "enabled", enabled.stderr
    assert not (rootfs / "run/nvidia-persistenced").exists()  # enabled, never started in the build
    assert not (rootfs / "var/lib/dkms/mok.key").exists()  # DKMS's signing key never ships
    assert {"nvidia-kernel-dkms", "nvidia-smi", "nvidia-persistenced", "libcuda1"} <= installed
    assert not [p for p in installed if p.startswith(("xserver-xorg", "nvidia-driver"))]


def test_the_compiler_cache_stays_out_of_the_image(
    gpu_image_build: dict[str, Any], rootfs: Path, installed: set[str]
) -> None:
    assert "ccache" not in installed  # installed for the module build, removed after it
    assert not (rootfs / IN_CHROOT.lstrip("/")).exists() and not (rootfs / "usr/lib/ccache").exists()
    assert not [p for p in (rootfs / "root").rglob("*ccache*")]
    # The build compiled through it: the cache holds results (a warm cache holds the same ones).
    assert CompilerCache().size_bytes() > 10 * 2**20
    assert "ccache" in gpu_image_build["stderr"]  # the roles stage reports it


def test_enroot_from_the_pinned_source(rootfs: Path, host: Any, installed: set[str]) -> None:
    # `enroot version` would create its directories (a read-only tree here): read the script's own.
    assert f'export ENROOT_VERSION="{ENROOT_VERSION}"' in (rootfs / "usr/bin/enroot").read_text()
    assert not [p for p in installed if p.startswith("enroot")]  # built from the tarball, not a package
    # What enroot's package would depend on (column, ps, lsns, jq, parallel, mksquashfs, zstd).
    runtime = {"bsdextrautils", "procps", "util-linux", "jq", "parallel", "squashfs-tools", "zstd", "gawk"}
    assert runtime <= installed, sorted(runtime - installed)
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


def test_services_enabled_but_never_started(rootfs: Path, host: Any) -> None:
    for unit in ("munge.service", "slurmd.service", "sssd.service", "nvidia-persistenced.service"):
        result = host.run(f"chroot {rootfs} systemctl is-enabled {unit}")
        assert result.stdout.strip() == "enabled", (unit, result.stdout, result.stderr)
    assert not [p for p in (rootfs / "var/log").rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_secrets_in_the_image(rootfs: Path) -> None:
    assert scan(rootfs) == []
    assert not (rootfs / "etc/munge/munge.key").exists()
    assert not (rootfs / "var/lib/dkms/mok.key").exists()

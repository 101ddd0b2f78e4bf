"""The NVIDIA driver's build gate against a prepared tree: the kernel changes under the driver.

Also the Rocky (CUDA repository) path, by rendering: Rocky's mirrors and
NVIDIA's repository are unreachable here.

A full image build per case would cost minutes; instead the gate alone
(``nvidia_driver`` with ``tasks_from: gate.yml``) runs over the chroot
connection against a writable overlay of compute-gpu-debian12 built in this
run (its driver built by DKMS for its kernel). It passes as built; with a second,
newer kernel installed beside and the gate pointed at it (what a kernel
update without a driver rebuild leaves), it fails naming both kernels.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted_squashfs

from provision.ansible import PlaybookError, run_playbook
from provision.catalog import ROLES_DIR
from provision.image.chroot import Chroot
from provision.image.rootfs import RootOverlay
from provision.image.store import ImageVersion

NEWER_KERNEL = "6.1.0-999-amd64"
GATE_PLAY = """\
- name: Run the NVIDIA gate
  hosts: all
  gather_facts: false
  tasks:
    - name: Gate
      ansible.builtin.include_role:
        name: nvidia_driver
        tasks_from: gate.yml
"""


def run_gate(root: Path, workdir: Path, kernel_version: str = "") -> str:
    """The gate over the chroot connection at root; '' when it passes, else the failure text."""
    book = workdir / "gate.yml"
    book.write_text(GATE_PLAY)
    inventory = {
        "all": {
            "hosts": {
                "image": {
                    "ansible_connection": "community.general.chroot",
                    "ansible_host": str(root),
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "nvidia_driver_kernel_version": kernel_version,
                }
            }
        }
    }
    try:
        run_playbook(book, inventory=inventory, roles_path=[ROLES_DIR], timeout=600)
    except PlaybookError as exc:
        return f"{exc} {exc.hint or ''}"
    return ""


def image_kernel(root: Path) -> str:
    kernels = [p.name for p in (root / "lib/modules").iterdir() if p.is_dir()]
    assert len(kernels) == 1, kernels
    return kernels[0]


@pytest.fixture(scope="module")
def prepared_tree(gpu_image: ImageVersion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A writable overlay of the built image, API filesystems mounted."""
    base = tmp_path_factory.mktemp("gate")
    (base / "lower").mkdir()
    with (
        mounted_squashfs(gpu_image.squashfs, base / "lower") as lower,
        RootOverlay(lower, base / "staging") as root,
        Chroot(root),
    ):
        yield root


@pytest.mark.vm
def test_gate_passes_for_the_image_kernel(prepared_tree: Path, tmp_path: Path) -> None:
    assert run_gate(prepared_tree, tmp_path) == ""


@pytest.mark.vm
def test_gate_fails_naming_both_kernels_when_the_kernel_changes(prepared_tree: Path, tmp_path: Path) -> None:
    built_for = image_kernel(prepared_tree)
    newer = prepared_tree / "lib/modules" / NEWER_KERNEL
    newer.mkdir()
    try:
        failure = run_gate(prepared_tree, tmp_path, kernel_version=NEWER_KERNEL)
    finally:
        newer.rmdir()
    assert "kernel mismatch" in failure, failure
    assert f"the image's kernel is {NEWER_KERNEL}" in failure, failure
    assert f"built for {built_for}" in failure, failure


ROCKY_PLAY = """\
- name: Render the Rocky path of nvidia_driver
  hosts: all
  gather_facts: false
  vars:
    ansible_facts: {os_family: RedHat, distribution: Rocky, distribution_major_version: "9"}
    __nvidia_driver_kernel: 5.14.0-427.13.1.el9_4.x86_64
  tasks:
    - name: Load the role's RedHat variables
      ansible.builtin.include_vars: "{{ roles_dir }}/nvidia_driver/vars/RedHat.yml"
    - name: Write what the role would install
      ansible.builtin.copy:
        content: "{{ {'repo': __nvidia_driver_repo_url, 'key': __nvidia_driver_repo_key_url,
                      'packages': __nvidia_driver_cuda_packages, 'dkms': __nvidia_driver_dkms_packages,
                      'source': __nvidia_driver_source} | to_json }}"
        dest: "{{ out }}"
        mode: "0600"
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kmod", "flavor", "stream", "dkms"),
    [
        ("precompiled", "proprietary", "550", []),
        ("dkms", "proprietary", "550-dkms", ["dkms"]),
        ("dkms", "open", "550-open", ["dkms"]),
    ],
)
def test_rocky_cuda_path_renders(tmp_path: Path, kmod: str, flavor: str, stream: str, dkms: list[str]) -> None:
    book, out = tmp_path / "rocky.yml", tmp_path / "out.json"
    book.write_text(ROCKY_PLAY)
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    run_playbook(
        book,
        inventory={"all": {"hosts": {"rocky": local}}},
        extravars={
            "roles_dir": str(ROLES_DIR), "out": str(out), "nvidia_driver_version": "550.127.08",
            "nvidia_driver_kmod": kmod, "nvidia_driver_module_flavor": flavor,
            "nvidia_driver_repo_base": "https://mirror.example.org/cuda",
        },
    )  # fmt: skip
    rendered = json.loads(out.read_text())
    assert rendered["source"] == "cuda"
    assert rendered["repo"] == "https://mirror.example.org/cuda/rhel9/x86_64/"
    assert rendered["key"] == "https://mirror.example.org/cuda/rhel9/x86_64/D42D0685.pub"
    kernel_devel = "kernel-devel-5.14.0-427.13.1.el9_4.x86_64"
    assert rendered["packages"] == [kernel_devel, "kernel-headers", f"@nvidia-driver:{stream}"]
    assert rendered["dkms"] == dkms

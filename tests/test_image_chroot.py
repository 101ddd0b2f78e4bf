"""Chroot mounts: always unmounted, on success, on error, and never the root's own mount."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from provision.image.chroot import Chroot, mounts_under, processes_inside, remove_tree

pytestmark = pytest.mark.integration


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "root"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/resolv.conf").write_text("nameserver 192.0.2.1  # the host's copy\n")
    return tree


def test_mounts_appear_and_vanish(root: Path) -> None:
    with Chroot(root):
        points = {p.relative_to(root).as_posix() for p in mounts_under(root)}
        assert {"proc", "sys", "dev", "dev/pts", "dev/shm", "run"} <= points
        assert (root / "dev/null").is_char_device()
        assert (root / "etc/resolv.conf").read_text() == Path("/etc/resolv.conf").read_text()
    assert mounts_under(root) == []
    assert not (root / "etc/resolv.conf").exists(), "a stateless image keeps no resolv.conf"


def test_exception_still_unmounts(root: Path) -> None:
    with pytest.raises(RuntimeError), Chroot(root):
        raise RuntimeError("role failed")
    assert mounts_under(root) == []


def test_root_mount_itself_is_left_alone(root: Path) -> None:
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        with Chroot(root):
            pass
        assert mounts_under(root) == [root], "the build's overlay at the root stays mounted"
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_remove_tree_unmounts_first(root: Path) -> None:
    chroot = Chroot(root).__enter__()  # a build killed before it could clean up
    assert mounts_under(root)
    remove_tree(root)
    assert not root.exists()
    assert chroot.root == root.resolve()
    assert (Path("/dev/null")).is_char_device(), "host devices untouched"


# A process that chroots into the tree and keeps writing there (what dpkg does under a cancelled playbook).
WRITER = """
import os, sys, time
os.chroot(sys.argv[1]); os.chdir("/")
print("inside", flush=True)
n = 0
while True:
    n += 1
    with open(f"/etc/written-{n % 50}", "w") as handle:
        handle.write("x" * 4096)
    time.sleep(0.01)
"""


def test_closing_stops_what_still_runs_inside(root: Path) -> None:
    """Nothing may write into the tree once the chroot closes: what runs inside is killed first (then the tree
    can be removed; before, `rm -rf` raced a still-running writer: "Directory not empty")."""
    with Chroot(root):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "inside"
        assert writer.pid in processes_inside(root)
    assert writer.wait(timeout=5) == -9
    assert processes_inside(root) == []
    remove_tree(root)
    assert not root.exists()

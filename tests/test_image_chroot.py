"""Chroot mounts: always unmounted, on success, on error, and never the root's own mount."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from provision.image.chroot import Chroot, mounts_under, remove_tree

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

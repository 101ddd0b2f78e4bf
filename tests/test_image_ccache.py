"""The compiler cache: lent to the chroot for the roles only, never left in the tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.errors import ImageError
from provision.image.build import extravars_for
from provision.image.ccache import IN_CHROOT, MAX_SIZE, CompilerCache
from provision.image.chroot import Chroot, mounts_under
from provision.image.definition import load

pytestmark = pytest.mark.integration


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "root"
    (tree / "etc").mkdir(parents=True)
    return tree


def test_mounted_inside_the_chroot_and_gone_after(root: Path, tmp_path: Path) -> None:
    cache = CompilerCache(tmp_path / "cache")
    with Chroot(root), cache.mounted(root) as inside:
        assert inside == IN_CHROOT
        assert root / IN_CHROOT.lstrip("/") in mounts_under(root)
        (root / inside.lstrip("/") / "result").write_text("compiled\n")  # what ccache writes lands in the cache
    assert mounts_under(root) == []
    assert (cache.dir / "result").read_text() == "compiled\n"
    assert not (root / "run").exists() or not any((root / "run").iterdir()), "no mount point left in the tree"
    assert cache.dir.stat().st_mode & 0o777 == 0o700
    assert f"max_size = {MAX_SIZE}" in (cache.dir / "ccache.conf").read_text()
    assert cache.size_bytes() > 0


def test_kept_configuration_is_not_rewritten(root: Path, tmp_path: Path) -> None:
    cache = CompilerCache(tmp_path / "cache")
    cache.dir.mkdir(parents=True)
    (cache.dir / "ccache.conf").write_text("max_size = 9G\n")  # a site's own limit
    with Chroot(root), cache.mounted(root):
        pass
    assert (cache.dir / "ccache.conf").read_text() == "max_size = 9G\n"


def test_refused_outside_a_chroot(root: Path, tmp_path: Path) -> None:
    (root / "run").mkdir()
    with pytest.raises(ImageError) as info, CompilerCache(tmp_path / "cache").mounted(root):
        pass
    assert "leave its mount point in the image" in info.value.message
    assert info.value.hint == "mount the cache inside a Chroot block"
    assert mounts_under(root) == []


def test_unusable_cache_directory(root: Path, tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory should be\n")
    with pytest.raises(ImageError) as info, Chroot(root), CompilerCache(tmp_path / "cache").mounted(root):
        pass
    assert info.value.message.startswith(f"cannot use the compiler cache {tmp_path / 'cache' / 'ccache'}")
    assert info.value.hint and "PROVISION_CACHE_DIR" in info.value.hint
    assert mounts_under(root) == []


def test_default_location_follows_the_build_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_CACHE_DIR", str(tmp_path))
    assert CompilerCache().dir == tmp_path / "ccache"


def test_roles_are_told_where_it_is() -> None:
    definition = load("compute-gpu-debian12")
    assert extravars_for(definition, IN_CHROOT)["provision_image_ccache_dir"] == IN_CHROOT
    assert extravars_for(definition)["provision_image_ccache_dir"] == ""

"""The image store: atomic publish, current, rollback, rm, prune, stale builds."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from provision.errors import ImageError
from provision.image.store import ImageStore, sha256_file


def stage_image(store: ImageStore, name: str, marker: str):  # type: ignore[no-untyped-def]
    """A staging context with fake artefacts and a manifest that hashes them."""
    ctx = store.staging(name)
    staging = ctx.__enter__()
    artefacts = {}
    for filename in ("vmlinuz", "initrd.img", "rootfs.squashfs"):
        path = staging.out / filename
        path.write_text(f"{filename} {marker}\n")
        artefacts[filename] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"name": name, "artefacts": artefacts, "kernel": {"version": "6.1.0", "cmdline": "rd.neednet=1"}}
    (staging.out / "manifest.json").write_text(json.dumps(manifest))
    return ctx, staging


def publish(store: ImageStore, name: str, version: str, keep: int = 3) -> None:
    ctx, staging = stage_image(store, name, version)
    try:
        store.publish(staging, version, keep=keep)
    finally:
        ctx.__exit__(None, None, None)


def test_publish_current_and_layout(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    publish(store, "img", "20260101-000000")
    current = store.current("img")
    assert current.version == "20260101-000000" and current.is_current
    assert os.readlink(tmp_path / "img" / "current") == "20260101-000000"
    assert current.kernel.read_text() == "vmlinuz 20260101-000000\n"
    assert current.initrd.name == "initrd.img" and current.squashfs.name == "rootfs.squashfs"
    assert current.manifest.name == "manifest.json"
    current.verify()
    assert current.cmdline("http://10.0.0.1/s") == "root=live:http://10.0.0.1/s rd.neednet=1"
    assert not list(tmp_path.glob(".build-*")), "the staging directory is gone"


def test_hash_mismatch_is_never_published(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    publish(store, "img", "20260101-000000")
    ctx, staging = stage_image(store, "img", "two")
    (staging.out / "rootfs.squashfs").write_text("tampered\n")
    with pytest.raises(ImageError, match="sha256 mismatch"):
        store.publish(staging, "20260102-000000")
    ctx.__exit__(None, None, None)
    assert store.current("img").version == "20260101-000000"
    assert [v.version for v in store.versions("img")] == ["20260101-000000"]


def test_rollback_rm_and_prune(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for day in (1, 2, 3):
        publish(store, "img", f"2026010{day}-000000", keep=3)
    assert store.current("img").version == "20260103-000000"
    assert store.rollback("img").version == "20260102-000000"
    assert store.current("img").version == "20260102-000000"
    with pytest.raises(ImageError, match="current version; refusing"):
        store.remove("img", "20260102-000000")
    store.remove("img", "20260103-000000")
    assert [v.version for v in store.versions("img")] == ["20260101-000000", "20260102-000000"]
    assert store.rollback("img").version == "20260101-000000"
    with pytest.raises(ImageError, match="no version older"):
        store.rollback("img")
    assert store.rollback("img", to="20260102-000000").version == "20260102-000000"
    with pytest.raises(ImageError, match="no version '1999'"):
        store.get("img", "1999")


def test_prune_keeps_count_and_never_current(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for day in range(1, 6):
        publish(store, "img", f"2026010{day}-000000", keep=2)
    assert [v.version for v in store.versions("img")] == ["20260104-000000", "20260105-000000"]
    store.rollback("img")
    publish(store, "img", "20260106-000000", keep=1)
    assert [v.version for v in store.versions("img")] == ["20260106-000000"]


def test_new_version_is_unique(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    first = store.new_version("img")
    publish(store, "img", first)
    assert store.new_version("img") != first


def test_no_image_yet(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no published image") as info:
        ImageStore(tmp_path).current("img")
    assert "provision image build img" in (info.value.hint or "")


def test_clean_stale_spares_running_builds(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    dead = tmp_path / ".build-img-dead"
    (dead / "rootfs/etc").mkdir(parents=True)
    (dead / ".lock").write_text("")
    running = tmp_path / ".build-img-live"
    running.mkdir()
    with open(running / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert store.clean_stale() == [dead]
    assert not dead.exists() and running.exists()


def test_staging_removed_on_exception(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(RuntimeError), store.staging("img") as staging:
        (staging.rootfs / "etc").mkdir(parents=True)
        raise RuntimeError("boom")
    assert not list(tmp_path.glob(".build-*"))

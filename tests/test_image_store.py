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


# --- Property-based: names, versions and image definitions ------------------------------------------

import contextlib  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from provision.errors import ImageError as _ImageError  # noqa: E402
from provision.image import definition as _definition  # noqa: E402
from provision.names import is_exact_image_name, is_version  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_store_paths_never_leave_the_store(tmp_path_factory: pytest.TempPathFactory, name: str, version: str) -> None:
    root = tmp_path_factory.mktemp("store")
    store = ImageStore(root / "store")
    for action in (
        lambda: store.get(name, version),
        lambda: store.current(name),
        lambda: store.versions(name),
        lambda: store.remove(name, version),
        lambda: store.rollback(name, version),
    ):
        with contextlib.suppress(_ImageError):
            action()
    assert list(root.iterdir()) == []  # nothing created, inside or outside
    if is_exact_image_name(name):
        assert "/" not in name and name not in (".", "..")
    if is_version(version):
        assert "/" not in version and version not in (".", "..")


_IMAGE_KEYS = st.sampled_from(
    [
        "distro",
        "release",
        "mirrors",
        "packages",
        "roles",
        "vars",
        "kernel_cmdline",
        "squashfs",
        "initramfs",
        "keep_versions",
    ]
)
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_IMAGE_KEYS, _JSONISH, max_size=6), st.text(max_size=12))
def test_definition_parse_refuses_with_image_error_only(data: dict[str, object], name: str) -> None:
    good = {
        "distro": "debian",
        "release": "bookworm",
        "mirrors": {"debian": "http://deb.debian.org/debian"},
        "packages": ["systemd"],
        "roles": ["stateless"],
    }
    try:
        parsed = _definition.parse(name or "x", good | data, path=Path("x.yml"), check_roles=False)
    except _ImageError as exc:
        assert exc.hint and "\n" not in exc.message.split(": ", 1)[0]
        return
    assert is_exact_image_name(parsed.name)
    assert all(" " not in arg and "|" not in arg and "&" not in arg for arg in parsed.kernel_cmdline)
    assert not any(str(k).startswith(("ansible_", "provision_")) for k in parsed.variables)

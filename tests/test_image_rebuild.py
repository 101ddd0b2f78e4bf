"""Rebuilds: a role variable change reuses the bootstrap cache; a killed build publishes nothing.

These build into the session's store after the shared base-debian12 build
(the ``base_image`` fixture) and reuse its bootstrap cache entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from provision.catalog import IMAGES_DIR
from provision.image.chroot import mounts_under
from provision.image.store import ImageStore, ImageVersion

pytestmark = pytest.mark.vm


def provision(*args: str, **kwargs: Any) -> list[str]:
    return [sys.executable, "-m", "provision", *args]


def site_with_changed_var(tmp_path: Path) -> Path:
    """An inventory whose images directory (beside it) holds base-debian12 with one role variable changed."""
    site = tmp_path / "site"
    (site / "group_vars").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (site / "hosts.yml").write_text("all:\n  children:\n    rack_r1:\n      hosts: {}\n")
    (site / "group_vars/all.yml").write_text("provision_images_dir: ../images\nprovision_state_dir: state\n")
    data = yaml.safe_load((IMAGES_DIR / "base-debian12.yml").read_text())
    data["vars"]["storage_layout_world_mode"] = "0777"
    (tmp_path / "images/base-debian12.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    return site


def test_incremental_build_reuses_the_bootstrap(
    base_image: ImageVersion, base_image_build: dict[str, Any], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    site = site_with_changed_var(tmp_path)
    result = subprocess.run(
        provision("-i", str(site), "image", "build", "base-debian12", "--store", str(store), "--json"),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["bootstrap_cache_hit"] is True
    assert report["bootstrap_cache_key"] == base_image_build["bootstrap_cache_key"]
    manifest = json.loads(Path(report["manifest"]).read_text())
    assert manifest["variables"]["storage_layout_world_mode"] == "0777"
    assert manifest["bootstrap"]["cache_hit"] is True
    # The numbers the issue asks for, printed for the record (pytest -s).
    print(
        f"\nfull build {base_image_build['seconds']} s {base_image_build['stages']}"
        f"\nincremental build {report['seconds']} s {report['stages']}"
        f"\nrootfs {report['rootfs_bytes'] / 2**20:.0f} MiB, squashfs {report['squashfs_bytes'] / 2**20:.0f} MiB"
    )


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _start_and_wait_for_roles(store: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        build = subprocess.Popen(
            provision("image", "build", "base-debian12", "--store", str(store)),
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while b"bootstrap" not in log.read_bytes() or b"\xe2\x9c\x93 bootstrap" not in log.read_bytes():
        assert build.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the build never reached the roles stage"
        time.sleep(0.5)
    time.sleep(4)  # well inside the roles stage (Ansible running in the chroot)
    assert build.poll() is None, log.read_text()
    assert list(store.glob(".build-base-debian12-*")), "a staging directory exists mid-build"
    return build


def _host_mounts_under(path: Path) -> list[str]:
    text = Path("/proc/mounts").read_text()
    return [line for line in text.splitlines() if str(path) in line.split()[1]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_build_publishes_nothing(
    base_image: ImageVersion, image_store_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    store = ImageStore(image_store_dir)
    before = store.current("base-debian12")
    versions_before = [v.version for v in store.versions("base-debian12")]
    build = _start_and_wait_for_roles(image_store_dir, tmp_path / "build.log")
    helpers = _descendants(build.pid)
    if sig is signal.SIGTERM:
        build.send_signal(sig)
        rc = build.wait(timeout=120)
        log = (tmp_path / "build.log").read_text()
        assert rc == 1 and "interrupted by SIGTERM; nothing was published" in log, log
        assert not list(image_store_dir.glob(".build-*")), "a graceful stop removes its staging directory"
    else:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait(timeout=30)
        for pid in helpers:  # what a service manager does with the unit's control group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
    assert store.current("base-debian12") == before
    assert [v.version for v in store.versions("base-debian12")] == versions_before
    assert _host_mounts_under(image_store_dir) == []
    assert mounts_under(image_store_dir) == []
    # The next build (or this) removes what a killed one left behind.
    store.clean_stale()
    assert not list(image_store_dir.glob(".build-*"))
    before.verify()

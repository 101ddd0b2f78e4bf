"""`provision image …` commands on a store (fast: no build), and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from provision.image.store import ImageStore, sha256_file

EXAMPLE = Path(__file__).resolve().parent.parent / "inventory" / "example"


def fake_publish(store: ImageStore, name: str, version: str) -> None:
    with store.staging(name) as staging:
        artefacts = {}
        for filename in ("vmlinuz", "initrd.img", "rootfs.squashfs"):
            (staging.out / filename).write_text(f"{filename} {version}\n")
            artefacts[filename] = {"sha256": sha256_file(staging.out / filename), "size": 10}
        manifest = {
            "name": name,
            "version": version,
            "distro": "debian",
            "release": "bookworm",
            "kernel": {"version": "6.1.0-9-amd64", "cmdline": "rd.neednet=1"},
            "roles": [{"name": "stateless", "revision": "abc"}],
            "packages": [],
            "artefacts": artefacts,
            "sizes": {"squashfs_bytes": 10},
            "stages": {"bootstrap": 1.0},
            "built_at": "2026-01-01T00:00:00Z",
        }
        (staging.out / "manifest.json").write_text(json.dumps(manifest))
        store.publish(staging, version)


def invoke(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "provision", *args], capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def store(tmp_path: Path) -> Path:
    image_store = ImageStore(tmp_path / "store")
    fake_publish(image_store, "img", "20260101-000000")
    fake_publish(image_store, "img", "20260102-000000")
    return image_store.root


def test_list_show_rollback_rm(store: Path) -> None:
    rc, out, _ = invoke("image", "list", "--store", str(store), "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [(r["version"], r["current"]) for r in rows] == [("20260101-000000", False), ("20260102-000000", True)]
    rc, out, _ = invoke("image", "show", "img", "--store", str(store), "--json")
    assert rc == 0 and json.loads(out)["manifest"]["kernel"]["version"] == "6.1.0-9-amd64"
    rc, _, err = invoke("image", "rm", "img", "20260102-000000", "--store", str(store))
    assert rc == 1
    assert err.splitlines()[0] == "error: img: 20260102-000000 is the current version; refusing to remove it"
    rc, out, _ = invoke("image", "rollback", "img", "--store", str(store), "--json")
    assert rc == 0 and json.loads(out)["version"] == "20260101-000000"
    rc, _, _ = invoke("image", "rm", "img", "20260102-000000", "--store", str(store))
    assert rc == 0
    assert [v.version for v in ImageStore(store).versions("img")] == ["20260101-000000"]
    rc, _, err = invoke("image", "show", "img", "--version", "nope", "--store", str(store))
    assert rc == 1 and "no version 'nope'" in err


def test_build_without_name_uses_the_sites_default(tmp_path: Path) -> None:
    rc, out, err = invoke("-i", str(EXAMPLE), "image", "build", "--dry-run", "--json", "--store", str(tmp_path))
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["name"] == "compute-rocky9" and plan["distro"] == "rocky"
    assert plan["roles"][0] == "stateless"
    assert plan["stages"] == ["bootstrap", "roles", "initramfs", "scan", "squashfs", "manifest", "publish"]
    assert not list(tmp_path.iterdir()), "a dry run changes nothing"


def test_build_without_name_or_inventory(tmp_path: Path) -> None:
    rc, _, err = invoke("-i", str(tmp_path / "none"), "image", "build", "--store", str(tmp_path))
    assert rc == 1
    assert err.splitlines()[0] == "error: no image named and no provision_default_image in the inventory"


def test_store_needed_without_inventory(tmp_path: Path) -> None:
    rc, _, err = invoke("-i", str(tmp_path / "none"), "image", "list")
    assert rc == 1 and "no --store" in err.splitlines()[0]


def test_bad_definition_is_one_line(tmp_path: Path) -> None:
    rc, _, err = invoke("image", "build", "no-such-image", "--store", str(tmp_path), "--dry-run")
    assert rc == 1
    assert err.splitlines()[0] == "error: no image definition 'no-such-image'"
    assert err.splitlines()[1].startswith("hint: known images:")


def test_build_refuses_without_root(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "provision",
         "image", "build", "base-debian12", "--store", str(tmp_path / "s")],
        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == "error: image builds must run as root (bootstrap, chroot, mounts)"


def test_validate_all_shipped_definitions() -> None:
    rc, _, err = invoke("image", "validate")
    assert rc == 0, err
    assert "compute-rocky9: ok (rocky 9" in err and "base-debian12: ok (debian bookworm" in err

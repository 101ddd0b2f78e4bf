"""`provision image publish`: from the image store to the built-in backend and to Grendel."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import run_provision
from grendel_fake import FakeGrendel
from test_image_store import publish as store_publish

from provision import inventory
from provision.boot import backend_for
from provision.boot.builtin import BuiltinBackend
from provision.image.store import ImageStore

NAME = "base-debian12"


def write_site(root: Path, **extra: object) -> Path:
    site = root / "site"
    (site / "group_vars").mkdir(parents=True)
    hosts = {"all": {"children": {"rack_t1": {"hosts": {"node01": None}}}}}
    all_vars = {
        "provision_network": "10.99.0.0/24",
        "provision_default_image": NAME,
        "provision_state_dir": str(root / "state"),
        "provision_mac": "52:54:00:00:00:01",
        "provision_ip": "10.99.0.11",
        "provision_bmc_address": "127.0.0.1",
        "provision_bmc_user": "admin",
        **extra,
    }
    (site / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (site / "group_vars" / "all.yml").write_text(yaml.safe_dump(all_vars))
    return site


def test_builtin_publish_activates_only_when_asked(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    store = ImageStore(tmp_path / "store")
    store_publish(store, NAME, "20260101-000000")
    first = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["activated"] is True  # the first version is active at once

    store_publish(store, NAME, "20260202-000000")
    dry = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would publish"), dry.stderr
    second = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root)
    assert second.returncode == 0, second.stderr
    assert "servable, not active" in second.stdout

    backend = backend_for(inventory.load(site_dir))
    assert isinstance(backend, BuiltinBackend)
    versions, active = backend.versions(NAME)
    assert sorted(v.version for v in versions) == ["20260101-000000", "20260202-000000"]
    assert active == "20260101-000000"

    third = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root, "--activate")
    assert third.returncode == 0, third.stderr
    assert backend.versions(NAME)[1] == "20260202-000000"


def test_publish_of_an_unpublished_image_fails_cleanly(tmp_path: Path) -> None:
    site_dir = write_site(tmp_path)
    result = run_provision("-i", site_dir, "image", "publish", NAME, "--store", tmp_path / "empty-store")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_grendel_publish_copies_files_atomically_and_registers(tmp_path: Path) -> None:
    repo = tmp_path / "grendel-repo"
    repo.mkdir()
    store = ImageStore(tmp_path / "store")
    store_publish(store, NAME, "20260101-000000")
    with FakeGrendel("classic") as fake:
        site_dir = write_site(tmp_path, provision_boot_backend="grendel", provision_grendel_url=fake.url,
                              provision_grendel_repo_dir=str(repo))  # fmt: skip
        result = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root, "--json")
        assert result.returncode == 0, result.stderr
        registered = fake.images[NAME]
    assert fake.violations == []
    current = store.current(NAME)
    assert (repo / NAME / "vmlinuz").read_bytes() == current.kernel.read_bytes()
    assert (repo / NAME / "rootfs.squashfs").read_bytes() == current.squashfs.read_bytes()
    assert registered["kernel"] == str(repo / NAME / "vmlinuz")
    assert not list(repo.rglob(".*.partial"))


def test_grendel_publish_needs_its_repo_dir(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    store_publish(store, NAME, "20260101-000000")
    site_dir = write_site(tmp_path, provision_boot_backend="grendel", provision_grendel_url="http://127.0.0.1:9",
                          provision_grendel_repo_dir=str(tmp_path / "not-here"))  # fmt: skip
    result = run_provision("-i", site_dir, "image", "publish", NAME, "--store", store.root)
    assert result.returncode == 1
    assert "repo directory" in result.stderr and "Traceback" not in result.stderr

"""`provision grendel export` and `provision node sync` end to end, against the spec-checked fake Grendel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_provision
from grendel_fake import CLASSIC_SPEC, V2_SPEC, FakeGrendel, load_spec
from openapi_core.testing import MockRequest

from provision.boot import BootHost, BootImage
from provision.boot.grendel import GrendelBackend
from provision.grendel import GrendelSettings, host_from_doc, image_from_doc

HOSTS = {
    "all": {
        "children": {
            "rack_t1": {
                "hosts": {
                    "node01": {"provision_mac": "52:54:00:00:00:01", "provision_ip": "10.99.0.11"},
                    "node02": {"provision_mac": "52-54-00-00-00-02", "provision_ip": "10.99.0.12"},
                }
            },
            "rack_t2": {
                "hosts": {"cn[01:03]": {"provision_image": "compute-rocky9"}},
                "vars": {
                    "provision_ip": "10.99.0.{{ inventory_hostname[-2:] | int + 20 }}",
                    "provision_mac": "52:54:00:00:01:{{ '%02x' | format(inventory_hostname[-2:] | int) }}",
                },
            },
        }
    }
}
ALL_VARS = {
    "provision_network": "10.99.0.0/24",
    "provision_default_image": "base-debian12",
    "provision_bmc_user": "admin",
    "provision_bmc_address": "10.98.0.1",
    "provision_bmc_password_env": "TEST_BMC_PASSWORD",
    "provision_boot_backend": "grendel",
}
TOKEN_ENV = "TEST_GRENDEL_TOKEN"


def write_site(root: Path, **grendel_vars: Any) -> Path:
    site = root / "site"
    (site / "group_vars").mkdir(parents=True, exist_ok=True)
    (site / "hosts.yml").write_text(yaml.safe_dump(HOSTS))
    (site / "group_vars" / "all.yml").write_text(yaml.safe_dump({**ALL_VARS, **grendel_vars}))
    return site


@pytest.fixture
def classic() -> Iterator[FakeGrendel]:
    with FakeGrendel("classic") as fake:
        yield fake
    assert fake.violations == [], "\n".join(fake.violations)


def _images(fake: FakeGrendel, settings: GrendelSettings, *names: str) -> None:
    GrendelBackend(settings).put_images([BootImage(name=n, kernel=f"/var/lib/grendel/{n}/vmlinuz") for n in names])
    fake.seen.clear()


# --------------------------------------------------------------------------
# export


def _spec_errors(spec: Path, path: str, body: Any, host_url: str) -> list[str]:
    api = load_spec(spec)
    headers = {"Authorization": "Bearer x.y.z"}  # v0.2's security requirement; classic ignores it
    request = MockRequest(host_url, "post", path, headers=headers, data=json.dumps(body).encode())
    return [f"{e}: {e.__cause__}" for e in api.iter_request_errors(request)]


def test_export_prints_documents_that_both_specs_accept(tmp_path: Path) -> None:
    site = write_site(tmp_path, provision_grendel_firmware="snponly-x86_64.efi")
    result = run_provision("-i", site, "grendel", "export", "--all")
    assert result.returncode == 0, result.stderr
    docs = json.loads(result.stdout)
    assert [h["name"] for h in docs["hosts"]] == ["cn01", "cn02", "cn03", "node01", "node02"]
    assert [i["name"] for i in docs["images"]] == ["base-debian12", "compute-rocky9"]

    # The file loader reads exactly the API's Host / BootImage arrays (NOTES §8.3):
    # check them against the request-body schemas of both specs.
    assert _spec_errors(CLASSIC_SPEC, "/v1/host", docs["hosts"], "http://localhost") == []
    assert _spec_errors(CLASSIC_SPEC, "/v1/bootimage", docs["images"], "http://localhost") == []
    assert _spec_errors(V2_SPEC, "/v1/nodes", {"node_list": docs["hosts"]}, "http://0.0.0.0:8080") == []
    assert _spec_errors(V2_SPEC, "/v1/images", {"boot_images": docs["images"]}, "http://0.0.0.0:8080") == []

    node02 = next(h for h in docs["hosts"] if h["name"] == "node02")
    assert node02 == {
        "name": "node02",
        "provision": True,
        "boot_image": "base-debian12",
        "firmware": "snponly-x86_64.efi",
        "interfaces": [
            {"mac": "52:54:00:00:00:02", "ip": "10.99.0.12/24", "fqdn": "node02", "bmc": False},
            {"ip": "10.98.0.1/32", "bmc": True},
        ],
        "tags": ["rack=t1"],
    }
    image = docs["images"][1]
    assert image["kernel"] == "/var/lib/grendel/compute-rocky9/vmlinuz"
    assert image["liveimg"] == "/var/lib/grendel/compute-rocky9/rootfs.squashfs"
    assert "{{ $.endpoints.LiveImageURL }}" in image["cmdline"] and "{{ $.nic.MAC }}" in image["cmdline"]


def test_export_is_what_grendel_loads(tmp_path: Path, classic: FakeGrendel) -> None:
    """Files written with --output, fed to Grendel's host/image import, read back the same."""
    site = write_site(tmp_path, provision_grendel_images={"compute-rocky9": {"kernel": "/srv/k", "initrds": []}})
    out = tmp_path / "gitops"
    result = run_provision("-i", site, "grendel", "export", "--all", "--output", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 5 hosts to {out}/hosts.json, 2 images to {out}/images.json"
    hosts = json.loads((out / "hosts.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["hosts.json", "images.json"]  # no temp files left
    import requests

    # `grendel image import` / `host import` POST the file's array as is (NOTES §8.1).
    assert requests.post(classic.url + "/v1/bootimage", json=images, timeout=5).status_code == 201
    assert requests.post(classic.url + "/v1/host", json=hosts, timeout=5).status_code == 201
    backend = GrendelBackend(GrendelSettings(url=classic.url))
    assert backend.list_hosts() == [host_from_doc(h) for h in hosts]
    assert backend.get_image("compute-rocky9") == image_from_doc(images[1])
    assert images[1]["kernel"] == "/srv/k" and images[1]["initrd"] == []

    only = run_provision("-i", site, "grendel", "export", "--rack", "t1", "--only", "hosts")
    assert [h["name"] for h in json.loads(only.stdout)] == ["node01", "node02"]


def test_export_refuses_a_broken_inventory(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    (site / "host_vars").mkdir()
    (site / "host_vars" / "node01.yml").write_text("provision_mac: nope\n")
    out = tmp_path / "gitops"
    result = run_provision("-i", site, "grendel", "export", "--all", "--output", out)
    assert result.returncode == 1
    assert "node01: provision_mac" in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------
# node sync


def test_node_sync_end_to_end(tmp_path: Path, classic: FakeGrendel) -> None:
    site = write_site(tmp_path, provision_grendel_url=classic.url)
    settings = GrendelSettings(url=classic.url)

    missing = run_provision("-i", site, "node", "sync", "--all")
    assert missing.returncode == 1
    assert "has no image base-debian12, compute-rocky9" in missing.stderr
    assert classic.hosts == {}

    pushed = run_provision("-i", site, "grendel", "push-images", "--all")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip() == f"registered 2 images at {classic.url}: base-debian12, compute-rocky9"
    assert classic.images["compute-rocky9"]["liveimg"] == "/var/lib/grendel/compute-rocky9/rootfs.squashfs"
    classic.seen.clear()
    dry = run_provision("-i", site, "node", "sync", "--all", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True and report["backend"] == f"grendel (classic API) at {classic.url}"
    assert {h["change"] for h in report["hosts"]} == {"create"}
    assert classic.hosts == {} and not any(s.method == "POST" for s in classic.seen)

    first = run_provision("-i", site, "node", "sync", "--all")
    assert first.returncode == 0, first.stderr
    assert "wrote 5 of 5 hosts" in first.stdout
    assert sorted(classic.hosts) == ["cn01", "cn02", "cn03", "node01", "node02"]
    cn02 = GrendelBackend(settings).get_hosts(["cn02"])[0]
    assert cn02 == BootHost(
        name="cn02",
        macs=("52:54:00:00:01:02",),
        ips=("10.99.0.22/24",),
        bmc_address="10.98.0.1",
        image="compute-rocky9",
        tags=("rack=t2",),
    )

    status = run_provision("-i", site, "grendel", "status")
    assert status.stdout.strip() == (
        f"grendel classic API at {classic.url}: 5 hosts (5 set to provision), 2 images: base-debian12, compute-rocky9"
    )
    again = run_provision("-i", site, "node", "sync", "--rack", "t2", "--json")
    assert [h["change"] for h in json.loads(again.stdout)["hosts"]] == ["unchanged"] * 3

    (site / "host_vars").mkdir()
    (site / "host_vars" / "cn03.yml").write_text("provision_ip: 10.99.0.99\nprovision_image: base-debian12\n")
    changed = run_provision("-i", site, "node", "sync", "--nodes", "cn[01-03]", "--json")
    hosts = json.loads(changed.stdout)["hosts"]
    assert hosts[2] == {"name": "cn03", "change": "update", "fields": ["ips", "image"]}
    assert [h["change"] for h in hosts[:2]] == ["unchanged", "unchanged"]
    assert classic.hosts["cn03"]["interfaces"][0]["ip"] == "10.99.0.99/24"
    assert classic.hosts["cn03"]["boot_image"] == "base-debian12"


def test_node_sync_over_v2_with_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeGrendel("v2") as fake:
        token = fake.make_token()
        env = {TOKEN_ENV: token}
        site = write_site(tmp_path, provision_grendel_url=fake.url, provision_grendel_token_env=TOKEN_ENV)
        with monkeypatch.context() as m:
            m.setenv(TOKEN_ENV, token)
            _images(fake, GrendelSettings(url=fake.url, token_env=TOKEN_ENV), "base-debian12", "compute-rocky9")
        result = run_provision("--debug", "-i", site, "node", "sync", "--all", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert "GET /v1/nodes/find" in result.stdout + result.stderr  # --debug logs each request, not the token
        assert token not in result.stdout + result.stderr
        assert sorted(fake.hosts) == ["cn01", "cn02", "cn03", "node01", "node02"]
        assert all(s.headers.get("authorization") == f"Bearer {token}" for s in fake.seen)

        denied = run_provision("-i", site, "node", "sync", "--all")
        assert denied.returncode == 1
        assert denied.stderr.splitlines()[0].startswith(f"error: Grendel at {fake.url} wants an API token")
        assert f"hint: export {TOKEN_ENV}=<JWT>" in denied.stderr
        fake.violations = [v for v in fake.violations if "SecurityValidationError" not in v]
    assert fake.violations == []


def test_node_sync_over_the_unix_socket(tmp_path: Path) -> None:
    import tempfile

    sock = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp")) / "grendel-api.socket"
    with FakeGrendel("classic", socket_path=sock) as fake:
        site = write_site(tmp_path, provision_grendel_socket=str(sock), provision_grendel_api="classic")
        _images(fake, GrendelSettings(socket=sock), "base-debian12", "compute-rocky9")
        result = run_provision("-i", site, "node", "sync", "--rack", "t1")
        assert result.returncode == 0, result.stderr
        assert sorted(fake.hosts) == ["node01", "node02"]
        assert fake.seen[0].path == "/v1/host/find/node01,node02"  # no probe: api=classic
    assert fake.violations == []
    sock.parent.rmdir()


def test_node_sync_with_grendel_down_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    site = write_site(tmp_path, provision_grendel_url=url)
    result = run_provision("-i", site, "node", "sync", "--all")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: Grendel is not reachable at {url} (connection refused)",
        "hint: check that Grendel runs and that provision_grendel_socket / provision_grendel_url point at its API",
    ]
    assert result.stdout == ""

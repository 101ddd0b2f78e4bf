"""The built-in boot backend: rendering from an inventory, versions, tokens, and the real services.

Fast tests render configs into tmp_path. ``integration`` tests start dnsmasq
and nginx in a network namespace created here (10.99.0.0/24 inside it only)
and talk to them with curl from inside that namespace.
"""

from __future__ import annotations

import grp
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_provision
from grendel_fake import FakeGrendel

from provision import inventory
from provision.boot.base import BootBackend, BootHost, BootImage, Prepared, PrepareOptions, backend_for, get_backend
from provision.boot.builtin import BuiltinBackend, BuiltinConfig, Service, mac_file_name
from provision.boot.builtin.render import ServiceUser
from provision.bringup import NodeBoot
from provision.errors import BootError, ValidationError
from provision.inventory import Site
from provision.lab.netns import Netns

IMAGE = "base-debian12"  # an image defined under images/, so the inventory accepts it
V1, V2 = "20260101-000000", "20260102-000000"
MACS = {"node01": "52:54:00:99:00:11", "node02": "52:54:00:99:00:12"}
IPS = {"node01": "10.99.0.11", "node02": "10.99.0.12"}
_ns_counter = itertools.count()
NGINX_GROUP = ServiceUser.pick("www-data", "nginx").group


def make_store(root: Path, versions: tuple[str, ...] = (V1, V2), squashfs_size: int = 4096) -> Path:
    """An image store as provision.image.store lays it out, with small real files."""
    for version in versions:
        vdir = root / IMAGE / version
        vdir.mkdir(parents=True)
        (vdir / "vmlinuz").write_bytes(b"K" * 1000 + version.encode())
        (vdir / "initrd.img").write_bytes(b"I" * 2000 + version.encode())
        with open(vdir / "rootfs.squashfs", "wb") as fh:
            fh.write(os.urandom(squashfs_size))
        (vdir / "manifest.json").write_text(
            json.dumps({"name": IMAGE, "version": version, "kernel": {"cmdline": "rd.neednet=1 ip=dhcp quiet"}})
        )
    (root / IMAGE / "current").symlink_to(versions[-1])
    return root


def make_inventory(
    tmp_path: Path, *, store: Path, extra: dict[str, Any] | None = None, nodes: dict[str, str] = MACS
) -> Path:
    site = tmp_path / "site"
    (site / "group_vars").mkdir(parents=True, exist_ok=True)
    (site / "host_vars").mkdir(exist_ok=True)
    hosts = {"all": {"children": {"rack_r1": {"hosts": {name: None for name in nodes}}}}}
    (site / "hosts.yml").write_text(yaml.safe_dump(hosts))
    all_vars = {
        "provision_network": "10.99.0.0/24",
        "provision_gateway": "10.99.0.254",
        "provision_state_dir": str(tmp_path / "state"),
        "provision_default_image": IMAGE,
        "provision_image_store": str(store),
        "provision_bmc_user": "admin",
        "provision_boot_backend": "builtin",
        "provision_join_mode": "push",  # the join service has its own tests (test_join_service, the e2e)
        **(extra or {}),
    }
    (site / "group_vars" / "all.yml").write_text(yaml.safe_dump(all_vars))
    for index, (name, mac) in enumerate(sorted(nodes.items()), start=11):
        host_vars = {
            "provision_mac": mac,
            "provision_ip": f"10.99.0.{index}",
            "provision_bmc_address": f"127.0.0.{index}",
        }
        (site / "host_vars" / f"{name}.yml").write_text(yaml.safe_dump(host_vars))
    return site


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "store")


@pytest.fixture
def site_path(tmp_path: Path, store: Path) -> Path:
    return make_inventory(tmp_path, store=store)


def builtin_backend(site: Site) -> BuiltinBackend:
    backend = backend_for(site)
    assert isinstance(backend, BuiltinBackend)
    return backend


def backend_of(site_path: Path) -> BuiltinBackend:
    return builtin_backend(inventory.load(site_path))


def sync_site(site: Site, backend: BuiltinBackend, *, activate: bool) -> Prepared:
    """The backend's prepare without starting services: every node of the site."""
    return backend.prepare(site, site.nodes, PrepareOptions(activate=activate, serve=False))


def node_script(backend: BuiltinBackend, name: str) -> str:
    return (backend.docroot / "boot" / f"{mac_file_name(MACS[name])}.ipxe").read_text()


# --------------------------------------------------------------------------
# Rendering (fast)


TOKENS = {"provision_join_mode": "agent", "provision_join_trust": "token"}  # the opt-in token policy


def test_static_mode_renders_leases_scripts_and_links(tmp_path: Path, store: Path) -> None:
    site = inventory.load(make_inventory(tmp_path, store=store, extra=TOKENS))
    backend = builtin_backend(site)
    result = sync_site(site, backend, activate=False)
    assert result.hosts_written == ("node01", "node02")
    assert result.images == {IMAGE: f"{V2} (active)"}  # the first version seen is active at once

    hosts_file = (backend.conf_dir / "dnsmasq.hosts").read_text().splitlines()
    assert hosts_file == [f"{MACS['node01']},10.99.0.11,node01", f"{MACS['node02']},10.99.0.12,node02"]
    conf = backend.conf_file(Service.DNSMASQ).read_text()
    for line in (
        "port=0",
        "dhcp-range=set:provision,10.99.0.0,static,255.255.255.0,12h",
        f'dhcp-hostsfile="{backend.conf_dir / "dnsmasq.hosts"}"',  # every path quoted
        "dhcp-option=tag:provision,option:router,10.99.0.254",
        "dhcp-match=set:ipxe,175",
        "dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe,,10.99.0.1",
        "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi,,10.99.0.1",
        "dhcp-boot=tag:ipxe,http://10.99.0.1/boot.ipxe",
        f'log-facility="{backend.dnsmasq_log}"',
        "log-dhcp",
    ):
        assert line in conf.splitlines(), line
    assert "proxy" not in conf
    assert "enable-ra" not in conf  # router advertisements need provision_boot_interface (see the proxy test)
    nginx = backend.conf_file(Service.NGINX).read_text()
    assert "listen 10.99.0.1:80 reuseport;" in nginx and f'access_log "{backend.http_access_log}" provision;' in nginx
    assert "disable_symlinks on from=$document_root;" in nginx and "if_not_owner" not in nginx
    assert "location = /boot/52-54-00-99-00-11.ipxe { allow 10.99.0.11; deny all;" in nginx

    script = node_script(backend, "node01")
    tokens = json.loads(backend.tokens_path.read_text())
    base = f"http://10.99.0.1/images/{IMAGE}/{V2}"
    assert (
        f"kernel --name vmlinuz {base}/vmlinuz root=live:{base}/rootfs.squashfs rd.live.overlay.overlayfs=1" in script
    )
    assert (
        "rd.neednet=1 ip=dhcp BOOTIF=01-52-54-00-99-00-11 console=ttyS0,115200 rd.shell=0 rd.emergency=reboot panic=10"
        in script
    )
    assert f"initrd --name initrd.img {base}/initrd.img" in script
    assert "systemd.hostname=node01 provision.node=node01 provision.ip=10.99.0.11" in script
    assert "provision.join=http://10.99.0.1:8740 provision.token=" in script  # the join service, the token
    assert f"provision.token={tokens['node01']} quiet || goto failed" in script  # the image's extras come last
    assert script.count("rd.neednet=1") == 1 and script.count(" ip=dhcp") == 1  # ...without repeats
    assert tokens["node01"] != tokens["node02"] and len(tokens["node01"]) >= 32
    # Tokens: only in the 0600 token file and the node's own 0600 script.
    assert backend.tokens_path.stat().st_mode & 0o777 == 0o600
    # The node's script: root's, readable by nginx's unprivileged workers (their group), nobody else.
    script_stat = (backend.docroot / "boot" / f"{mac_file_name(MACS['node01'])}.ipxe").stat()
    assert script_stat.st_mode & 0o777 == 0o640 and script_stat.st_gid == grp.getgrnam(NGINX_GROUP).gr_gid
    for path in backend.root.rglob("*"):
        if path.is_file() and path.name not in ("tokens.json",) and not path.name.endswith(".ipxe"):
            assert tokens["node01"] not in path.read_text(errors="replace"), path
    # Images are hard links into the store (no copy, no symlink); the older version was not registered by serve.
    link = backend.docroot / "images" / IMAGE / V2 / "rootfs.squashfs"
    assert not link.is_symlink() and os.path.samefile(link, store / IMAGE / V2 / "rootfs.squashfs")
    assert not (backend.docroot / "images" / IMAGE / V1).exists()
    # Workers reach the web root, never the token file or the registry by listing.
    assert backend.root.stat().st_mode & 0o777 == 0o711
    assert sorted(os.listdir(backend.tftp_root)) == ["ipxe.efi", "snponly.efi", "undionly.kpxe"]
    assert (
        "chain --autofree http://10.99.0.1/boot/${net0/mac:hexhyp}.ipxe" in (backend.docroot / "boot.ipxe").read_text()
    )


def test_proxy_mode_renders_pxe_services_without_leases(tmp_path: Path, store: Path) -> None:
    site_path = make_inventory(
        tmp_path,
        store=store,
        extra={
            "provision_boot_dhcp_mode": "proxy",
            "provision_boot_uefi_loader": "snponly.efi",
            "provision_boot_interface": "eno1",
        },
    )
    backend = backend_of(site_path)
    sync_site(inventory.load(site_path), backend, activate=False)
    conf = backend.conf_file(Service.DNSMASQ).read_text().splitlines()
    assert "dhcp-range=set:provision,10.99.0.0,proxy,255.255.255.0" in conf
    assert "interface=eno1" in conf and "dhcp-range=::,constructor:eno1,ra-only" in conf
    assert 'pxe-service=tag:!ipxe,x86PC,"provision (iPXE, BIOS)",undionly.kpxe' in conf
    assert 'pxe-service=tag:!ipxe,X86-64_EFI,"provision (iPXE, UEFI)",snponly.efi' in conf
    assert 'pxe-service=tag:ipxe,x86PC,"provision (iPXE script)",http://10.99.0.1/boot.ipxe' in conf
    assert not any(line.startswith(("dhcp-boot", "dhcp-authoritative")) for line in conf)
    # Only the inventory's MACs get boot information (no addresses: the hosts file holds MACs and names).
    assert "dhcp-ignore=tag:!known" in conf
    assert (backend.conf_dir / "dnsmasq.hosts").read_text().splitlines() == [
        f"{MACS['node01']},node01",
        f"{MACS['node02']},node02",
    ]
    # A machine with no script of its own gives up after a bounded wait and leaves to the next boot device.
    generic = (backend.docroot / "boot.ipxe").read_text()
    assert generic.count("chain --autofree") == 3 and generic.count("sleep 10") == 2
    assert "exit 1" in generic and "goto chain" not in generic
    # Addresses come from another server: scripts cannot be pinned to them.
    assert "allow" not in backend.conf_file(Service.NGINX).read_text()
    # The per-node scripts still carry each node's identity.
    assert "provision.ip=10.99.0.12" in node_script(backend, "node02")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"provision_boot_dhcp_mode": "relay"}, "provision_boot_dhcp_mode: 'relay' is not a DHCP mode"),
        ({"provision_boot_http_port": "http"}, "provision_boot_http_port: 'http' is not a port"),
        ({"provision_boot_address": "10.98.0.1"}, "provision_boot_address: 10.98.0.1 is outside provision_network"),
        ({"provision_boot_uefi_loader": "grub.efi"}, "provision_boot_uefi_loader: 'grub.efi' is not known"),
        (
            {"provision_boot_router_advertisements": "maybe"},
            "provision_boot_router_advertisements: 'maybe' is not a boolean",
        ),
        ({"provision_network": "fd00::/64"}, "provision_network: must be an IPv4 subnet"),
        ({"provision_gateway": "10.99.0.1"}, "provision_boot_address: missing, and 10.99.0.1"),
    ],
)
def test_bad_settings_name_the_variable(extra: dict[str, Any], message: str) -> None:
    config = {"provision_state_dir": "/nonexistent", "provision_network": "10.99.0.0/24", **extra}
    with pytest.raises(BootError) as info:
        BuiltinConfig.from_vars(config)
    assert message in str(info.value) and info.value.hint


def test_invalid_inventory_writes_nothing(tmp_path: Path, store: Path) -> None:
    site_path = make_inventory(tmp_path, store=store, nodes={"node01": MACS["node01"], "node02": MACS["node01"]})
    site = inventory.load(site_path)
    with pytest.raises(ValidationError):
        sync_site(site, builtin_backend(site), activate=False)
    assert not (tmp_path / "state" / "boot" / "registry.json").exists()


def add_broken_rack(site_path: Path) -> None:
    """Rack r2 with node03, whose MAC is not a MAC: the inventory is invalid there only."""
    hosts = yaml.safe_load((site_path / "hosts.yml").read_text())
    hosts["all"]["children"]["rack_r2"] = {"hosts": {"node03": None}}
    (site_path / "hosts.yml").write_text(yaml.safe_dump(hosts))
    host_vars = {
        "provision_mac": "52:54:00:zz:00:13",
        "provision_ip": "10.99.0.13",
        "provision_bmc_address": "127.0.0.13",
    }
    (site_path / "host_vars" / "node03.yml").write_text(yaml.safe_dump(host_vars))


def test_a_broken_node_in_another_rack_does_not_block_this_one(site_path: Path) -> None:
    add_broken_rack(site_path)
    site = inventory.load(site_path)
    assert [p.node for p in site.problems] == ["node03"]
    # The CLI path: only rack r1 is checked and written.
    result = run_provision("-i", site_path, "node", "sync", "--rack", "r1", "--json")
    assert result.returncode == 0, result.stderr
    assert [h["name"] for h in json.loads(result.stdout)["hosts"]] == ["node01", "node02"]
    backend = builtin_backend(site)
    assert (backend.conf_dir / "dnsmasq.hosts").read_text().splitlines() == [
        f"{MACS['node01']},10.99.0.11,node01",
        f"{MACS['node02']},10.99.0.12,node02",
    ]
    # node boot --rack r1: its checks pass, and the backend's sync for r1 writes r1 only.
    r1 = site.select(rack="r1")
    NodeBoot(site, r1).check()
    synced = backend.prepare(site, r1, PrepareOptions(serve=False))
    assert synced.images == {IMAGE: f"{V2} (active)"}
    assert f"/images/{IMAGE}/{V2}/vmlinuz" in node_script(backend, "node01")
    assert [h.name for h in backend.list_hosts()] == ["node01", "node02"]
    # The whole site, or rack r2, is still refused, naming the broken node.
    for nodes in (site.nodes, site.select(rack="r2")):
        with pytest.raises(ValidationError) as info:
            backend.prepare(site, nodes, PrepareOptions(serve=False))
        assert [p.node for p in info.value.problems] == ["node03"]


def test_versions_activate_and_roll_back(site_path: Path, store: Path) -> None:
    backend = backend_of(site_path)
    sync_site(inventory.load(site_path), backend, activate=False)
    backend.add_store_version(store, IMAGE, V1)  # an older version: servable, not booted
    records, active = backend.versions(IMAGE)
    assert {r.version for r in records} == {V1, V2} and active == V2
    assert f"/images/{IMAGE}/{V2}/vmlinuz" in node_script(backend, "node01")

    backend.activate(IMAGE, V1)  # roll back
    assert f"/images/{IMAGE}/{V1}/vmlinuz" in node_script(backend, "node01")
    assert (backend.docroot / "images" / IMAGE / V2 / "rootfs.squashfs").exists()  # the newer one stays servable
    image = backend.get_image(IMAGE)
    assert image is not None and image.kernel == str((store / IMAGE / V1 / "vmlinuz").resolve())

    # A newly published version is servable but not booted until activated.
    v3 = "20260103-000000"
    make_store(tmp_path_v3 := store.parent / "other", versions=(v3,))
    (store / IMAGE / v3).symlink_to(tmp_path_v3 / IMAGE / v3, target_is_directory=True)
    (store / IMAGE / "current").unlink()
    (store / IMAGE / "current").symlink_to(v3)
    result = sync_site(inventory.load(site_path), backend, activate=False)
    assert result.images == {IMAGE: f"{v3} (servable; active {V1})"}
    assert f"/images/{IMAGE}/{V1}/" in node_script(backend, "node01")
    result = sync_site(inventory.load(site_path), backend, activate=True)
    assert result.images == {IMAGE: f"{v3} (active)"}
    assert f"/images/{IMAGE}/{v3}/" in node_script(backend, "node01")

    with pytest.raises(BootError, match="is not registered"):
        backend.activate(IMAGE, "20990101-000000")
    with pytest.raises(BootError, match="is active"):
        backend.remove_version(IMAGE, v3)
    assert backend.remove_version(IMAGE, V2)
    assert not (backend.docroot / "images" / IMAGE / V2).exists()


def test_nodes_pinned_to_another_version(site_path: Path, store: Path) -> None:
    """A rollout's pins: one node boots another version of its image; the rest keep the active one."""
    backend = backend_of(site_path)
    sync_site(inventory.load(site_path), backend, activate=True)
    backend.add_store_version(store, IMAGE, V1)
    assert backend.versions_of(IMAGE) == (tuple(sorted((V1, V2))), V2)
    assert backend.assign_version(["node01"], V1) == {"node01": V1}
    assert f"/images/{IMAGE}/{V1}/vmlinuz" in node_script(backend, "node01")
    assert f"/images/{IMAGE}/{V2}/vmlinuz" in node_script(backend, "node02")
    assert backend.next_versions(["node01", "node02"]) == {"node01": V1, "node02": V2}
    assert backend.summary()["pinned"] == {"node01": V1}
    # A pin survives another sync (it is run state) and keeps its version from removal.
    sync_site(inventory.load(site_path), backend, activate=True)
    assert f"/images/{IMAGE}/{V1}/vmlinuz" in node_script(backend, "node01")
    with pytest.raises(BootError, match="pinned for node01"):
        backend.remove_version(IMAGE, V1)
    with pytest.raises(BootError, match="is not registered"):
        backend.assign_version(["node02"], "20990101-000000")
    assert backend.next_versions(["node02"]) == {"node02": V2}  # a refused pin changes nothing
    assert backend.assign_version(["node01"], None) == {"node01": V2}  # back to the active version
    assert f"/images/{IMAGE}/{V2}/vmlinuz" in node_script(backend, "node01")
    assert backend.remove_version(IMAGE, V1)


def test_provision_flag_and_one_time_tokens(tmp_path: Path, store: Path) -> None:
    site_path = make_inventory(tmp_path, store=store, extra=TOKENS)
    backend = backend_of(site_path)
    sync_site(inventory.load(site_path), backend, activate=False)
    first = json.loads(backend.tokens_path.read_text())["node01"]
    assert backend.set_provision(["node01", "unknown01"], False) == ["node01"]
    script = node_script(backend, "node01")
    assert "exit 0" in script and "kernel" not in script and first not in script
    assert "node01" not in json.loads(backend.tokens_path.read_text())
    # serve keeps the operator's choice
    sync_site(inventory.load(site_path), backend, activate=False)
    assert backend.get_hosts(["node01"])[0].provision is False
    assert backend.set_provision(["node01"], True) == ["node01"]
    second = json.loads(backend.tokens_path.read_text())["node01"]
    assert second != first and f"provision.token={second}" in node_script(backend, "node01")
    assert not backend.rotate_token("node01", first)
    assert backend.rotate_token("node01", second)
    assert not backend.rotate_token("node01", second)  # one time only
    third = json.loads(backend.tokens_path.read_text())["node01"]
    assert third != second and f"provision.token={third}" in node_script(backend, "node01")  # for the next boot


def test_boot_backend_interface(tmp_path: Path, store: Path) -> None:
    config = {"provision_state_dir": str(tmp_path / "state"), "provision_network": "10.99.0.0/24"}
    backend = get_backend("builtin", config)
    assert isinstance(backend, BuiltinBackend) and isinstance(backend, BootBackend)
    vdir = store / IMAGE / V1
    backend.put_images(
        [
            BootImage(
                IMAGE,
                kernel=str(vdir / "vmlinuz"),
                initrds=(str(vdir / "initrd.img"),),
                squashfs=str(vdir / "rootfs.squashfs"),
            )
        ]
    )
    assert [i.name for i in backend.list_images()] == [IMAGE]
    with pytest.raises(BootError, match="does not exist"):
        backend.put_images([BootImage("other", kernel=str(tmp_path / "missing"))])
    host = BootHost(name="Node01", macs=("52-54-00-99-00-11",), ips=("10.99.0.11",), image=IMAGE)
    backend.put_hosts([host])
    again = BuiltinBackend.from_config(config)  # state persists across objects (and processes)
    assert again.get_hosts(["node01", "nope"]) == [
        BootHost(name="node01", macs=(MACS["node01"],), ips=("10.99.0.11/32",), image=IMAGE)
    ]
    with pytest.raises(BootError, match="already belongs to node01"):
        again.put_hosts([BootHost(name="node02", macs=(MACS["node01"],), ips=("10.99.0.12",))])
    with pytest.raises(BootError, match="outside provision_network"):
        again.put_hosts([BootHost(name="node03", macs=("52:54:00:99:00:13",), ips=("10.1.0.12",))])
    assert again.remove_hosts(["node01", "ghost"]) == ["node01"]
    assert again.remove_hosts(["node01"]) == []
    assert list((again.docroot / "boot").iterdir()) == []
    assert again.remove_images([IMAGE, "ghost"]) == [IMAGE] and again.list_images() == []
    with pytest.raises(BootError, match="not running"):
        again.ping()


def test_boot_commands_drive_the_sites_backend_whichever_it_is(tmp_path: Path, store: Path) -> None:
    """`provision boot` goes through BootBackend: with Grendel, serve syncs and checks it, stop has nothing to stop."""
    with FakeGrendel("classic") as fake:
        site_path = make_inventory(tmp_path, store=store,
                                   extra={"provision_boot_backend": "grendel", "provision_grendel_url": fake.url})  # fmt: skip
        pushed = run_provision("-i", site_path, "grendel", "push-images", "--all")
        assert pushed.returncode == 0 and f"registered 1 images at {fake.url}: {IMAGE}" in pushed.stdout, pushed.stderr
        served = run_provision("-i", site_path, "boot", "serve", "--json")
        assert served.returncode == 0, served.stderr
        report = json.loads(served.stdout)
        assert report["backend"] == "grendel" and report["services"][0]["running"] is True
        assert report["sync"]["hosts_written"] == ["node01", "node02"]
        assert report["sync"]["images"] == {IMAGE: "registered"}
        assert sorted(fake.hosts) == ["node01", "node02"]
        stopped = run_provision("-i", site_path, "boot", "stop")
        assert stopped.returncode == 0 and "nothing was running" in stopped.stdout
        events = run_provision("-i", site_path, "boot", "events", "--json")
        assert events.returncode == 0 and json.loads(events.stdout) == {"boot": {}, "join": []}
    assert fake.violations == []
    assert not (tmp_path / "state" / "boot").exists()  # nothing of the built-in backend was made


# --------------------------------------------------------------------------
# Real services in a network namespace (integration)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[str]:
    name = f"prov-b{os.getpid()}-{next(_ns_counter)}"
    ns = Netns(name, record=tmp_path / "netns.json")
    ns.create()
    ns.add_bridge("br0", addresses=("10.99.0.1/24", "fd99::1/64"))
    try:
        yield name
    finally:
        ns.teardown()


def service_pids(conf_dir: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names one of our configs."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(conf_dir) in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def wait_for_text(path: Path, text: str, timeout: float = 10.0) -> bool:
    """dnsmasq writes its log asynchronously: a line may land shortly after it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def live_pids_in(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout
    alive = []
    for pid in out.split():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(int(pid))
        except OSError:
            continue
    return alive


def provision_cli(site_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process: services must outlive it."""
    return subprocess.run(
        [sys.executable, "-m", "provision", "-i", str(site_path), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
def test_serve_and_stop_are_idempotent_in_a_netns(tmp_path: Path, store: Path, netns: str) -> None:
    site_path = make_inventory(
        tmp_path, store=store, extra={"provision_boot_netns": netns, "provision_boot_interface": "br0"}
    )
    backend = backend_of(site_path)
    try:
        first = provision_cli(site_path, "boot", "serve")
        assert first.returncode == 0, first.stderr
        status = json.loads(provision_cli(site_path, "boot", "status", "--json").stdout)
        pids = {s["service"]: s["pid"] for s in status["services"]}
        assert all(s["running"] for s in status["services"]) and status["hosts"] == 2
        assert sorted(service_pids(backend.conf_dir)) >= sorted(pids.values())
        assert set(in_ns(netns, "ip", "netns", "identify", str(pids["nginx"])).stdout.split()) == {netns}

        again = provision_cli(site_path, "boot", "serve")  # idempotent: same processes
        assert again.returncode == 0, again.stderr
        assert {str(s.service): s.pid for s in backend.status()} == pids

        # HTTP and TFTP answer inside the namespace.
        assert in_ns(netns, "curl", "-fsS", "http://10.99.0.1/boot.ipxe").stdout.startswith("#!ipxe")
        # A node's script (it carries its token) is served to the node's own address only.
        node02_url = f"http://10.99.0.1/boot/{mac_file_name(MACS['node02'])}.ipxe"
        in_ns(netns, "ip", "addr", "add", "10.99.0.12/24", "dev", "br0")
        script = in_ns(netns, "curl", "-fsS", "--interface", "10.99.0.12", node02_url).stdout
        assert "provision.node=node02" in script
        denied = in_ns(netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", node02_url).stdout
        assert denied == "403"
        (backend.docroot / "boot" / ".half-written.tmp").write_text("secret")
        hidden = in_ns(
            netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://10.99.0.1/boot/.half-written.tmp"
        )
        assert hidden.stdout == "404"
        report = json.loads(provision_cli(site_path, "boot", "events", "--json").stdout)["boot"]
        assert [e["phase"] for e in report["node02"]] == ["node-script"]  # matched by the MAC in its path
        assert report["node02"][0]["ip"] == "10.99.0.12"
        assert (
            in_ns(
                netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://10.99.0.1/conf/nginx.conf"
            ).stdout
            == "404"
        )
        tftp = tmp_path / "undionly.kpxe"
        in_ns(netns, "curl", "-fsS", "-o", str(tftp), "tftp://10.99.0.1/undionly.kpxe")
        assert tftp.read_bytes() == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        assert wait_for_text(backend.dnsmasq_log, "undionly.kpxe to 10.99.0.1")  # TFTP transfer logged
        # IPv6 router advertisements on the bridge, so that iPXE does not wait for a router.
        assert wait_for_text(backend.dnsmasq_log, "router advertisement on fd99::, constructed for br0")

        # A new node: dnsmasq re-reads its leases (SIGHUP), nothing restarts.
        make_inventory(tmp_path, store=store, extra={"provision_boot_netns": netns, "provision_boot_interface": "br0"},
                       nodes={**MACS, "node03": "52:54:00:99:00:13"})  # fmt: skip
        third = provision_cli(site_path, "boot", "serve")
        assert third.returncode == 0, third.stderr
        assert {str(s.service): s.pid for s in backend.status()} == pids
        assert "node03" in (backend.conf_dir / "dnsmasq.hosts").read_text()

        stopped = provision_cli(site_path, "boot", "stop")
        assert stopped.returncode == 0 and "stopped dnsmasq, nginx" in stopped.stdout
        assert service_pids(backend.conf_dir) == []
        assert live_pids_in(netns) == []
        assert "nothing was running" in provision_cli(site_path, "boot", "stop").stdout
        assert not backend.pid_file(Service.NGINX).exists() and not backend.pid_file(Service.DNSMASQ).exists()
    finally:
        backend.stop()


@pytest.mark.integration
def test_node_boot_prepares_rack_r1_beside_a_broken_rack_r2(tmp_path: Path, store: Path, netns: str) -> None:
    """node boot's check and sync steps for r1: the backend serves r1 although node03 in r2 is broken."""
    site_path = make_inventory(
        tmp_path, store=store, extra={"provision_boot_netns": netns, "provision_boot_interface": "br0"}
    )
    add_broken_rack(site_path)
    site = inventory.load(site_path)
    run = NodeBoot(site, site.select(rack="r1"))
    backend = builtin_backend(site)
    try:
        run.check()
        run.sync()
        assert all(s.running for s in backend.status())
        assert "node03" not in (backend.conf_dir / "dnsmasq.hosts").read_text()
        script = in_ns(netns, "curl", "-fsS", "--interface", "10.99.0.1", "http://10.99.0.1/boot.ipxe").stdout
        assert script.startswith("#!ipxe")
        in_ns(netns, "ip", "addr", "add", "10.99.0.11/24", "dev", "br0")
        url = f"http://10.99.0.1/boot/{mac_file_name(MACS['node01'])}.ipxe"
        node01 = in_ns(netns, "curl", "-fsS", "--interface", "10.99.0.11", url).stdout
        assert f"/images/{IMAGE}/{V2}/vmlinuz" in node01 and "provision.node=node01" in node01
    finally:
        backend.stop()
    assert service_pids(backend.conf_dir) == []


@pytest.mark.integration
def test_serve_reports_a_port_in_use(tmp_path: Path, store: Path, netns: str) -> None:
    site_path = make_inventory(
        tmp_path, store=store, extra={"provision_boot_netns": netns, "provision_boot_http_port": 8080}
    )
    blocker = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                                "s.bind(('10.99.0.1', 8080)); s.listen(); time.sleep(60)"])  # fmt: skip
    backend = backend_of(site_path)
    try:
        in_ns(netns, "sh", "-c", "for i in $(seq 50); do ss -ltn | grep -q 8080 && exit 0; sleep 0.1; done; exit 1")
        result = provision_cli(site_path, "boot", "serve")
        assert result.returncode == 1
        assert (
            "error: nginx did not start: bind() to 10.99.0.1:8080 failed (98: Address already in use)" in result.stderr
        )
        assert "hint: is port 8080 on 10.99.0.1 in use" in result.stderr
        assert service_pids(backend.conf_dir) == []  # dnsmasq was not left running either
        assert not any(s.running for s in backend.status())
    finally:
        blocker.kill()
        blocker.wait()
        backend.stop()
    assert service_pids(backend.conf_dir) == []


@pytest.mark.integration
def test_range_requests_and_32_concurrent_downloads(tmp_path: Path, netns: str) -> None:
    size = 24 * 1024 * 1024
    store = make_store(tmp_path / "store", versions=(V1,), squashfs_size=size)
    config = {
        "provision_state_dir": str(tmp_path / "state"),
        "provision_network": "10.99.0.0/24",
        "provision_boot_netns": netns,
        "provision_boot_interface": "br0",
    }
    backend = BuiltinBackend.from_config(config)
    backend.add_store_version(store, IMAGE)
    payload = (store / IMAGE / V1 / "rootfs.squashfs").read_bytes()
    url = f"http://10.99.0.1/images/{IMAGE}/{V1}/rootfs.squashfs"
    try:
        backend.serve()
        # Range requests: a middle slice, a suffix, and an open-ended tail.
        for spec, expected in (
            ("1000-1999", payload[1000:2000]),
            ("-512", payload[-512:]),
            (f"{size - 100}-", payload[-100:]),
        ):
            out = tmp_path / "part"
            code = in_ns(netns, "curl", "-sS", "-r", spec, "-o", str(out), "-w", "%{http_code}", url).stdout
            assert code == "206" and out.read_bytes() == expected, spec
        # 32 clients at once, each held to 16 MiB/s so that a server that serialised them would show it.
        downloads = tmp_path / "dl"
        downloads.mkdir()
        in_ns(
            netns, "sh", "-c", f"for i in $(seq 32); do curl -sS --limit-rate 16M -o {downloads}/$i {url} & done; wait"
        )
        digest = hashlib.sha256(payload).hexdigest()
        assert sorted(int(p.name) for p in downloads.iterdir()) == list(range(1, 33))
        assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in downloads.iterdir()} == {digest}
        # From nginx's access log: the 32 downloads were in flight at the same time.
        lines = [
            line
            for line in backend.http_access_log.read_text().splitlines()
            if f"GET /images/{IMAGE}/{V1}/rootfs.squashfs" in line and '" 200 ' in line
        ]
        assert len(lines) == 32
        spans = [(float(line.split()[0]) - float(line.split()[-2]), float(line.split()[0])) for line in lines]
        overlap = max(sum(1 for start, end in spans if start <= t < end) for t, _ in spans)
        assert overlap >= 24, f"only {overlap} downloads overlapped"
    finally:
        backend.stop()
    assert service_pids(backend.conf_dir) == []


def test_authorized_keys_are_served_and_private_keys_refused(tmp_path: Path, store: Path) -> None:
    public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq0dXJ0bGVzYWxsdGhld2F5ZG93bnR1cnRsZXNhbGw admin@site"
    site = inventory.load(make_inventory(tmp_path, store=store, extra={"provision_ssh_authorized_keys": [public]}))
    backend = builtin_backend(site)
    sync_site(site, backend, activate=True)
    served = backend.docroot / "ssh" / "authorized_keys"
    assert served.read_text() == public + "\n" and served.stat().st_mode & 0o777 == 0o644
    assert "location = /ssh/authorized_keys" in backend.conf_file(Service.NGINX).read_text()
    script = node_script(backend, "node01")
    assert f"provision.server={backend.config.base_url}" in script  # where the node fetches them
    for bad, message in (
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "provision_ssh_authorized_keys[0]: is a private key"),
        ("ssh-ed25519", "provision_ssh_authorized_keys[0]: not an OpenSSH public key line"),
    ):
        with pytest.raises(BootError) as info:
            BuiltinConfig.from_vars({"provision_state_dir": "/x", "provision_network": "10.99.0.0/24",
                                     "provision_ssh_authorized_keys": [bad]})  # fmt: skip
        assert str(info.value) == message and info.value.hint


# --------------------------------------------------------------------------
# Privileges, symlinks, proxy-DHCP allowlist, paths with spaces (integration)


def proc_uid(pid: int) -> int:
    """The real uid of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def http_code(netns: str, url: str) -> str:
    return in_ns(netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url).stdout


@pytest.mark.integration
def test_workers_unprivileged_symlinks_refused_and_a_path_with_a_space(tmp_path: Path, netns: str) -> None:
    """dnsmasq and nginx's workers are not root; a planted symlink is not followed; "state dir" works."""
    spaced = tmp_path / "site data"
    store = make_store(spaced / "image store")
    site_path = make_inventory(spaced, store=store,
                               extra={"provision_boot_netns": netns, "provision_boot_interface": "br0",
                                      "provision_state_dir": str(spaced / "state dir")})  # fmt: skip
    backend = backend_of(site_path)
    assert " " in str(backend.root)
    try:
        served = provision_cli(site_path, "boot", "serve")
        assert served.returncode == 0, served.stderr
        pids = {str(s.service): s.pid for s in backend.status()}
        assert pids["dnsmasq"] and pids["nginx"]
        # dnsmasq drops to an unprivileged user after binding; nginx's master stays root, its workers do not.
        assert proc_uid(pids["dnsmasq"]) != 0
        workers = children(pids["nginx"])
        assert workers and all(proc_uid(w) != 0 for w in workers), workers
        ps = subprocess.run(["ps", "-o", "user=,args=", "-p", ",".join(map(str, [pids["dnsmasq"], *workers]))],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert ps.strip() and not any(line.split()[0] == "root" for line in ps.splitlines()), ps

        # Files under the path with spaces are served, over HTTP and TFTP (read by the unprivileged user).
        base = f"http://10.99.0.1/images/{IMAGE}/{V2}"
        out = tmp_path / "rootfs"
        in_ns(netns, "curl", "-fsS", "-o", str(out), f"{base}/rootfs.squashfs")
        assert out.read_bytes() == (store / IMAGE / V2 / "rootfs.squashfs").read_bytes()
        assert in_ns(netns, "curl", "-fsS", "http://10.99.0.1/boot.ipxe").stdout.startswith("#!ipxe")
        in_ns(netns, "curl", "-fsS", "-o", str(tmp_path / "ipxe"), "tftp://10.99.0.1/undionly.kpxe")

        # Symlinks planted in the web root, pointing outside it, are not followed (the image files are hard links).
        vdir = backend.docroot / "images" / IMAGE / V2
        (vdir / "passwd").symlink_to("/etc/passwd")
        (vdir / "tokens").symlink_to(backend.tokens_path)
        (backend.docroot / "images" / "outside").symlink_to("/etc", target_is_directory=True)
        assert http_code(netns, f"{base}/passwd") in ("403", "404")
        assert http_code(netns, f"{base}/tokens") in ("403", "404")
        assert http_code(netns, "http://10.99.0.1/images/outside/passwd") in ("403", "404")
        assert http_code(netns, f"{base}/vmlinuz") == "200"
        # The workers' user cannot read the token file or list the state directory.
        nginx_user = ServiceUser.pick("www-data", "nginx").name
        probe = subprocess.run(["runuser", "-u", nginx_user, "--", "cat", str(backend.tokens_path)],
                               capture_output=True, text=True)  # fmt: skip
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
    finally:
        backend.stop()


DHCP_CLIENT = r"""
import random, socket, struct, sys
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
xid = random.getrandbits(32)
opts = (b"\x35\x01\x01" + b"\x3c\x20PXEClient:Arch:00000:UNDI:002001" + b"\x5d\x02\x00\x00"
        + b"\x5e\x03\x01\x02\x01" + b"\x61\x11\x00" + bytes(range(16)) + b"\x37\x05\x01\x03\x2b\x3c\x43" + b"\xff")
packet = (struct.pack("!BBBBIHHIIII", 1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0) + mac + b"\0" * 10
          + b"\0" * 192 + b"\x63\x82\x53\x63" + opts)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
s.settimeout(1.5)
for _ in range(3):
    s.sendto(packet, ("255.255.255.255", 67))
    try:
        while True:
            data, peer = s.recvfrom(2048)
            if len(data) > 240 and data[0] == 2 and struct.unpack("!I", data[4:8])[0] == xid:
                print("offer", peer[0], b"PXEClient" in data[240:])
                sys.exit(0)
    except socket.timeout:
        continue
print("none")
"""


@pytest.fixture
def client_netns(netns: str) -> Iterator[str]:
    """A second namespace on the boot server's bridge (veth), where a DHCP client runs."""
    name = f"{netns}-c"
    peer = f"pc{os.getpid() % 100000}{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                        "netns", name], check=True)  # fmt: skip
        in_ns(netns, "ip", "link", "set", peer, "master", "br0", "up")
        in_ns(name, "ip", "link", "set", "eth0", "up")
        in_ns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def dhcp_discover(netns: str, mac: str) -> str:
    return in_ns(netns, sys.executable, "-c", DHCP_CLIENT, mac).stdout.strip()


@pytest.mark.integration
@pytest.mark.parametrize("proxy_any", [False, True], ids=["inventory-only", "proxy-any"])
def test_proxy_mode_answers_only_the_inventorys_macs(
    tmp_path: Path, store: Path, netns: str, client_netns: str, proxy_any: bool
) -> None:
    extra: dict[str, Any] = {"provision_boot_netns": netns, "provision_boot_interface": "br0",
                             "provision_boot_dhcp_mode": "proxy", "provision_boot_router_advertisements": False}  # fmt: skip
    if proxy_any:
        extra["provision_boot_proxy_any"] = True
    site_path = make_inventory(tmp_path, store=store, extra=extra)
    backend = backend_of(site_path)
    try:
        served = provision_cli(site_path, "boot", "serve")
        assert served.returncode == 0, served.stderr
        assert dhcp_discover(client_netns, MACS["node01"]) == "offer 10.99.0.1 True"
        unknown = dhcp_discover(client_netns, "52:54:00:99:00:99")
        assert unknown == ("offer 10.99.0.1 True" if proxy_any else "none")
    finally:
        backend.stop()

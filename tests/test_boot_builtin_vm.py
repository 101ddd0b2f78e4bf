"""A QEMU machine PXE-boots through the built-in backend to its login prompt.

DHCP (dnsmasq, static lease) → the NIC's iPXE ROM chains http://…/boot.ipxe →
its own /boot/<mac>.ipxe → kernel + initrd over HTTP → dracut's livenet
fetches the squashfs over HTTP → systemd → ``node01 login:`` on ttyS0.
Everything runs in a network namespace created here (10.99.0.0/24 inside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from provision.boot.base import BootHost
from provision.boot.builtin import BuiltinBackend
from provision.boot.events import Client, Phase, by_node, first_times, read_events
from provision.lab.netns import Netns
from provision.lab.vm import BootFrom, Machine, MachineSpec, Nic
from provision.proc import spawn

pytestmark = pytest.mark.vm

MAC = "52:54:00:99:00:21"
LOGIN_TIMEOUT = 600  # a hang guard: ~55-75 s under TCG when idle, 310 s seen on a loaded 2-core machine


@pytest.fixture(scope="session")
def boot_image(request: pytest.FixtureRequest) -> tuple[Path, str, str]:
    """(store, image name, version) of the image built by `provision image build` (the base_image fixture).

    PROVISION_TEST_BOOT_STORE=<store>/<name>/<version> boots an already published
    version instead (to iterate on the boot path without rebuilding the image).
    """
    local = os.environ.get("PROVISION_TEST_BOOT_STORE")
    if local:
        version_dir = Path(local)
        return version_dir.parent.parent, version_dir.parent.name, version_dir.name
    image: Any = request.getfixturevalue("base_image")
    return Path(image.path).parent.parent, str(image.name), str(image.version)


def test_pxe_boot_to_login_through_builtin_backend(tmp_path: Path, boot_image: tuple[Path, str, str]) -> None:
    store, name, version = boot_image
    ns_name = f"prov-vm{os.getpid()}"
    ns = Netns(ns_name, record=tmp_path / "netns.json")
    backend = BuiltinBackend.from_config(
        {
            "provision_state_dir": str(tmp_path / "state"),
            "provision_network": "10.99.0.0/24",
            "provision_boot_netns": ns_name,
            "provision_boot_interface": "br0",
        }
    )
    machine = Machine(
        MachineSpec(
            name="node01",
            workdir=tmp_path / "vm",
            nics=(Nic(MAC, tap="tap0"),),
            netns=ns_name,
            boot=BootFrom.NETWORK,
        )
    )
    try:
        ns.create()
        ns.add_bridge("br0", addresses=("10.99.0.1/24", "fd99::1/64"))
        ns.add_tap("tap0", bridge="br0")
        backend.add_store_version(store, name, version, activate=True)
        backend.put_hosts([BootHost(name="node01", macs=(MAC,), ips=("10.99.0.21/24",), image=name)])
        backend.serve()
        machine.start()
        waited = machine.wait_for_console(r"node01 login:", LOGIN_TIMEOUT)
        print(f"node01 reached its login prompt {waited:.1f} s after power on")

        timeline = read_events(backend.dnsmasq_log, backend.http_access_log, backend.list_hosts())
        events = by_node(timeline)["node01"]
        first = first_times(events)
        order = [Phase.DHCP_ACK, Phase.IPXE_SCRIPT, Phase.NODE_SCRIPT, Phase.KERNEL, Phase.INITRD, Phase.ROOTFS]
        assert all(p in first for p in order), sorted(first)
        assert [first[p] for p in order] == sorted(first[p] for p in order)
        # The firmware's iPXE took the first lease; the initramfs asked again before fetching the squashfs.
        acks = [e for e in events if e.phase is Phase.DHCP_ACK]
        assert acks[0].client is Client.IPXE and acks[0].ip == "10.99.0.21"
        assert any(a.client is Client.OS and first[Phase.KERNEL] <= a.time <= first[Phase.ROOTFS] for a in acks)
        rootfs = next(e for e in events if e.phase is Phase.ROOTFS)
        assert f"/images/{name}/{version}/rootfs.squashfs" in rootfs.detail
        # The node got its identity; under the default (console) join policy no boot token exists at all.
        console = machine.console()
        assert "provision.node=node01" in console and "provision.ip=10.99.0.21" in console
        assert "provision.token=" not in console and json.loads(backend.tokens_path.read_text()) == {}
    finally:
        machine.stop()
        backend.stop()
        ns.teardown()
    assert not ns.exists()


def test_proxy_dhcp_beside_another_dhcp_server(tmp_path: Path, boot_image: tuple[Path, str, str]) -> None:
    """The site's DHCP server hands out the address; the backend in proxy mode only adds the boot information."""
    store, name, version = boot_image
    ns_name = f"prov-px{os.getpid()}"
    mac = "52:54:00:99:00:22"
    ns = Netns(ns_name, record=tmp_path / "netns.json")
    backend = BuiltinBackend.from_config(
        {
            "provision_state_dir": str(tmp_path / "state"),
            "provision_network": "10.99.0.0/24",
            "provision_boot_netns": ns_name,
            "provision_boot_interface": "br0",
            "provision_boot_dhcp_mode": "proxy",
        }
    )
    machine = Machine(MachineSpec(name="node02", workdir=tmp_path / "vm", nics=(Nic(mac, tap="tap0"),), netns=ns_name))
    site_dhcp_log = tmp_path / "site-dhcp.log"
    site_dhcp = None
    try:
        ns.create()
        ns.add_bridge("br0", addresses=("10.99.0.1/24", "fd99::1/64"))
        ns.add_tap("tap0", bridge="br0")
        # The site's own DHCP server: addresses from a pool, no PXE options at all.
        site_dhcp = spawn(
            ns.exec_argv(
                ["dnsmasq", "--keep-in-foreground", "--port=0", "--interface=br0", "--bind-interfaces",
                 "--dhcp-range=10.99.0.100,10.99.0.150,1h", f"--dhcp-leasefile={tmp_path / 'site.leases'}",
                 f"--log-facility={site_dhcp_log}", "--log-dhcp", f"--pid-file={tmp_path / 'site.pid'}"]
            ),
            log_path=tmp_path / "site-dhcp.out",
        )  # fmt: skip
        backend.add_store_version(store, name, version, activate=True)
        backend.put_hosts([BootHost(name="node02", macs=(mac,), image=name)])
        backend.serve()
        machine.start()
        machine.wait_for_console(r"Linux version", 300)  # kernel and initrd came over HTTP

        site_log = site_dhcp_log.read_text()
        assert "DHCPACK(br0) 10.99.0.1" in site_log and mac in site_log  # the address came from the site server
        assert "option: 67" not in site_log  # and no boot file name
        events = by_node(read_events(backend.dnsmasq_log, backend.http_access_log, backend.list_hosts()))["node02"]
        first = first_times(events)
        assert [first[p] for p in (Phase.IPXE_SCRIPT, Phase.NODE_SCRIPT, Phase.KERNEL, Phase.INITRD)] == sorted(
            first[p] for p in (Phase.IPXE_SCRIPT, Phase.NODE_SCRIPT, Phase.KERNEL, Phase.INITRD)
        )
        kernel = next(e for e in events if e.phase is Phase.KERNEL)
        assert kernel.ip is not None and kernel.ip.startswith("10.99.0.1") and kernel.ip != "10.99.0.1"
        assert Phase.DHCP_ACK not in first  # the backend handed out no address...
        proxy = [e for e in events if e.phase is Phase.DHCP_PROXY]  # ...only the boot information
        assert proxy and any(e.detail == "http://10.99.0.1/boot.ipxe" for e in proxy)
        assert "provision.node=node02" in machine.console()
    finally:
        machine.stop()
        if site_dhcp is not None:
            site_dhcp.kill()
            site_dhcp.wait()
        backend.stop()
        ns.teardown()

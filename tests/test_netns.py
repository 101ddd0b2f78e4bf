"""provision.lab.netns: namespaces, bridges and taps, removed exactly and idempotently (needs root)."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from provision.lab.netns import Netns, NetnsError
from provision.proc import netns_exists

pytestmark = pytest.mark.integration
_counter = itertools.count()


def _name() -> str:
    return f"prov-t{os.getpid()}-{next(_counter)}"


def _ns_links(name: str) -> set[str]:
    out = subprocess.run(["ip", "-n", name, "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_create_bridge_tap_and_teardown_twice(tmp_path: Path) -> None:
    name = _name()
    record = tmp_path / "netns.json"
    ns = Netns(name, record=record)
    try:
        ns.create()
        ns.add_bridge("br0", addresses=("10.99.0.1/24", "fd99::1/64"))
        ns.add_tap("tap0", bridge="br0")
        ns.add_tap("tap1", bridge="br0")
        # Idempotent: adding again changes nothing and does not fail.
        ns.add_bridge("br0", addresses=("10.99.0.1/24",))
        ns.add_tap("tap0", bridge="br0")
        assert netns_exists(name)
        assert {"lo", "br0", "tap0", "tap1"} <= _ns_links(name)
        addrs = subprocess.run(
            ["ip", "-n", name, "-o", "addr", "show", "dev", "br0"], capture_output=True, text=True
        ).stdout
        assert "10.99.0.1/24" in addrs and "fd99::1/64" in addrs
        master = subprocess.run(["ip", "-n", name, "-o", "link", "show", "tap0"], capture_output=True, text=True).stdout
        assert "master br0" in master
        # The host's interfaces are untouched: nothing of ours outside the namespace.
        host = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert "tap0" not in host and " br0" not in host
        assert ns.created == ("tap:tap0", "tap:tap1", "bridge:br0", f"netns:{name}")
        assert record.exists()
    finally:
        # A fresh object that only knows the record file tears down what the first one made.
        removed = Netns(name, record=record).teardown()
    assert removed == ["tap:tap0", "tap:tap1", "bridge:br0", f"netns:{name}"]
    assert not netns_exists(name)
    assert not record.exists()
    assert Netns(name, record=record).teardown() == []  # twice: nothing left, no error


def test_teardown_keeps_a_namespace_it_did_not_create(tmp_path: Path) -> None:
    name = _name()
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ns = Netns(name, record=tmp_path / "r.json")
        ns.create()
        ns.add_tap("tap9")
        subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", "other7", "mode", "tap"], check=True)
        assert ns.teardown() == ["tap:tap9"]
        assert netns_exists(name)
        assert "other7" in _ns_links(name) and "tap9" not in _ns_links(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_bad_names_and_addresses() -> None:
    with pytest.raises(NetnsError, match="namespace name"):
        Netns("bad name")
    ns = Netns(_name())
    with pytest.raises(NetnsError, match="not a valid interface name"):
        ns.add_tap("a-very-long-tap-name-0")
    with pytest.raises(NetnsError, match="not an address"):
        ns.add_bridge("br0", addresses=("10.99.0.300/24",))
    assert not ns.exists()

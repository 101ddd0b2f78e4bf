"""provision.boot.events on log lines captured from a real PXE boot through the built-in backend.

The lines below were written by dnsmasq 2.90 (log-dhcp) and nginx 1.22 (the
``provision`` log format) while a QEMU machine booted to its login prompt
(state directory renamed to /var/lib/provision).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from provision.boot.base import BootHost
from provision.boot.events import Client, Phase, by_node, first_times, merge, parse_dnsmasq, parse_http, read_events

DNSMASQ_LOG = """\
Nov 22 05:53:41 dnsmasq[27609]: started, version 2.90 DNS disabled
Nov 22 05:53:41 dnsmasq-tftp[27609]: sent /var/lib/provision/boot/tftp/undionly.kpxe to 10.99.0.1
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 vendor class: PXEClient:Arch:00000:UNDI:002001
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 user class: iPXE
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 DHCPDISCOVER(br0) 52:54:00:99:00:11
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 tags: provision, known, ipxe, br0
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 DHCPOFFER(br0) 10.99.0.11 52:54:00:99:00:11
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 requested options: 66:tftp-server, 67:bootfile-name, 119:domain-search,
Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 sent size: 27 option: 67 bootfile-name  http://10.99.0.1/boot.ipxe
Nov 22 05:53:55 dnsmasq-dhcp[27609]: RTR-SOLICIT(br0) 52:54:00:99:00:11
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 vendor class: PXEClient:Arch:00000:UNDI:002001
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 user class: iPXE
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 DHCPDISCOVER(br0) 52:54:00:99:00:11
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 tags: provision, known, ipxe, br0
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 DHCPOFFER(br0) 10.99.0.11 52:54:00:99:00:11
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 requested options: 66:tftp-server, 67:bootfile-name, 119:domain-search,
Nov 22 05:53:56 dnsmasq-dhcp[27609]: 376350788 sent size: 27 option: 67 bootfile-name  http://10.99.0.1/boot.ipxe
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 vendor class: PXEClient:Arch:00000:UNDI:002001
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 user class: iPXE
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 DHCPREQUEST(br0) 10.99.0.11 52:54:00:99:00:11
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 tags: provision, known, ipxe, br0
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 DHCPACK(br0) 10.99.0.11 52:54:00:99:00:11 node01
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 requested options: 66:tftp-server, 67:bootfile-name, 119:domain-search,
Nov 22 05:53:59 dnsmasq-dhcp[27609]: 376350788 sent size: 27 option: 67 bootfile-name  http://10.99.0.1/boot.ipxe
Nov 22 05:54:31 dnsmasq-dhcp[27609]: RTR-SOLICIT(br0) 52:54:00:99:00:11
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 DHCPDISCOVER(br0) 52:54:00:99:00:11
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 tags: provision, known, br0
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 DHCPOFFER(br0) 10.99.0.11 52:54:00:99:00:11
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 DHCPREQUEST(br0) 10.99.0.11 52:54:00:99:00:11
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 tags: provision, known, br0
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 DHCPACK(br0) 10.99.0.11 52:54:00:99:00:11 node01
Nov 22 05:54:32 dnsmasq-dhcp[27609]: 310928968 requested options: 1:netmask, 28:broadcast, 2:time-offset, 3:router,
"""

HTTP_LOG = """\
1795326821.724 10.99.0.1 "GET /boot.ipxe HTTP/1.1" 200 371 0.000 "curl/7.88.1"
1795326839.111 10.99.0.11 "GET /boot.ipxe HTTP/1.1" 200 371 0.000 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795326839.138 10.99.0.11 "GET /boot/52-54-00-99-00-11.ipxe HTTP/1.1" 200 817 0.000 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795326839.783 10.99.0.11 "GET /images/testimg/v1/vmlinuz HTTP/1.1" 200 8222656 0.630 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795326842.522 10.99.0.11 "GET /images/testimg/v1/initrd.img HTTP/1.1" 200 37899866 2.674 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795326881.287 10.99.0.11 "GET /images/testimg/v1/rootfs.squashfs HTTP/1.1" 200 160567296 1.978 "curl/7.88.1"
1795326900.000 10.99.0.11 "GET /images/testimg/v1/rootfs.squashfs HTTP/1.1" 404 153 0.000 "curl/7.88.1"
garbage line that is not a request
"""

NOW = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
HOST = BootHost(name="node01", macs=("52:54:00:99:00:11",), ips=("10.99.0.11/24",))
MAC = "52:54:00:99:00:11"


def test_dnsmasq_dhcp_phases_and_clients() -> None:
    events = parse_dnsmasq(DNSMASQ_LOG.splitlines(), now=NOW)
    acks = [e for e in events if e.phase is Phase.DHCP_ACK]
    assert [(e.mac, e.ip, e.node, e.client) for e in acks] == [
        (MAC, "10.99.0.11", "node01", Client.IPXE),  # the NIC's iPXE ROM
        (MAC, "10.99.0.11", "node01", Client.OS),  # the kernel's initramfs (ip=dhcp)
    ]
    assert acks[0].time == datetime(2026, 11, 22, 5, 53, 59).astimezone()
    assert [e.phase for e in events if e.mac == MAC][:2] == [Phase.DHCP_DISCOVER, Phase.DHCP_OFFER]
    # Requests are not events of their own; router solicitations and option dumps are ignored.
    assert {e.phase for e in events} == {Phase.DHCP_DISCOVER, Phase.DHCP_OFFER, Phase.DHCP_ACK, Phase.TFTP_LOADER}
    tftp = [e for e in events if e.phase is Phase.TFTP_LOADER]
    assert [(e.ip, e.detail) for e in tftp] == [("10.99.0.1", "undionly.kpxe")]


def test_dnsmasq_lines_keep_their_trailing_space() -> None:
    # dnsmasq ends DISCOVER/OFFER/REQUEST lines with a space (stripped from the sample above by the linter).
    line = "Nov 22 05:53:55 dnsmasq-dhcp[27609]: 376350788 DHCPOFFER(br0) 10.99.0.11 52:54:00:99:00:11 "
    (event,) = parse_dnsmasq([line], now=NOW)
    assert (event.phase, event.ip, event.mac) == (Phase.DHCP_OFFER, "10.99.0.11", MAC)


def test_dnsmasq_year_rollover() -> None:
    line = "Dec 31 23:59:58 dnsmasq-dhcp[1]: 7 DHCPACK(br0) 10.99.0.12 52:54:00:99:00:12 node02"
    (event,) = parse_dnsmasq([line], now=datetime(2027, 1, 1, 0, 0, 5, tzinfo=UTC))
    assert event.time.year == 2026


def test_http_phases() -> None:
    events = parse_http(HTTP_LOG.splitlines())
    from_node = [e for e in events if e.ip == "10.99.0.11"]
    assert [e.phase for e in from_node] == [
        Phase.IPXE_SCRIPT,
        Phase.NODE_SCRIPT,
        Phase.KERNEL,
        Phase.INITRD,
        Phase.ROOTFS,
    ]
    assert from_node[1].mac == MAC
    assert from_node[-1].client is Client.OS and from_node[0].client is Client.IPXE
    assert from_node[-1].time == datetime.fromtimestamp(1795326881.287, tz=UTC)
    assert "160567296 bytes" in from_node[-1].detail
    # The 404 and the garbage line are not boot phases.
    assert len([e for e in events if e.phase is Phase.ROOTFS]) == 1


def test_merge_follows_one_node_through_its_boot() -> None:
    timeline = merge(parse_dnsmasq(DNSMASQ_LOG.splitlines(), now=NOW), parse_http(HTTP_LOG.splitlines()), [HOST])
    nodes = by_node(timeline)
    assert set(nodes) == {"node01"}  # the curl test fetch from the server itself has no node
    phases = first_times(nodes["node01"])
    order = [Phase.DHCP_ACK, Phase.IPXE_SCRIPT, Phase.NODE_SCRIPT, Phase.KERNEL, Phase.INITRD, Phase.ROOTFS]
    assert all(p in phases for p in order)
    times = [phases[p] for p in order]
    assert times == sorted(times)
    assert (phases[Phase.ROOTFS] - phases[Phase.DHCP_ACK]).total_seconds() > 40


def test_merge_maps_addresses_from_leases_without_inventory() -> None:
    timeline = merge(parse_dnsmasq(DNSMASQ_LOG.splitlines(), now=NOW), parse_http(HTTP_LOG.splitlines()))
    kernel = next(e for e in timeline if e.phase is Phase.KERNEL)
    assert kernel.mac == MAC and kernel.node == "node01"  # the name from the DHCPACK line


def test_read_events_from_files(tmp_path: Path) -> None:
    (tmp_path / "dnsmasq.log").write_text(DNSMASQ_LOG)
    (tmp_path / "http-access.log").write_text(HTTP_LOG)
    events = read_events(tmp_path / "dnsmasq.log", tmp_path / "http-access.log", [HOST], now=NOW)
    assert events[-1].phase is Phase.ROOTFS and events[-1].node == "node01"
    assert read_events(tmp_path / "missing.log", tmp_path / "missing2.log") == []
    assert events[-1].as_dict()["phase"] == "rootfs"


PROXY_LOG = """\
Nov 22 06:14:47 dnsmasq-dhcp[23843]: 152668011 vendor class: PXEClient:Arch:00000:UNDI:002001
Nov 22 06:14:47 dnsmasq-dhcp[23843]: 152668011 user class: iPXE
Nov 22 06:14:47 dnsmasq-dhcp[23843]: 152668011 PXE(br0) 52:54:00:99:00:22 proxy
Nov 22 06:14:47 dnsmasq-dhcp[23843]: 152668011 tags: provision, ipxe, br0
Nov 22 06:14:47 dnsmasq-dhcp[23843]: 152668011 broadcast response
Nov 22 06:15:03 dnsmasq-dhcp[23843]: 0 vendor class: PXEClient
Nov 22 06:15:03 dnsmasq-dhcp[23843]: 0 user class: iPXE
Nov 22 06:15:03 dnsmasq-dhcp[23843]: 0 PXE(br0) 10.99.0.133 52:54:00:99:00:22 http://10.99.0.1/boot.ipxe
Nov 22 06:15:03 dnsmasq-dhcp[23843]: 0 bootfile name: http://10.99.0.1/boot.ipxe
"""
PROXY_HTTP = """\
1795328103.299 10.99.0.133 "GET /boot.ipxe HTTP/1.1" 200 371 0.000 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795328103.340 10.99.0.133 "GET /boot/52-54-00-99-00-22.ipxe HTTP/1.1" 200 787 0.000 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
1795328103.954 10.99.0.133 "GET /images/testimg/v1/vmlinuz HTTP/1.1" 200 8222656 0.597 "iPXE/1.0.0+git-20190125.36a4c85-5.1"
"""


def test_proxy_dhcp_lines_and_addresses_from_another_server() -> None:
    dhcp = parse_dnsmasq(PROXY_LOG.splitlines(), now=NOW)
    assert [(e.phase, e.ip, e.detail, e.client) for e in dhcp] == [
        (Phase.DHCP_PROXY, None, "proxy", Client.IPXE),
        (Phase.DHCP_PROXY, "10.99.0.133", "http://10.99.0.1/boot.ipxe", Client.IPXE),
    ]
    host = BootHost(name="node02", macs=("52:54:00:99:00:22",))  # no address: another server leased it
    timeline = merge(dhcp, parse_http(PROXY_HTTP.splitlines()), [host])
    # The node script's path names the MAC, so the kernel fetched from the same address is node02's too.
    assert [(e.phase, e.node) for e in timeline] == [
        (Phase.DHCP_PROXY, "node02"),
        (Phase.DHCP_PROXY, "node02"),
        (Phase.IPXE_SCRIPT, "node02"),
        (Phase.NODE_SCRIPT, "node02"),
        (Phase.KERNEL, "node02"),
    ]


# --- Property-based: no log line, however broken, raises or yields an event without a time ---------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_MONTH = st.sampled_from(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "Foo"])
_STAMP = st.builds(
    "{} {:>2} {:02d}:{:02d}:{:02d}".format,
    _MONTH,
    st.integers(0, 39),
    st.integers(0, 99),
    st.integers(0, 99),
    st.integers(0, 99),
)
_DNSMASQ_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(DNSMASQ_LOG.splitlines()).map(lambda line: line.split(": ", 1)[1]),
)
_DNSMASQ_LINES = st.builds(
    "{} dnsmasq-{}[1]: {}".format, _STAMP, st.sampled_from(["dhcp", "tftp"]), _DNSMASQ_TEXT
) | st.text(max_size=120)


@settings(max_examples=80, deadline=None)
@given(st.lists(_DNSMASQ_LINES, max_size=30), st.datetimes(min_value=datetime(1971, 1, 1), timezones=st.just(UTC)))
def test_dnsmasq_parser_never_raises(lines: list[str], written: datetime) -> None:
    for event in parse_dnsmasq(lines, now=written):
        assert event.time.tzinfo is not None
        assert abs(event.time.year - written.astimezone().year) <= len(lines) + 1


@settings(max_examples=50, deadline=None)
@given(st.integers(1970, 2200), st.lists(st.sampled_from([1, 2, 3, 6, 11, 12]), min_size=1, max_size=20))
def test_dnsmasq_years_walk_back_from_the_last_write(year: int, months: list[int]) -> None:
    written = datetime(year, 12, 31, 12, tzinfo=UTC)
    lines = [
        f"{'JanFebMarAprMayJunJulAugSepOctNovDec'[3 * (m - 1) : 3 * m]} 28 10:00:00 dnsmasq-dhcp[1]: 1 DHCPACK(br0) 10.0.0.1 {MAC} n"
        for m in months
    ]
    events = parse_dnsmasq(lines, now=written)
    assert len(events) == len(lines)
    times = [e.time for e in events]
    assert times == sorted(times)  # a chronological log stays chronological
    assert times[-1].year == year


def test_dnsmasq_leap_day_takes_the_year_from_the_file(tmp_path: Path) -> None:
    log = tmp_path / "dnsmasq.log"
    log.write_text(
        "Feb 29 12:00:00 dnsmasq-dhcp[1]: 7 DHCPACK(br0) 10.99.0.12 52:54:00:99:00:12 node02\n"
        "Jan  3 08:00:00 dnsmasq-dhcp[1]: 8 DHCPACK(br0) 10.99.0.12 52:54:00:99:00:12 node02\n"
    )
    written = datetime(2025, 1, 3, 8, 0, 1, tzinfo=UTC).timestamp()
    os.utime(log, (written, written))
    events = read_events(log, tmp_path / "none.log")
    assert [e.time.year for e in events] == [2024, 2025]
    # Read with no context in a non-leap year, the line is skipped, never raised.
    assert parse_dnsmasq(log.read_text().splitlines()[:1], now=datetime(2025, 6, 1, tzinfo=UTC)) == []


_HTTP_LINES = st.builds(
    '{} {} "{} {} HTTP/1.1" {} {} {} "{}"'.format,
    st.one_of(st.from_regex(r"\A\d{1,400}\.\d{1,5}\Z"), st.text(max_size=10)),
    st.sampled_from(["10.99.0.11", "x", ""]),
    st.sampled_from(["GET", "HEAD", "get"]),
    st.sampled_from(["/boot.ipxe", "/boot/52-54-00-99-00-11.ipxe", "/images/a/v1/vmlinuz", "/x", ""]),
    st.sampled_from(["200", "206", "404", "2000"]),
    st.integers(0, 10**20),
    st.sampled_from(["0.000", "1e9", "x"]),
    st.text(max_size=20).filter(lambda t: '"' not in t and "\n" not in t),
) | st.text(max_size=200)


@settings(max_examples=80, deadline=None)
@given(st.lists(_HTTP_LINES, max_size=20))
def test_http_parser_never_raises(lines: list[str]) -> None:
    for event in parse_http(lines):
        assert event.time.tzinfo is not None
    merge(parse_http(lines), [], [HOST])  # joining never raises either

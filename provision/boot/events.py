"""Boot phases from the built-in backend's logs: DHCP lease → scripts → kernel/initrd → squashfs.

Two sources, both written by ``provision.boot.builtin``:

* dnsmasq's log (``log-dhcp``, ``log-facility=<file>``): ``DHCPDISCOVER``/
  ``DHCPOFFER``/``DHCPACK`` per MAC, with the client kind taken from the same
  transaction's vendor and user class (firmware PXE, iPXE, or the booted OS's
  initramfs), and TFTP transfers (``sent … to <ip>``).
  Its timestamps have a one-second resolution and no year, in local time.
* nginx's access log in the ``provision`` format:
  ``$msec $remote_addr "$request" $status $body_bytes_sent $request_time "$http_user_agent"``.

``node_events`` joins both: HTTP requests are matched to a MAC through the
address the MAC was given (DHCPACK, else the hosts' inventory addresses), and
MACs to node names through the hosts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from provision.boot.base import BootHost


class Phase(StrEnum):
    """A step of a network boot, in the order a healthy boot goes through them."""

    DHCP_DISCOVER = "dhcp-discover"
    DHCP_OFFER = "dhcp-offer"
    DHCP_PROXY = "dhcp-proxy"  # proxy-DHCP: boot information beside another server's lease
    DHCP_ACK = "dhcp-ack"
    DHCP_NAK = "dhcp-nak"
    TFTP_LOADER = "tftp-loader"  # iPXE fetched over TFTP by firmware PXE
    IPXE_SCRIPT = "ipxe-script"  # the generic /boot.ipxe
    NODE_SCRIPT = "node-script"  # /boot/<mac>.ipxe
    KERNEL = "kernel"
    INITRD = "initrd"
    ROOTFS = "rootfs"  # the squashfs, fetched by dracut's livenet


class Client(StrEnum):
    """Who asked, per the DHCP vendor/user class."""

    PXE = "pxe"  # the NIC's firmware
    IPXE = "ipxe"
    OS = "os"  # the booted kernel's initramfs or system


_ORDER = {phase: index for index, phase in enumerate(Phase)}


@dataclass(frozen=True)
class BootEvent:
    time: datetime  # timezone-aware
    phase: Phase
    mac: str | None = None
    ip: str | None = None
    node: str | None = None
    client: Client | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(),
            "phase": str(self.phase),
            "mac": self.mac,
            "ip": self.ip,
            "node": self.node,
            "client": str(self.client) if self.client else None,
            "detail": self.detail,
        }


# --------------------------------------------------------------------------
# dnsmasq

_DNSMASQ_LINE = re.compile(
    r"^(?P<stamp>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) dnsmasq-(?P<kind>dhcp|tftp)\[\d+\]: (?P<text>.*)$"
)
_DHCP_MESSAGE = re.compile(
    r"^(?:(?P<xid>\d+) )?DHCP(?P<msg>DISCOVER|OFFER|REQUEST|ACK|NAK)\((?P<iface>[^)]*)\) "
    r"(?:(?P<ip>\d+\.\d+\.\d+\.\d+) )?(?P<mac>[0-9a-f]{2}(?::[0-9a-f]{2}){5})(?: (?P<rest>.*))?$"
)
_PXE_MESSAGE = re.compile(
    r"^(?:(?P<xid>\d+) )?PXE\((?P<iface>[^)]*)\) (?:(?P<ip>\d+\.\d+\.\d+\.\d+) )?"
    r"(?P<mac>[0-9a-f]{2}(?::[0-9a-f]{2}){5})(?: (?P<rest>.*))?$"
)
_XID_INFO = re.compile(r"^(?P<xid>\d+) (?P<key>vendor class|user class): (?P<value>.*)$")
_TFTP_SENT = re.compile(r"^sent (?P<path>\S+) to (?P<ip>[0-9.]+)$")
_DHCP_PHASE = {"DISCOVER": Phase.DHCP_DISCOVER, "OFFER": Phase.DHCP_OFFER, "ACK": Phase.DHCP_ACK, "NAK": Phase.DHCP_NAK}


_MONTHS = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)
}


def _stamp_month(stamp: str) -> int | None:
    return _MONTHS.get(stamp[:3])


def _line_years(months: Sequence[int | None], written: datetime) -> list[int]:
    """The year of each line of a log whose stamps have none, the last line written at ``written``.

    dnsmasq's log is chronological and never rotated here: walking back from
    the end, the year starts at the file's last write (a month later than that
    means the year before) and drops each time the month goes up.
    """
    local = written.astimezone()
    year, later = local.year, local.month
    years = [year] * len(months)
    for index in range(len(months) - 1, -1, -1):
        month = months[index]
        if month is None:
            continue
        if month > later:
            year -= 1
        later = month
        years[index] = year
    return years


def _dnsmasq_time(stamp: str, year: int) -> datetime | None:
    """``Nov 22 05:53:55`` (local time) in ``year`` → an aware datetime; None when no such date (29 Feb)."""
    try:
        naive = datetime.strptime(f"{year} {' '.join(stamp.split())}", "%Y %b %d %H:%M:%S")
        return naive.astimezone()  # naive means local time, as dnsmasq wrote it
    except (ValueError, OverflowError, OSError):
        return None


def _client(vendor: Mapping[str, str], user: Mapping[str, str], xid: str) -> Client:
    if user.get(xid, "").startswith("iPXE"):
        return Client.IPXE
    if vendor.get(xid, "").startswith("PXEClient"):
        return Client.PXE
    return Client.OS


def parse_dnsmasq(lines: Iterable[str], *, now: datetime | None = None) -> list[BootEvent]:
    """DHCP and TFTP events from dnsmasq's log; ``now``: when the log was last written (default: now).

    Lines that do not parse (foreign, truncated, a date that does not exist) are skipped: a log line never
    stops a boot being followed.
    """
    matched = [m for m in (_DNSMASQ_LINE.match(str(raw).rstrip("\n")) for raw in lines) if m]
    years = _line_years([_stamp_month(m["stamp"]) for m in matched], now or datetime.now(UTC))
    events: list[BootEvent] = []
    vendor: dict[str, str] = {}
    user: dict[str, str] = {}
    for match, year in zip(matched, years, strict=True):
        when = _dnsmasq_time(match["stamp"], year)
        if when is None:
            continue
        event = _dnsmasq_event(match["kind"], match["text"].strip(), when, vendor, user)
        if event is not None:
            events.append(event)
    return events


def _dnsmasq_event(
    kind: str, text: str, when: datetime, vendor: dict[str, str], user: dict[str, str]
) -> BootEvent | None:
    if kind == "tftp":
        sent = _TFTP_SENT.match(text)
        if not sent:
            return None
        return BootEvent(when, Phase.TFTP_LOADER, ip=sent["ip"], client=Client.PXE, detail=Path(sent["path"]).name)
    info = _XID_INFO.match(text)
    if info:
        (vendor if info["key"] == "vendor class" else user)[info["xid"]] = info["value"]
        return None
    pxe = _PXE_MESSAGE.match(text)
    if pxe:
        client = _client(vendor, user, pxe["xid"] or "")
        detail = (pxe["rest"] or "").strip()
        return BootEvent(when, Phase.DHCP_PROXY, mac=pxe["mac"], ip=pxe["ip"], client=client, detail=detail)
    message = _DHCP_MESSAGE.match(text)
    if not message or message["msg"] not in _DHCP_PHASE:
        return None
    xid = message["xid"] or ""
    client = _client(vendor, user, xid)
    rest = (message["rest"] or "").strip()
    if message["msg"] in ("ACK", "NAK"):
        vendor.pop(xid, None)
        user.pop(xid, None)
    return BootEvent(
        when,
        _DHCP_PHASE[message["msg"]],
        mac=message["mac"],
        ip=message["ip"],
        node=rest.split()[0] if message["msg"] == "ACK" and rest else None,
        client=client,
        detail=rest if message["msg"] == "NAK" else "",
    )


# --------------------------------------------------------------------------
# nginx

_HTTP_LINE = re.compile(
    r'^(?P<msec>\d+\.\d+) (?P<ip>\S+) "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) (?P<rtime>[\d.]+) "(?P<agent>[^"]*)"$'
)
_NODE_SCRIPT = re.compile(r"^/boot/(?P<mac>[0-9a-f]{2}(?:-[0-9a-f]{2}){5})\.ipxe$")
_IMAGE_FILE = re.compile(r"^/images/(?P<image>[^/]+)/(?P<version>[^/]+)/(?P<file>[^/?]+)$")


def _image_phase(file_name: str) -> Phase:
    lowered = file_name.lower()
    if lowered.endswith(".squashfs") or lowered.endswith(".sqfs"):
        return Phase.ROOTFS
    if "initrd" in lowered or "initramfs" in lowered or lowered.endswith((".img", ".cpio", ".cpio.gz", ".cpio.zst")):
        return Phase.INITRD
    return Phase.KERNEL


def parse_http(lines: Iterable[str]) -> list[BootEvent]:
    """Boot-file downloads from nginx's access log (successful GETs only)."""
    events: list[BootEvent] = []
    for raw in lines:
        match = _HTTP_LINE.match(str(raw).rstrip("\n"))
        if not match or match["method"] != "GET" or match["status"] not in ("200", "206"):
            continue
        try:
            when = datetime.fromtimestamp(float(match["msec"]), tz=UTC)
        except (ValueError, OverflowError, OSError):
            continue  # a stamp no clock gives: not evidence of anything
        path = match["path"].split("?", 1)[0]
        detail = f"{path} {match['status']} {match['bytes']} bytes in {match['rtime']} s"
        client = Client.IPXE if match["agent"].startswith("iPXE") else Client.OS
        mac: str | None = None
        if path == "/boot.ipxe":
            phase = Phase.IPXE_SCRIPT
        elif script := _NODE_SCRIPT.match(path):
            phase = Phase.NODE_SCRIPT
            mac = script["mac"].replace("-", ":")
        elif image := _IMAGE_FILE.match(path):
            phase = _image_phase(image["file"])
        else:
            continue
        events.append(BootEvent(when, phase, mac=mac, ip=match["ip"], client=client, detail=detail))
    return events


# --------------------------------------------------------------------------
# Joining


def _sort_key(event: BootEvent) -> tuple[int, int, float]:
    # dnsmasq stamps whole seconds: within one second, phase order decides.
    stamp = event.time.timestamp()
    return (int(stamp), _ORDER[event.phase], stamp)


def merge(dhcp: Sequence[BootEvent], http: Sequence[BootEvent], hosts: Sequence[BootHost] = ()) -> list[BootEvent]:
    """Both sources in one timeline, each event with its MAC and node name where known.

    An HTTP request is matched to a MAC through its source address: the MAC
    leased that address last (DHCPACK) or fetched its own script from it (the
    only way under proxy-DHCP, where another server leases); a request made
    before any such evidence (the generic boot.ipxe) takes the next one.
    """
    name_of_mac = {mac: h.name for h in hosts for mac in h.macs}
    static_ips = {ip: mac for h in hosts for mac, ip in zip(h.macs, h.addresses, strict=False)}
    timeline = sorted([*dhcp, *http], key=_sort_key)
    evidence: dict[str, list[tuple[float, str]]] = {}
    for event in timeline:
        if event.phase in (Phase.DHCP_ACK, Phase.NODE_SCRIPT) and event.mac and event.ip:
            evidence.setdefault(event.ip, []).append((event.time.timestamp(), event.mac))
            if event.node:
                name_of_mac.setdefault(event.mac, event.node)

    def mac_for(ip: str, when: float) -> str | None:
        seen = evidence.get(ip, [])
        before = [mac for t, mac in seen if t <= when + 1]  # dnsmasq's whole seconds
        if before:
            return before[-1]
        return seen[0][1] if seen else static_ips.get(ip)

    out: list[BootEvent] = []
    for event in timeline:
        mac = event.mac or (mac_for(event.ip, event.time.timestamp()) if event.ip else None)
        node = name_of_mac.get(mac or "") or event.node
        out.append(
            BootEvent(
                event.time, event.phase, mac=mac, ip=event.ip, node=node, client=event.client, detail=event.detail
            )
        )
    return out


def read_events(
    dnsmasq_log: Path, http_log: Path, hosts: Sequence[BootHost] = (), *, now: datetime | None = None
) -> list[BootEvent]:
    """The merged timeline from the two log files (missing or unreadable files are empty).

    dnsmasq's stamps have no year: it is taken from the log's last write (``now`` overrides it).
    """
    dhcp_lines, written = _read_log(dnsmasq_log)
    dhcp = parse_dnsmasq(dhcp_lines, now=now or written)
    http = parse_http(_read_log(http_log)[0])
    return merge(dhcp, http, hosts)


def _read_log(path: Path) -> tuple[list[str], datetime | None]:
    try:
        with open(path, "rb") as handle:
            written = datetime.fromtimestamp(os.fstat(handle.fileno()).st_mtime, tz=UTC)
            return handle.read().decode(errors="replace").splitlines(), written
    except (OSError, ValueError, OverflowError):
        return [], None


def by_node(events: Iterable[BootEvent]) -> dict[str, list[BootEvent]]:
    """Events per node name (or per MAC when the node is unknown); events with neither are dropped."""
    grouped: dict[str, list[BootEvent]] = {}
    for event in events:
        key = event.node or event.mac
        if key:
            grouped.setdefault(key, []).append(event)
    return grouped


def first_times(events: Iterable[BootEvent], since: datetime | None = None) -> Mapping[Phase, datetime]:
    """When each phase was first seen (after ``since``): one node's boot at a glance."""
    seen: dict[Phase, datetime] = {}
    for event in events:
        if since is not None and event.time < since.replace(microsecond=0):
            continue
        seen.setdefault(event.phase, event.time)
    return seen

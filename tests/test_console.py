"""The console parser: only well-formed, line-anchored markers; keys of the latest boot; first key wins."""

from __future__ import annotations

import base64
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from provision.console import ConsoleFollower, ConsoleLog, ConsoleParser, HostKey, parse, parse_public_key


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ed25519_key(point: bytes) -> str:
    return base64.b64encode(_string(b"ssh-ed25519") + _string(point)).decode()


def ecdsa_key(point: bytes) -> str:
    return base64.b64encode(_string(b"ecdsa-sha2-nistp256") + _string(b"nistp256") + _string(point)).decode()


KEY_A = ed25519_key(b"A" * 32)
KEY_B = ed25519_key(b"B" * 32)
BOOT_1 = "0b6a2f4e-1c3d-4e5f-8a9b-0c1d2e3f4a5b"
BOOT_2 = "7d8e9f0a-1b2c-4d3e-9f4a-5b6c7d8e9f0a"


# -- examples -----------------------------------------------------------------------


def test_a_key_typed_after_login_is_not_pinned(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(
        f"[    4.100000] provision: boot {BOOT_1}\r\n"
        f"Debian GNU/Linux 12 r1n01 ttyS0\r\n\r\n"
        f"r1n01 login: provision: ssh-host-key ssh-ed25519 {KEY_B}\r\n"
        # a carriage return typed at the prompt does not start a line either
        f"r1n01 login: \rprovision: ssh-host-key ssh-ed25519 {KEY_B}\r\n".encode()
    )
    follower = ConsoleFollower(log)
    follower.poll()
    assert follower.current.boot_id == BOOT_1 and follower.current.keys == ()
    with open(log, "ab") as fh:  # the node's own line, later: pinned
        fh.write(f"[    5.000001] provision: ssh-host-key ssh-ed25519 {KEY_A}\r\n".encode())
    follower.poll()
    assert follower.current.keys == (HostKey("ssh-ed25519", KEY_A),)
    with open(log, "ab") as fh:  # typed on a line of its own after the node's key: the first key wins
        fh.write(f"provision: ssh-host-key ssh-ed25519 {KEY_B}\r\n".encode())
    follower.poll()
    assert follower.current.key("ssh-ed25519") == HostKey("ssh-ed25519", KEY_A)


def test_a_key_of_the_previous_boot_is_not_pinned_after_a_new_boot_marker(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(f"[ 4.1] provision: boot {BOOT_1}\n[ 4.2] provision: ssh-host-key ssh-ed25519 {KEY_A}\n")
    follower = ConsoleFollower(log)
    follower.poll()
    assert follower.current.key("ssh-ed25519") == HostKey("ssh-ed25519", KEY_A)
    with open(log, "a") as fh:
        fh.write(f"reboot: Restarting system\n[ 3.9] provision: boot {BOOT_2}\n")
    follower.poll()
    assert follower.current.boot_id == BOOT_2 and follower.current.keys == ()
    assert follower.seen_boot(BOOT_1) and follower.seen_boot(BOOT_2)
    with open(log, "a") as fh:
        fh.write(f"[ 4.0] provision: ssh-host-key ssh-ed25519 {KEY_B}\n")
    follower.poll()
    assert follower.current.keys == (HostKey("ssh-ed25519", KEY_B),)


def test_truncation_is_a_new_writer_and_rotation_is_not(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(f"[ 4.1] provision: boot {BOOT_1}\n[ 4.2] provision: ssh-host-key ssh-ed25519 {KEY_A}\n")
    follower = ConsoleFollower(log)
    follower.poll()
    log.write_text("SeaBIOS\n")  # QEMU started again: truncated
    follower.poll()
    assert follower.current.boot_id is None and follower.current.keys == ()
    log.write_text(f"[ 4.1] provision: boot {BOOT_2}\n[ 4.2] provision: ssh-host-key ssh-ed25519 {KEY_B}\n" + "x" * 100)
    follower.poll()
    rotated = tmp_path / "console.log.new"
    rotated.write_text("a login prompt\n")
    rotated.replace(log)  # conserver rotated its log: same machine, same boot
    follower.poll()
    assert follower.current.boot_id == BOOT_2 and follower.current.key("ssh-ed25519") == HostKey("ssh-ed25519", KEY_B)


def test_malformed_markers_are_ignored() -> None:
    lines = [
        f"provision: boot {BOOT_1}",
        f"provision: ssh-host-key ssh-ed25519 {KEY_A[:-4]}",  # cut short
        f"provision: ssh-host-key ssh-ed25519 {KEY_A}junk",
        f"provision: ssh-host-key ssh-ed25519 {KEY_A} trailing",
        f"provision: ssh-host-key ssh-rsa {KEY_A}",  # the blob says ssh-ed25519
        f"provision: ssh-host-key ssh-ed25519 {ecdsa_key(b'x' * 65)}",
        f"[bad] provision: ssh-host-key ssh-ed25519 {KEY_A}",
        f" provision: ssh-host-key ssh-ed25519 {KEY_A}",
    ]
    boot = parse(("\n".join(lines) + "\n").encode())
    assert boot.boot_id == BOOT_1 and boot.keys == ()
    assert parse(f"provision: boot {BOOT_1.upper()}\n".encode()).boot_id is None
    assert parse(f"provision: boot {BOOT_2}".encode()).boot_id is None  # an unfinished line does not count


def test_console_log_since_mark(tmp_path: Path) -> None:
    """``node boot``'s reader: ``mark()`` starts a boot for images that print no boot marker."""
    log = tmp_path / "console.log"
    log.write_text(f"[ 3.1] provision: ssh-host-key ssh-ed25519 {KEY_B}\n")
    console = ConsoleLog(log)
    console.mark()
    with open(log, "a") as fh:
        fh.write(
            f"\x1b[0m[ 5.2] provision: ssh-host-key ssh-ed25519 {KEY_A}\r\n[ 9.9] provision: node ready (multi-user)\r\n"
        )
    assert console.host_keys() == [HostKey("ssh-ed25519", KEY_A)] and console.ready()
    assert console.tail(1) == ["[ 9.9] provision: node ready (multi-user)"]


# -- properties ---------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    boot_id: str


@dataclass(frozen=True)
class Key:
    type: str
    key: str
    timestamp: bool


@dataclass(frozen=True)
class Typed:
    """A marker with text before it on its line (a prompt, a service's log): never a marker."""

    prefix: str
    marker: str


@dataclass(frozen=True)
class Noise:
    text: str


NOISE_ALPHABET = st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))
points = st.binary(min_size=32, max_size=32)
boots = st.uuids().map(lambda u: Boot(str(u)))
keys = st.one_of(
    st.builds(lambda p, ts: Key("ssh-ed25519", ed25519_key(p), ts), points, st.booleans()),
    st.builds(lambda p, ts: Key("ecdsa-sha2-nistp256", ecdsa_key(b"\x04" + p + p), ts), points, st.booleans()),
)
prompts = st.text(NOISE_ALPHABET, min_size=1, max_size=20).filter(
    lambda p: (
        re.sub(r"[\x00-\x1f\x7f]|\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]", "", p) != ""
        and not re.fullmatch(r"(?:\[\s*\d+\.\d+\] )?", re.sub(r"[\x00-\x1f\x7f]", "", p))
    )
)
typed = st.builds(
    Typed,
    st.one_of(st.just("r1n01 login: "), prompts),
    st.one_of(
        boots.map(lambda b: f"provision: boot {b.boot_id}"),
        keys.map(lambda k: f"provision: ssh-host-key {k.type} {k.key}"),
    ),
)
noise = st.text(NOISE_ALPHABET, max_size=40).filter(lambda t: "provision:" not in t).map(Noise)
events = st.lists(st.one_of(boots, keys, typed, noise), max_size=30)


def render(items: list[Boot | Key | Typed | Noise]) -> bytes:
    out = []
    for item in items:
        if isinstance(item, Boot):
            out.append(f"[    4.123456] provision: boot {item.boot_id}")
        elif isinstance(item, Key):
            out.append(
                ("[   12.345678] " if item.timestamp else "") + f"provision: ssh-host-key {item.type} {item.key}"
            )
        elif isinstance(item, Typed):
            out.append(item.prefix + item.marker)
        else:
            out.append(item.text)
    return "".join(line + "\r\n" for line in out).encode()


def expected(items: list[Boot | Key | Typed | Noise]) -> tuple[str | None, tuple[HostKey, ...]]:
    boot_id: str | None = None
    pinned: dict[str, HostKey] = {}
    for item in items:
        if isinstance(item, Boot):
            boot_id, pinned = item.boot_id, {}
        elif isinstance(item, Key) and item.type not in pinned:
            pinned[item.type] = HostKey(item.type, item.key)
    return boot_id, tuple(pinned.values())


@settings(max_examples=300, deadline=None)
@given(events)
def test_keys_are_the_first_of_each_type_after_the_latest_boot_marker(items: list[Boot | Key | Typed | Noise]) -> None:
    boot = parse(render(items))
    assert (boot.boot_id, boot.keys) == expected(items)


@settings(max_examples=200, deadline=None)
@given(events, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_reading_in_pieces_gives_the_same_result(items: list[Boot | Key | Typed | Noise], cuts: list[int]) -> None:
    data = render(items)
    parser = ConsoleParser()
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        parser.feed(data[start:cut])
        start = cut
    parser.feed(data[start:])
    assert parser.current == parse(data)


@settings(max_examples=300, deadline=None)
@given(prompts, keys)
def test_a_marker_after_other_text_on_its_line_is_never_read(prefix: str, key: Key) -> None:
    data = f"provision: boot {uuid.uuid4()}\n{prefix}provision: ssh-host-key {key.type} {key.key}\n".encode()
    assert parse(data).keys == ()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]), st.binary(max_size=120))
def test_only_well_formed_keys_are_read(key_type: str, blob: bytes) -> None:
    key = base64.b64encode(blob).decode()
    boot = parse(f"provision: boot {uuid.uuid4()}\nprovision: ssh-host-key {key_type} {key}\n".encode())
    if parse_public_key(key_type, key) is None:
        assert boot.keys == ()
    else:
        assert boot.keys == (HostKey(key_type, key),) and HostKey(key_type, key).blob == blob

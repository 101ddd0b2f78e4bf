"""The join service, for real: aiohttp on loopback, nodes made of real ssh-keygen keys and signatures, real age.

A "node" is an ed25519 key from ``ssh-keygen``, a boot id and a console log
file this test writes like the node's kernel would; it signs with
``ssh-keygen -Y sign`` and decrypts with ``age -d``, neither of which shares
code with the service. Its source address is a loopback address of its own
(127.0.0.1, 127.0.0.2, ...: Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from provision import inventory
from provision.inventory import Site
from provision.service import JoinService, join_message, read_status, report_message
from provision.service.bundle import MANIFEST_MEMBER, BundleError, read_manifest
from tests.conftest import requires

pytestmark = pytest.mark.integration

HAVE_TOOLS = all(shutil.which(tool) for tool in ("ssh-keygen", "age"))
NEEDS_TOOLS = requires(HAVE_TOOLS, "ssh-keygen and age (Debian packages openssh-client, age: ./run setup)")
SECRET = b"MUNGE-KEY-SECRET-"  # every bundle file starts with this; no response may carry it in clear
NODES = {"r1n01": "127.0.0.1", "r1n02": "127.0.0.2", "r1n03": "127.0.0.3"}


@dataclass
class FakeNode:
    """A booted stateless node: its host key, boot id, console log and source address."""

    name: str
    ip: str
    console: Path
    workdir: Path
    boot_id: str = ""
    key: Path = field(default_factory=Path)

    def boot(self, *, truncate: bool = False, print_key: bool = True) -> None:
        """A new boot: new host key, new boot id, the markers on the console."""
        self.boot_id = str(uuid.uuid4())
        self.key = self.workdir / f"{self.name}-{self.boot_id[:8]}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        text = f"[    0.000000] Linux version 6.1.0\r\n[    4.100000] provision: boot {self.boot_id}\r\n"
        if print_key:
            text += self.key_line()
        with open(self.console, "w" if truncate else "a") as fh:
            fh.write(text)

    def key_line(self) -> str:
        return f"[    4.200000] provision: ssh-host-key {self.public_key()}\r\n"

    def print_key(self) -> None:
        with open(self.console, "a") as fh:
            fh.write(self.key_line())

    def public_key(self) -> str:
        return " ".join(self.key.with_suffix(".pub").read_text().split()[:2])

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(self.key)], capture_output=True, text=True, check=True)
        return out.stdout.split()[1]

    def sign(self, message: bytes, key: Path | None = None) -> str:
        path = self.workdir / f"msg-{uuid.uuid4().hex}"
        path.write_bytes(message)
        subprocess.run(
            ["ssh-keygen", "-q", "-Y", "sign", "-f", str(key or self.key), "-n", "provision-join@v1", str(path)],
            check=True,
            capture_output=True,
        )
        return Path(f"{path}.sig").read_text()

    def decrypt(self, blob: bytes) -> bytes:
        return subprocess.run(["age", "-d", "-i", str(self.key)], input=blob, capture_output=True, check=True).stdout


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Client:
    """HTTP from one source address; every answer is kept to check that none carries a secret."""

    def __init__(self, base: str, answers: list[Answer]) -> None:
        self.base = base
        self.answers = answers

    async def request(self, method: str, path: str, source: str, **kwargs: Any) -> Answer:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, self.base + path, **kwargs) as response,
        ):
            answer = Answer(response.status, await response.read(), response.content_type, dict(response.headers))
        self.answers.append(answer)
        return answer

    async def challenge(self, node: str, source: str) -> Answer:
        return await self.request("GET", "/v1/challenge", source, params={"node": node})

    async def join_request(
        self, node: FakeNode, *, claim: str | None = None, key: Path | None = None
    ) -> dict[str, str]:
        """A signed bundle request, as the agent builds it (claim: the node name it claims to be)."""
        name = claim or node.name
        answer = await self.challenge(name, node.ip)
        assert answer.status == 200, answer.body
        nonce = answer.json()["nonce"]
        signature = node.sign(join_message(name, node.boot_id, nonce), key)
        return {"node": name, "boot_id": node.boot_id, "nonce": nonce, "signature": signature}

    async def bundle(self, body: dict[str, str], source: str) -> Answer:
        return await self.request("POST", "/v1/bundle", source, json=body)


def untar(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """A bundle tar's members and their contents."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            content = tar.extractfile(member)
            assert content is not None
            out[member.name] = (member, content.read())
    return out


def write_bundle(root: Path, node: str) -> None:
    base = root / node
    (base / "files/etc/munge").mkdir(parents=True, exist_ok=True)
    (base / "files/etc/sssd").mkdir(parents=True, exist_ok=True)
    (base / "files/etc/munge/munge.key").write_bytes(SECRET + node.encode() + os.urandom(16).hex().encode())
    (base / "files/etc/sssd/sssd.conf").write_bytes(SECRET + b"[sssd]\nldap_default_authtok = x\n")
    manifest = {
        "files": [
            {"path": "/etc/munge/munge.key", "owner": "munge", "group": "munge", "mode": "0400"},
            {"path": "/etc/sssd/sssd.conf", "owner": "root", "group": "root", "mode": "0600"},
        ],
        "services": ["munge", "sssd", "slurmd"],
    }
    (base / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, Path]:
    """An inventory of three nodes on loopback addresses, their console logs and rendered bundles."""
    root = tmp_path_factory.mktemp("join")
    inv = root / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    hosts = {
        name: {
            "provision_mac": f"52:54:00:00:00:0{i}",
            "provision_ip": ip,
            "provision_console_log": str(root / f"{name}.console.log"),
            "provision_bmc_address": "127.0.0.1",
            "provision_bmc_user": "admin",
        }
        for i, (name, ip) in enumerate(NODES.items(), start=1)
    }
    (inv / "hosts.yml").write_text(json.dumps({"all": {"children": {"rack_r1": {"hosts": hosts}}}}))
    (inv / "group_vars" / "all.yml").write_text(
        json.dumps(
            {
                "provision_network": "127.0.0.0/8",
                "provision_state_dir": str(root / "state"),
                "provision_join_address": "127.0.0.1",
                "provision_join_console_poll": 0.1,
            }
        )
    )
    site = inventory.load(inv)
    for name in NODES:
        write_bundle(site.state_dir / "service" / "bundles", name)
    return site, root


@pytest.fixture
def nodes(lab: tuple[Site, Path], tmp_path: Path) -> dict[str, FakeNode]:
    site, _ = lab
    (site.state_dir / "service" / "status.json").unlink(missing_ok=True)  # a service with no history
    made = {}
    for node in site.nodes:
        assert node.console_log
        Path(node.console_log).write_text("")  # a fresh QEMU for each test
        made[node.name] = FakeNode(node.name, node.ip, Path(node.console_log), tmp_path)
    return made


Scenario = Callable[[JoinService, Client], Awaitable[None]]


def serve(site: Site, scenario: Scenario) -> list[Answer]:
    """Run the real service on 127.0.0.1 (an ephemeral port) around ``scenario``; all answers."""
    answers: list[Answer] = []

    async def main() -> None:
        service = JoinService.from_site(site)
        host, port = await service.start("127.0.0.1", 0)
        try:
            await scenario(service, Client(f"http://{host}:{port}", answers))
        finally:
            await service.stop()

    asyncio.run(main())
    for answer in answers:
        assert SECRET not in answer.body
        if answer.status not in (200, 204):
            assert answer.content_type == "application/json" and set(answer.json()) == {"error"}
            assert "r1n0" not in answer.json()["error"]  # no node named in a refusal
    return answers


def refusals(site: Site, node: str) -> list[str]:
    status = read_status(site.state_dir / "service" / "status.json")
    assert status is not None
    return [e.detail for e in status.refusals() if e.node == node]


@NEEDS_TOOLS
def test_a_node_gets_its_bundle_and_reports(lab: tuple[Site, Path], nodes: dict[str, FakeNode]) -> None:
    site, _ = lab
    node = nodes["r1n01"]
    node.boot()

    async def scenario(service: JoinService, client: Client) -> None:
        challenge = await client.challenge("r1n01", node.ip)
        assert challenge.status == 200 and challenge.json()["expires_in"] == 60
        assert len(challenge.json()["nonce"]) == 43  # urlsafe base64 of 32 bytes
        answer = await client.bundle(await client.join_request(node), node.ip)
        assert answer.status == 200 and answer.content_type == "application/octet-stream"
        members = untar(node.decrypt(answer.body))
        assert set(members) == {"etc/munge/munge.key", "etc/sssd/sssd.conf", MANIFEST_MEMBER}
        key, data = members["etc/munge/munge.key"]
        assert (key.mode, key.uname, key.gname) == (0o400, "munge", "munge")
        assert (members["etc/sssd/sssd.conf"][0].mode, members["etc/sssd/sssd.conf"][0].uname) == (0o600, "root")
        rendered = site.state_dir / "service/bundles/r1n01/files/etc/munge/munge.key"
        assert data == rendered.read_bytes()
        assert json.loads(members[MANIFEST_MEMBER][1])["services"] == ["munge", "sssd", "slurmd"]

        # A re-rendered bundle is served at the next request.
        rendered.write_bytes(SECRET + b"rotated")
        again = await client.bundle(await client.join_request(node), node.ip)
        assert untar(node.decrypt(again.body))["etc/munge/munge.key"][1] == SECRET + b"rotated"

        # The bundle answer carries the report's challenge (no second round trip), single-use like any other.
        nonce = again.headers["X-Provision-Report-Nonce"]
        assert len(nonce) == 43 and nonce != answer.headers["X-Provision-Report-Nonce"]
        report = {"node": "r1n01", "boot_id": node.boot_id, "nonce": nonce, "status": "joined", "step": "slurmd"}
        report["signature"] = node.sign(report_message("r1n01", node.boot_id, nonce, "joined", "slurmd"))
        assert (await client.request("POST", "/v1/report", node.ip, json=report)).status == 204
        assert (await client.request("POST", "/v1/report", node.ip, json=report)).status == 403  # replayed
        # A fresh challenge does as well (an agent whose bundle nonce expired).
        nonce = (await client.challenge("r1n01", node.ip)).json()["nonce"]
        report = {"node": "r1n01", "boot_id": node.boot_id, "nonce": nonce, "status": "joined", "step": "done"}
        report["signature"] = node.sign(report_message("r1n01", node.boot_id, nonce, "joined", "done"))
        assert (await client.request("POST", "/v1/report", node.ip, json=report)).status == 204

    serve(site, scenario)
    status = read_status(site.state_dir / "service" / "status.json")
    assert status is not None
    record = status.nodes["r1n01"]
    assert record.boot_id == node.boot_id and record.key_fingerprint == node.fingerprint()
    assert record.bundles_served == 2 and record.last_report is not None
    assert (record.last_report["status"], record.last_report["step"]) == ("joined", "done")
    assert (site.state_dir / "service" / "status.json").stat().st_mode & 0o777 == 0o600


@NEEDS_TOOLS
def test_attacks_are_refused_logged_and_shown(
    lab: tuple[Site, Path], nodes: dict[str, FakeNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site, _ = lab
    n1, n2, n3 = nodes["r1n01"], nodes["r1n02"], nodes["r1n03"]
    for node in (n1, n2, n3):
        node.boot()
    caplog.set_level(logging.INFO, logger="provision.service")
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    signatures: list[str] = []

    async def scenario(service: JoinService, client: Client) -> None:
        # Replay of a captured request: from another address, then from the node's own.
        captured = await client.join_request(n1)
        signatures.append(captured["signature"])
        assert (await client.bundle(captured, n1.ip)).status == 200
        replay_elsewhere = await client.bundle(captured, n2.ip)
        assert replay_elsewhere.status == 403 and "source address" in replay_elsewhere.json()["error"]
        replay = await client.bundle(captured, n1.ip)
        assert replay.status == 403 and "challenge" in replay.json()["error"]

        # r1n02 asks for r1n01's bundle (a nonce and boot id it sniffed, signed with its own pinned key):
        # from its own address, then as if it spoofed r1n01's.
        thief = FakeNode("r1n02", n1.ip, n2.console, tmp_path, n1.boot_id, n2.key)
        theft = await client.bundle(await client.join_request(thief, claim="r1n01"), n2.ip)
        assert theft.status == 403 and "source address" in theft.json()["error"]
        theft = await client.bundle(await client.join_request(thief, claim="r1n01"), n1.ip)
        assert theft.status == 403 and "signature" in theft.json()["error"]

        # A key that never appeared on the console.
        forged = await client.bundle(await client.join_request(n1, key=stranger), n1.ip)
        assert forged.status == 403 and "signature" in forged.json()["error"]

        # Source address mismatch with a perfectly signed request.
        mismatch = await client.bundle(await client.join_request(n3), n3.ip)
        assert mismatch.status == 200
        body = await client.join_request(n3)
        mismatch = await client.bundle(body, n1.ip)
        assert mismatch.status == 403 and "source address" in mismatch.json()["error"]

        # An unknown node.
        unknown = await client.challenge("r9n99", n1.ip)
        assert unknown.status == 403 and unknown.json() == {"error": "unknown node"}

        # r1n01 reboots (new marker, new key): its credentials of the last boot are worthless.
        old = FakeNode(n1.name, n1.ip, n1.console, tmp_path, n1.boot_id, n1.key)
        n1.boot()
        stale = await client.bundle(await client.join_request(old), n1.ip)
        assert stale.status == 403 and "earlier boot" in stale.json()["error"]
        old.boot_id = n1.boot_id  # the old key with the new boot id
        stale = await client.bundle(await client.join_request(old), n1.ip)
        assert stale.status == 403 and "signature" in stale.json()["error"]
        assert (await client.bundle(await client.join_request(n1), n1.ip)).status == 200

    serve(site, scenario)
    r1 = refusals(site, "r1n01")
    assert sum("source address" in r for r in r1) == 2  # the replay from r1n02's address, r1n02's theft
    assert sum("challenge" in r for r in r1) == 1
    assert sum("signature" in r for r in r1) == 3
    assert sum("earlier boot" in r for r in r1) == 1
    assert any("source address" in r for r in refusals(site, "r1n03"))
    assert refusals(site, "r9n99") == ["unknown node"]
    status = read_status(site.state_dir / "service" / "status.json")
    assert status is not None and status.nodes["r1n01"].refusals == 7 and status.nodes["r1n01"].bundles_served == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and " refused " in r.getMessage()]
    assert len(lines) == 9 and all("peer=127.0.0." in line and "node=" in line for line in lines)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET.decode() not in everything
    assert not any(sig.splitlines()[1] in everything for sig in signatures)
    assert "BEGIN SSH SIGNATURE" not in everything


@NEEDS_TOOLS
def test_a_key_typed_at_a_login_prompt_is_never_pinned(
    lab: tuple[Site, Path], nodes: dict[str, FakeNode], tmp_path: Path
) -> None:
    site, _ = lab
    node = nodes["r1n01"]
    node.boot(print_key=False)  # the node's key line is not out yet
    typist = FakeNode(node.name, node.ip, node.console, tmp_path, node.boot_id)
    typist.key = tmp_path / "typed"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(typist.key)], check=True)
    with open(node.console, "a") as fh:
        fh.write(
            f"\r\nDebian GNU/Linux 12 r1n01 ttyS0\r\n\r\nr1n01 login: provision: ssh-host-key {typist.public_key()}\r\n"
        )

    async def scenario(service: JoinService, client: Client) -> None:
        typed = await client.bundle(await client.join_request(typist), node.ip)
        assert typed.status == 503  # nothing pinned for this boot yet
        node.print_key()
        typed = await client.bundle(await client.join_request(typist), node.ip)
        assert typed.status == 403 and "signature" in typed.json()["error"]
        assert (await client.bundle(await client.join_request(node), node.ip)).status == 200

    serve(site, scenario)


@NEEDS_TOOLS
def test_a_node_asking_before_its_key_reaches_the_console_gets_it_after(
    lab: tuple[Site, Path], nodes: dict[str, FakeNode]
) -> None:
    """The service starts after the node began asking; 503 until the console shows the key, then 200."""
    site, _ = lab
    node = nodes["r1n02"]
    node.boot(print_key=False)
    node_console_lag = node.console.read_text()
    node.console.write_text("")  # the console has not shown the boot at all yet

    async def scenario(service: JoinService, client: Client) -> None:
        body = await client.join_request(node)
        waiting = await client.bundle(body, node.ip)
        assert waiting.status == 503 and "console" in waiting.json()["error"]
        node.console.write_text(node_console_lag)  # the boot marker arrives
        waiting = await client.bundle(body, node.ip)
        assert waiting.status == 503  # the same nonce is still good: a 503 does not use it up
        node.print_key()
        await asyncio.sleep(0.3)  # seen by the background follower too
        assert service.state.nodes["r1n02"].key_fingerprint == node.fingerprint()
        answer = await client.bundle(body, node.ip)
        assert answer.status == 200 and node.decrypt(answer.body)

    serve(site, scenario)
    status = read_status(site.state_dir / "service" / "status.json")
    assert status is not None
    kinds = [str(e.kind) for e in status.events if e.node == "r1n02"]
    assert kinds == ["pending", "boot", "pending", "key", "served"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@NEEDS_TOOLS
def test_service_run_cli_serves_until_sigterm(
    lab: tuple[Site, Path], nodes: dict[str, FakeNode], tmp_path: Path
) -> None:
    """``provision service run --json``: a foreground process for a systemd unit."""
    site, _ = lab
    inv = tmp_path / "inventory"
    shutil.copytree(site.path, inv)
    settings = json.loads((inv / "group_vars" / "all.yml").read_text())
    settings.update(provision_join_port=_free_port(), provision_state_dir=str(tmp_path / "state"))
    (inv / "group_vars" / "all.yml").write_text(json.dumps(settings))
    write_bundle(tmp_path / "state" / "service" / "bundles", "r1n01")
    node = nodes["r1n01"]
    node.boot()
    proc = subprocess.Popen(
        [sys.executable, "-m", "provision", "-i", str(inv), "service", "run", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads("".join(iter(proc.stdout.readline, "}\n")) + "}")
        assert info["address"] == "127.0.0.1" and info["port"] == settings["provision_join_port"]

        async def fetch() -> Answer:
            client = Client(f"http://127.0.0.1:{info['port']}", [])
            return await client.bundle(await client.join_request(node), node.ip)

        answer = asyncio.run(fetch())
        assert answer.status == 200 and node.decrypt(answer.body).startswith(b"etc/munge/munge.key")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    status = read_status(tmp_path / "state" / "service" / "status.json")
    assert status is not None and status.nodes["r1n01"].bundles_served == 1


@NEEDS_TOOLS
def test_a_restart_forgets_nothing(lab: tuple[Site, Path], nodes: dict[str, FakeNode]) -> None:
    """A restarted service keeps its refusals and the boots it saw, even after the console log was truncated."""
    site, _ = lab
    n1 = nodes["r1n01"]
    n1.boot()
    old = FakeNode(n1.name, n1.ip, n1.console, n1.workdir, n1.boot_id, n1.key)

    async def first_run(service: JoinService, client: Client) -> None:
        forged = await client.bundle(await client.join_request(n1, claim="r1n01"), "127.0.0.2")
        assert forged.status == 403

    serve(site, first_run)
    n1.boot(truncate=True)  # the machine restarted: QEMU (or a new conserver file) starts the log afresh

    async def second_run(service: JoinService, client: Client) -> None:
        stale = await client.bundle(await client.join_request(old), n1.ip)
        assert stale.status == 403 and "earlier boot" in stale.json()["error"]
        assert (await client.bundle(await client.join_request(n1), n1.ip)).status == 200

    serve(site, second_run)
    r1 = refusals(site, "r1n01")
    assert any("source address" in r for r in r1) and any("earlier boot" in r for r in r1)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"path": "/root/.ssh/authorized_keys"}, "is outside /etc and /var/lib"),
        ({"path": "/etc/../root/x"}, "is not a normalized absolute path"),
        ({"mode": "4755"}, "mode '4755' is not an octal permission"),  # the agent sets no setuid bit
        ({"mode": "0x77"}, "mode '0x77' is not an octal permission"),
        ({"owner": "root;x"}, "bad owner or group"),
    ],
)
def test_the_service_packs_no_manifest_the_agent_would_refuse(tmp_path: Path, entry: dict[str, str], why: str) -> None:
    manifest = tmp_path / "manifest.json"
    good = {"path": "/etc/munge/munge.key", "owner": "munge", "group": "munge", "mode": "0400"}
    manifest.write_text(json.dumps({"files": [good], "services": ["munge"]}))
    assert read_manifest(manifest).files[0].mode == 0o400
    manifest.write_text(json.dumps({"files": [{**good, **entry}], "services": ["munge"]}))
    with pytest.raises(BundleError, match=re.escape(why)):
        read_manifest(manifest)

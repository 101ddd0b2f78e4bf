"""The join service over HTTP (aiohttp): challenge, bundle, report.

Every request is answered from memory after one non-blocking look at the
node's console log; each check that fails refuses the request with 403 (or
503 while the node's key for this boot has not reached its console), logs
one line and keeps an event. See ``provision.service`` for the trust design.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from provision.console import ConsoleBoot, ConsoleFollower, HostKey
from provision.inventory import Node, Site
from provision.service.bundle import BundleStore
from provision.service.errors import BundleError
from provision.service.settings import NONCE_TTL, REPORT_NONCE_HEADER, REPORT_NONCE_TTL, JoinSettings, JoinTrust
from provision.service.sshsig import SignatureError, verify
from provision.service.state import EventKind, NodeRecord, Nonces, ReportStatus, ServiceState, now_iso, printable

log = logging.getLogger("provision.service")

NAMESPACE = "provision-join@v1"  # ssh-keygen -Y sign -n, for bundles and reports alike
MAX_BODY = 16 * 1024
_STEP = re.compile(r"[A-Za-z0-9_.:/@+-]{0,64}")
_RELEASE = re.compile(r"([a-z0-9][a-z0-9-]{0,62}/[0-9][0-9.-]{0,31})?")  # IMAGE/VERSION, or empty
_FIELD = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # node, boot_id and nonce (urlsafe base64) as sent


def join_message(node: str, boot_id: str, nonce: str) -> bytes:
    return f"provision-join-v1\nnode={node}\nboot_id={boot_id}\nnonce={nonce}\n".encode()


def report_message(node: str, boot_id: str, nonce: str, status: str, step: str, release: str | None = None) -> bytes:
    """v2 carries the release the node runs (``IMAGE/VERSION`` from /etc/provision-release); v1 agents send none."""
    head = "provision-report-v1" if release is None else "provision-report-v2"
    text = f"{head}\nnode={node}\nboot_id={boot_id}\nnonce={nonce}\nstatus={status}\nstep={step}\n"
    return (text if release is None else f"{text}release={release}\n").encode()


class _Refused(Exception):
    def __init__(self, status: int, reason: str, *, pending: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.pending = pending


@dataclass(frozen=True)
class _Verified:
    node: str
    boot_id: str
    key: HostKey


def _peer(request: web.Request) -> str:
    """The TCP peer's address (never a header: the service is not behind a proxy)."""
    peername = request.transport.get_extra_info("peername") if request.transport else None
    host = str(peername[0]) if peername else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


class JoinService:
    """Hands each node, and only that node in this boot, its join bundle."""

    def __init__(
        self, nodes: Sequence[Node], settings: JoinSettings, tokens: Callable[[str, str], bool] | None = None
    ) -> None:
        """``tokens(node, token)``: with ``provision_join_trust: token``, True once for the node's boot token
        (the boot backend's ``rotate_token``, which then hands the node a new one for its next boot)."""
        self.settings = settings
        self.tokens = tokens
        self._token_keys: dict[str, tuple[str, HostKey]] = {}  # node -> (boot_id, key) accepted with its token
        self.nodes: Mapping[str, Node] = {n.name: n for n in nodes}
        self.consoles = {n.name: ConsoleFollower(Path(n.console_log)) for n in nodes if n.console_log}
        self.nonces = Nonces()
        self.bundles = BundleStore(settings.bundles_dir)
        self.state = ServiceState(settings.status_file, nodes={name: NodeRecord() for name in self.nodes})
        self.state.resume()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.address: tuple[str, int] = (settings.address, settings.port)

    @classmethod
    def from_site(cls, site: Site) -> JoinService:
        settings = JoinSettings.from_site(site)
        # A node whose inventory entry has problems (no valid provision_ip, ...) is not served: unknown.
        broken = {p.node for p in site.problems}
        nodes = tuple(n for n in site.nodes if n.name not in broken)
        if settings.trust is not JoinTrust.TOKEN:
            return cls(nodes, settings)
        from provision.boot.base import backend_for

        return cls(nodes, settings, tokens=backend_for(site).rotate_token)

    # -- consoles -----------------------------------------------------------------
    def console(self, name: str) -> ConsoleBoot | None:
        """The node's current boot per its console, read up to now; None without a console log."""
        follower = self.consoles.get(name)
        if follower is None:
            return None
        if follower.poll():
            self._note_boot(name, follower.current)
        return follower.current

    def _note_boot(self, name: str, boot: ConsoleBoot) -> None:
        record = self.state.nodes[name]
        key = boot.key("ssh-ed25519")
        fingerprint = key.fingerprint if key else None
        if boot.boot_id != record.boot_id:
            if record.boot_id:
                record.earlier_boots = [*record.earlier_boots, record.boot_id][-16:]
            record.boot_id = boot.boot_id
            record.boot_seen = now_iso()
            record.key_fingerprint = None
            self.state.event(EventKind.BOOT, name, "console", f"boot {boot.boot_id}")
        if boot.boot_id and fingerprint != record.key_fingerprint:
            record.key_fingerprint = fingerprint
            if fingerprint:
                self.state.event(EventKind.KEY, name, "console", f"ssh-ed25519 {fingerprint}")

    def poll_consoles(self) -> None:
        for name in self.consoles:
            self.console(name)

    # -- checks -------------------------------------------------------------------
    def _node(self, name: object, peer: str) -> Node:
        if not isinstance(name, str) or name not in self.nodes:
            raise _Refused(403, "unknown node")
        node = self.nodes[name]
        if node.ip and peer != node.ip:
            raise _Refused(403, f"source address {peer} is not the node's provision_ip")
        return node

    def _verify(self, body: Mapping[str, object], peer: str, message: Callable[[str, str, str], bytes]) -> _Verified:
        node = self._node(body.get("node"), peer)
        boot_id, nonce, signature = body.get("boot_id"), body.get("nonce"), body.get("signature")
        if not (isinstance(boot_id, str) and _FIELD.fullmatch(boot_id) and isinstance(signature, str)):
            raise _Refused(403, "malformed request")
        now = time.monotonic()
        if not isinstance(nonce, str) or not self.nonces.valid(node.name, nonce, now):
            raise _Refused(403, "no such challenge (unknown, expired or already used)")
        if self.settings.trust is JoinTrust.TOKEN:
            return self._verify_token(node, body, boot_id, message(node.name, boot_id, nonce), signature)
        boot = self.console(node.name)
        if boot is None:
            raise _Refused(403, "no console log for this node (provision_console_log)")
        follower = self.consoles[node.name]
        if boot_id != boot.boot_id:
            if follower.seen_boot(boot_id) or boot_id in self.state.nodes[node.name].earlier_boots:
                raise _Refused(403, "boot_id is an earlier boot of this node, not its current one")
            raise _Refused(503, "this boot has not appeared on the node's console yet", pending=True)
        key = boot.key("ssh-ed25519")
        if key is None:
            raise _Refused(503, "the host key of this boot has not appeared on the node's console yet", pending=True)
        try:
            verify(message(node.name, boot_id, nonce), signature, namespace=NAMESPACE, public_key=key.blob)
        except SignatureError as exc:
            raise _Refused(403, f"signature not by the host key pinned from the console for this boot ({exc})") from exc
        return _Verified(node.name, boot_id, key)

    def _verify_token(
        self, node: Node, body: Mapping[str, object], boot_id: str, message: bytes, signature: str
    ) -> _Verified:
        """The weaker, opt-in policy: the node's key comes with the request, vouched for by its boot token.

        A bundle request carries the single-use token from the node's iPXE script (served only to the
        address dnsmasq leased it) and the public key the bundle is encrypted to; the token is spent, and
        replaced for the next boot, only once every other check passed (``bundle``). A report is signed by
        the key accepted with this boot's token.
        """
        if not node.ip:
            raise _Refused(403, "the token policy needs the node's provision_ip (the token is bound to its lease)")
        public = body.get("public_key")
        if "token" not in body:  # a report: the key this boot's token vouched for
            accepted = self._token_keys.get(node.name)
            if accepted is None or accepted[0] != boot_id:
                raise _Refused(403, "no bundle was served to this boot")
            key = accepted[1]
        elif isinstance(public, str) and isinstance(body.get("token"), str) and public.startswith("ssh-ed25519 "):
            key = HostKey("ssh-ed25519", public.split()[1])
        else:
            raise _Refused(403, "malformed request (token policy: token and public_key)")
        try:
            verify(message, signature, namespace=NAMESPACE, public_key=key.blob)
        except (SignatureError, ValueError) as exc:
            raise _Refused(403, f"signature not by the key sent with the request ({exc})") from exc
        return _Verified(node.name, boot_id, key)

    def _refuse(self, refused: _Refused, node: object, peer: str) -> web.Response:
        claimed = node if isinstance(node, str) else repr(node)
        kind = EventKind.PENDING if refused.pending else EventKind.REFUSED
        self.state.event(kind, claimed, peer, refused.reason)
        headers = {"Retry-After": "2"} if refused.pending else None
        return web.json_response({"error": refused.reason}, status=refused.status, headers=headers)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, object]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused(400, "the body is not JSON") from exc
        if not isinstance(body, dict):
            raise _Refused(400, "the body is not a JSON object")
        return body

    # -- handlers -----------------------------------------------------------------
    async def challenge(self, request: web.Request) -> web.Response:
        peer = _peer(request)
        name = request.query.get("node", "")
        try:
            node = self._node(name, peer)
        except _Refused as refused:
            return self._refuse(refused, name, peer)
        nonce = self.nonces.issue(node.name, time.monotonic())
        return web.json_response({"nonce": nonce, "expires_in": int(NONCE_TTL)}, headers={"Cache-Control": "no-store"})

    async def bundle(self, request: web.Request) -> web.Response:
        peer = _peer(request)
        body: Mapping[str, object] = {}
        try:
            body = await self._body(request)
            verified = self._verify(body, peer, join_message)
            if not self.bundles.exists(verified.node):
                raise _Refused(503, "no bundle rendered for this node yet", pending=True)
            payload = self.bundles.encrypt(verified.node, verified.key)
            if not self.nonces.consume(verified.node, str(body["nonce"]), time.monotonic()):
                raise _Refused(403, "no such challenge (unknown, expired or already used)")
            if self.tokens is not None:
                if not self.tokens(verified.node, str(body.get("token"))):
                    raise _Refused(403, "boot token unknown or already used")
                self._token_keys[verified.node] = (verified.boot_id, verified.key)
        except _Refused as refused:
            return self._refuse(refused, body.get("node"), peer)
        except BundleError as exc:
            log.error("%s: %s", printable(str(body.get("node"))), exc.message)
            return self._refuse(
                _Refused(503, "this node's bundle cannot be packed", pending=True), body.get("node"), peer
            )
        record = self.state.nodes[verified.node]
        record.bundles_served += 1
        record.last_served = now_iso()
        self.state.event(
            EventKind.SERVED, verified.node, peer, f"bundle for boot {verified.boot_id}, {len(payload)} bytes"
        )
        # The report's challenge comes with the bundle: no second round trip for a booting node.
        report_nonce = self.nonces.issue(verified.node, time.monotonic(), ttl=REPORT_NONCE_TTL)
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={"Cache-Control": "no-store", REPORT_NONCE_HEADER: report_nonce},
        )

    async def report(self, request: web.Request) -> web.Response:
        peer = _peer(request)
        body: Mapping[str, object] = {}
        try:
            body = await self._body(request)
            status, step, release = body.get("status"), body.get("step"), body.get("release")
            if status not in tuple(ReportStatus) or not (isinstance(step, str) and _STEP.fullmatch(step)):
                raise _Refused(400, "status must be joined or failed, step a short word")
            if release is not None and not (isinstance(release, str) and _RELEASE.fullmatch(release)):
                raise _Refused(400, "release must be IMAGE/VERSION or empty")
            verified = self._verify(
                body,
                peer,
                lambda node, boot, nonce: report_message(
                    node, boot, nonce, str(status), str(step), None if release is None else str(release)
                ),
            )
            if not self.nonces.consume(verified.node, str(body["nonce"]), time.monotonic()):
                raise _Refused(403, "no such challenge (unknown, expired or already used)")
        except _Refused as refused:
            return self._refuse(refused, body.get("node"), peer)
        self.state.nodes[verified.node].last_report = {
            "status": str(status),
            "step": str(step),
            "boot_id": verified.boot_id,
            "release": str(release or ""),
            "time": now_iso(),
        }
        on = f" on {release}" if release else ""
        self.state.event(EventKind.REPORT, verified.node, peer, f"{status} at {step or '-'}{on}")
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/v1/challenge", self.challenge)
        app.router.add_post("/v1/bundle", self.bundle)
        app.router.add_post("/v1/report", self.report)
        return app

    # -- running ------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Read the consoles, listen, and follow the consoles in the background; the bound address."""
        missing = sorted(set(self.nodes) - set(self.consoles))
        if missing:
            log.warning(
                "no provision_console_log for %d node(s) (%s): they are refused", len(missing), ", ".join(missing[:5])
            )
        self.poll_consoles()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or self.settings.address, self.settings.port if port is None else port)
        await site.start()
        bound = self._runner.addresses[0]  # the port really bound (0 asks for any)
        self.address = (str(bound[0]), int(bound[1]))
        self.state.address, self.state.port = self.address
        self.state.write()
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._write_status())]
        return self.address

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.console_poll)
            self.poll_consoles()

    async def _write_status(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval)
            if self.state.dirty:
                self.state.write()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.state.write()


def serve_forever(site: Site, *, on_ready: Callable[[JoinService], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT (``provision service run``, a systemd unit's foreground process)."""

    async def main() -> None:
        service = JoinService.from_site(site)
        await service.start()
        if on_ready is not None:
            on_ready(service)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await service.stop()

    asyncio.run(main())

"""A contract-test Grendel: a real HTTP server checked against our description of Grendel's API.

Grendel cannot run here (no Go module proxy), so the client is tested against
this server, which

* listens for real on 127.0.0.1 (HTTP or HTTPS) or on a unix socket;
* validates **every request and every response** against the project's own
  description of the API it plays (``tests/contract/grendel-classic.yaml`` for
  the classic API of ClusterFactory's fork 0.8.x and ubccr v0.0.x,
  ``tests/contract/grendel-v0.2.yaml`` for upstream v0.2.x) with openapi-core,
  and records each mismatch in ``violations`` (the test fixtures fail a test
  that leaves any);
* behaves as Grendel's code does. Comments cite the research notes on that
  code (``NOTES §n``; tests/contract/README.md says where they come from).

``disagreements`` compares our descriptions with Grendel's published OpenAPI
specs, where those are at hand (``published_specs``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import socketserver
import ssl
import string
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.request.exceptions import SecurityValidationError

CONTRACT_DIR = Path(__file__).resolve().parent / "contract"
CLASSIC_SPEC = CONTRACT_DIR / "grendel-classic.yaml"
V2_SPEC = CONTRACT_DIR / "grendel-v0.2.yaml"

_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
# api/validator.go: host names are `required,hostname` (RFC 952), NOTES §2.3.
_RFC952 = re.compile(r"^[a-zA-Z]([a-zA-Z0-9\-]+[\.]?)*[a-zA-Z0-9]$")
# Firmware builds of the fork (NOTES §3.1) and of upstream v0.2.
_FIRMWARE_CLASSIC = {
    "ipxe.pxe",
    "ipxe-i386.efi",
    "ipxe-x86_64.efi",
    "snponly-x86_64.efi",
    "undionly.kpxe",
    "ipxe-arm64.efi",
}
_FIRMWARE_V2 = {
    "ipxe.pxe",
    "ipxe-i386.efi",
    "ipxe-x86_64.efi",
    "snponly-x86_64.efi",
    "snponly-arm64.efi",
    "undionly.kpxe",
}


def ksuid() -> str:
    return "".join(secrets.choice(_B62) for _ in range(27))


@functools.cache
def load_spec(path: Path) -> OpenAPI:
    """Our description, itself validated against the OpenAPI 3.0 meta-schema."""
    return OpenAPI.from_file_path(str(path))


class Reject(Exception):
    """An error answer of the fake: status and body."""

    def __init__(self, status: int, body: Any, content_type: str = "application/json") -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


# --------------------------------------------------------------------------
# Grendel's nodeset syntax (NOTES §4; nodeset/nodeset.go, nodeset/rangeset.go)

_RANGE = re.compile(r"(\[[^\[\]]+\]|[0-9]+)")


@dataclass
class _RangeSet:
    values: list[int] = field(default_factory=list)
    pad: int = 0

    @classmethod
    def parse(cls, text: str) -> _RangeSet:
        rs = cls()
        for sub in text.split(","):
            if sub == "":
                raise ValueError("empty range")
            base, step = sub, 1
            if "/" in sub:
                base, _, step_text = sub.partition("/")
                step = int(step_text)
                if "-" not in base:
                    raise ValueError("invalid step usage")
            start_text, _, stop_text = base.partition("-")
            if "-" in base and stop_text == "":
                raise ValueError("no end value")
            if not start_text.isdigit() or (stop_text and not stop_text.isdigit()):
                raise ValueError("not an integer")
            start = int(start_text)
            stop = int(stop_text) if stop_text else start
            pad = 0
            if (start != 0 and start_text.startswith("0")) or (start == 0 and len(start_text) > 1):
                pad = len(start_text)
            if start > stop or step < 1 or stop - start > 100_000:
                raise ValueError("invalid range")
            if pad and not rs.pad:  # the first padded element wins
                rs.pad = pad
            rs.values.extend(v for v in range(start, stop + 1, step) if v not in rs.values)
        return rs

    def strings(self) -> list[str]:
        return [f"{v:0{self.pad}d}" for v in sorted(self.values)]


def expand_nodeset(text: str) -> list[str]:
    """Grendel's expansion; raises ValueError where Grendel answers `invalid nodeset`."""
    text = text.replace(" ", "")
    if text == "":
        return []  # fork/v0.0.x: the empty string is the empty set (NOTES §4)
    ranges = _RANGE.findall(text)
    patterns = _RANGE.sub("%s", text)
    if "[" in patterns or "]" in patterns:
        raise ValueError("unbalanced brackets")
    groups: dict[str, list[list[_RangeSet]]] = {}
    ridx = 0
    for pattern in patterns.split(","):
        if pattern == "":
            raise ValueError("empty element")
        count = pattern.count("%s")
        vector = [_RangeSet.parse(ranges[ridx + i].strip("[]")) for i in range(count)]
        ridx += count
        groups.setdefault(pattern, []).append(vector)
    names: list[str] = []
    for pattern, vectors in groups.items():
        if not vectors[0]:
            names.append(pattern)
            continue
        if len(vectors[0]) == 1:
            # One dimension: Fold() merges all vectors into one RangeSet, so the
            # first padding applies to every member (`cn1,cn01` -> cn01).
            merged = _RangeSet(pad=next((v[0].pad for v in vectors if v[0].pad), 0))
            for vec in vectors:
                merged.values.extend(x for x in vec[0].values if x not in merged.values)
            vectors = [[merged]]
        for vec in vectors:
            combos: list[list[str]] = [[]]
            for rs in vec:
                combos = [[*c, s] for c in combos for s in rs.strings()]
            for combo in combos:
                name = pattern % tuple(combo)
                if name not in names:
                    names.append(name)
    return names


# --------------------------------------------------------------------------
# Grendel's JSON unmarshalling (NOTES §2.2, §3; verified strings)


def parse_mac(value: str) -> str:
    """Go net.ParseMAC; output in lower-case colon form."""
    text = value.strip()
    for sep in (":", "-"):
        parts = text.split(sep)
        if len(parts) in (6, 8, 20) and all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
            return ":".join(p.lower() for p in parts)
    parts = text.split(".")
    if len(parts) in (3, 4, 10) and all(re.fullmatch(r"[0-9A-Fa-f]{4}", p) for p in parts):
        hexes = "".join(parts).lower()
        return ":".join(hexes[i : i + 2] for i in range(0, len(hexes), 2))
    raise Reject(400, {"message": f"address {value}: invalid MAC address"})


def parse_prefix(value: str) -> str:
    """Go netip.ParsePrefix as model/nic.go uses it: the host bits are kept."""
    import ipaddress

    if "/" not in value:
        raise Reject(400, {"message": f"Invalid IPv4 address {value}: netip.ParsePrefix(\"{value}\"): no '/'"})
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise Reject(
            400, {"message": f'Invalid IPv4 address {value}: netip.ParsePrefix("{value}"): bad prefix'}
        ) from None
    return str(iface)


# --------------------------------------------------------------------------
# The server


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, list[str]]
    status: int
    headers: dict[str, str]


class FakeGrendel:
    """One Grendel API (``classic`` or ``v2``) on a real socket; see the module docstring."""

    def __init__(
        self,
        api: str = "classic",
        *,
        spec: Path | None = None,
        socket_path: Path | None = None,
        tls: tuple[Path, Path] | None = None,
        jwt_secret: str | None = None,
    ) -> None:
        assert api in ("classic", "v2")
        self.api = api
        self.spec_path = spec or (CLASSIC_SPEC if api == "classic" else V2_SPEC)
        self.openapi = load_spec(self.spec_path)
        self._spec_raw: dict[str, Any] = read_doc(self.spec_path)
        self.server_url = self._spec_raw["servers"][0]["url"]
        self.socket_path = socket_path
        self.tls = tls
        self.jwt_secret = jwt_secret or secrets.token_hex(16)
        self.hosts: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []
        self.seen: list[Seen] = []
        self._next_id = 1
        self._lock = threading.Lock()
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self.response_hook: Callable[[str, str, int, Any], Any] | None = None

    # -- lifecycle

    @property
    def auth_enabled(self) -> bool:
        # v0.2 skips auth and RBAC on the unix socket (NOTES §6.1).
        return self.api == "v2" and self.socket_path is None

    @property
    def url(self) -> str:
        assert self._server is not None and self.socket_path is None
        host, port = self._server.server_address[:2]  # type: ignore[misc]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> FakeGrendel:
        handler = _make_handler(self)
        server: socketserver.BaseServer
        if self.socket_path is not None:
            server = _UnixHTTPServer(str(self.socket_path), handler)
        else:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            if self.tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # api/server.go: TLS >= 1.2
                ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
                server.socket = ctx.wrap_socket(server.socket, server_side=True)  # type: ignore[attr-defined]
        server.daemon_threads = True  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-grendel", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.socket_path is not None and self.socket_path.exists():
            self.socket_path.unlink()

    def __enter__(self) -> FakeGrendel:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- JWT (v0.2, NOTES §6.1: HS256 with api.secret, claims username/role/exp)

    def make_token(self, username: str = "admin", role: str = "admin", secret: str | None = None) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = b64(json.dumps({"username": username, "role": role}).encode())
        key = (secret or self.jwt_secret).encode()
        sig = b64(hmac.new(key, f"{header}.{claims}".encode(), hashlib.sha256).digest())
        return f"{header}.{claims}.{sig}"

    def _check_token(self, method: str, headers: dict[str, str]) -> dict[str, Any]:
        value = headers.get("authorization", "")
        if not value:
            raise Reject(401, {"title": "Error", "detail": "failed to authenticate"})
        token = value.removeprefix("Bearer ").strip()
        try:
            header, claims, sig = token.split(".")
            expected = hmac.new(self.jwt_secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
            given = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
            if not hmac.compare_digest(expected, given):
                raise ValueError
            data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        except ValueError:
            raise Reject(
                400, {"title": "Error", "status": 400, "detail": "failed to parse token: signature is invalid"}
            ) from None
        if data.get("role") == "read-only" and method != "GET":
            raise Reject(403, {"title": "Error", "status": 403, "detail": "permission denied"})
        return data

    # -- request handling

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, str]:
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        path = unquote(split.path)
        content_type = headers.get("content-type", "")
        self._validate_request(method, split.path, query, headers, body, content_type)
        try:
            with self._lock:
                if self.api == "classic":
                    status, out = self._classic(method, path, query, content_type, body)
                else:
                    if self.auth_enabled and path.startswith("/v1/"):
                        self._check_token(method, headers)
                    status, out = self._v2(method, path, query, content_type, body)
            ctype = "application/json; charset=UTF-8" if self.api == "classic" else "application/json"
        except Reject as rej:
            status, out, ctype = rej.status, rej.body, rej.content_type
            if self.api == "classic" and ctype == "application/json":
                ctype = "application/json; charset=UTF-8"
        if self.response_hook is not None:
            out = self.response_hook(method, path, status, out)
        self.seen.append(Seen(method, path, split.path, query, status, dict(headers)))
        self._validate_response(method, split.path, query, headers, body, content_type, status, out, ctype)
        return status, out, ctype

    # -- validation

    def _mock_request(
        self, method: str, raw_path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes, ctype: str
    ) -> MockRequest:
        base = urlsplit(self.server_url)
        host_url = f"{base.scheme}://{base.netloc}"
        from werkzeug.datastructures import ImmutableMultiDict

        req = MockRequest(host_url, method, raw_path, headers=headers, data=body, content_type=ctype or "")
        req.parameters.query = ImmutableMultiDict([(k, v) for k, vs in query.items() for v in vs])
        return req

    def _validate_request(
        self, method: str, raw_path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes, ctype: str
    ) -> None:
        if raw_path == "/":
            return  # GET / -> {"status":"up"} is in the code, not in the specs (NOTES §2.3)
        req = self._mock_request(method, raw_path, query, headers, body, ctype)
        for err in self.openapi.iter_request_errors(req):
            if isinstance(err, SecurityValidationError) and not self.auth_enabled:
                continue  # v0.2 on the unix socket runs without auth (NOTES §6.1)
            if _is_unknown_route(err):
                continue  # answered 404/405 like Grendel; nothing to validate against
            self.violations.append(f"request {method} {raw_path}: {_describe(err)}")

    def _validate_response(
        self,
        method: str,
        raw_path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
        ctype: str,
        status: int,
        out: Any,
        out_ctype: str,
    ) -> None:
        if raw_path == "/":
            return
        req = self._mock_request(method, raw_path, query, headers, body, ctype)
        operation = self._operation(method, raw_path)
        if operation is None:
            return  # unknown route: Grendel's 404/405, not in any spec
        responses = operation.get("responses", {})
        declared = responses.get(str(status)) or responses.get("default")
        if declared is None:
            self.violations.append(f"response {method} {raw_path}: status {status} is not described")
            return
        data = json.dumps(out).encode()
        resp = MockResponse(data, status_code=status, content_type=out_ctype)
        for err in self.openapi.iter_response_errors(req, resp):
            self.violations.append(f"response {method} {raw_path} {status}: {_describe(err)}")

    def operation_of(self, method: str, raw_path: str) -> str | None:
        """The spec's path template for a request, or None if the spec has no such operation."""
        base_path = urlsplit(self.server_url).path.rstrip("/")
        rel = raw_path[len(base_path) :] if base_path and raw_path.startswith(base_path) else raw_path
        for template, item in self._spec_raw["paths"].items():
            regex = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(regex, rel) and method.lower() in item:
                return str(template)
        return None

    def _operation(self, method: str, raw_path: str) -> dict[str, Any] | None:
        template = self.operation_of(method, raw_path)
        if template is None:
            return None
        op: dict[str, Any] = self._spec_raw["paths"][template][method.lower()]
        return op

    # -- classic API (NOTES §2, §3)

    def _classic(self, method: str, path: str, query: dict[str, list[str]], ctype: str, body: bytes) -> tuple[int, Any]:
        if path == "/" and method == "GET":
            return 200, {"status": "up"}
        # echo routes; the nodeset is the last segment of the decoded path (path.Split)
        routes: list[tuple[str, str]] = [
            ("POST", "/v1/host"),
            ("GET", "/v1/host/list"),
            ("GET", "/v1/host/find/"),
            ("DELETE", "/v1/host/find/"),
            ("GET", "/v1/host/tags/"),
            ("PUT", "/v1/host/tag/"),
            ("PUT", "/v1/host/untag/"),
            ("PUT", "/v1/host/provision/"),
            ("PUT", "/v1/host/unprovision/"),
            ("POST", "/v1/bootimage"),
            ("GET", "/v1/bootimage/list"),
            ("GET", "/v1/bootimage/find/"),
            ("DELETE", "/v1/bootimage/find/"),
        ]
        matches = [
            (m, p)
            for m, p in routes
            if (
                path == p
                if not p.endswith("/")
                else path.startswith(p) and "/" not in path[len(p) :] and path[len(p) :]
            )
        ]
        if not matches:
            raise Reject(404, {"message": "Not Found"})
        route = next((p for m, p in matches if m == method), None)
        if route is None:
            raise Reject(405, {"message": "Method Not Allowed"})
        arg = path[len(route) :]
        if route == "/v1/host":
            return self._classic_store_hosts(ctype, body)
        if route == "/v1/host/list":
            return 200, [self._host_out(self.hosts[k]) for k in sorted(self.hosts)]
        if route == "/v1/host/find/":
            names = self._ns(arg)
            if method == "GET":
                return 200, [self._host_out(self.hosts[n]) for n in names if n in self.hosts]
            if any(n not in self.hosts for n in names):
                # BuntDB transaction: one missing key fails and rolls back everything (NOTES §2.3)
                raise Reject(500, {"message": "failed to delete hosts"})
            for n in names:
                del self.hosts[n]
            return 200, {"hosts": len(names)}
        if route == "/v1/host/tags/":
            tags = [t for t in arg.split(",") if t]
            if not tags:
                raise Reject(400, {"message": "invalid list of tags"})
            return 200, [self._host_out(h) for _, h in sorted(self.hosts.items()) if set(h["tags"] or []) & set(tags)]
        if route in ("/v1/host/tag/", "/v1/host/untag/"):
            names = self._ns(arg)
            tags = [t for t in (query.get("tags") or [""])[0].split(",") if t]
            if not tags:
                raise Reject(400, {"message": "invalid list of tags"})
            present = [n for n in names if n in self.hosts]
            if not present:
                raise Reject(400, {"message": "No hosts found in nodeset"})
            for n in present:
                current = list(self.hosts[n]["tags"] or [])
                if route == "/v1/host/tag/":
                    merged = set(current) | set(tags)  # a Go map: order is random (NOTES §2.3)
                    self.hosts[n]["tags"] = secrets.SystemRandom().sample(sorted(merged), len(merged))
                else:
                    self.hosts[n]["tags"] = [t for t in current if t not in tags]
            return 200, {"hosts": len(names), "tags": tags, "action": "add" if route.endswith("/tag/") else "remove"}
        if route in ("/v1/host/provision/", "/v1/host/unprovision/"):
            names = self._ns(arg)
            present = [n for n in names if n in self.hosts]
            if not present:
                raise Reject(400, {"message": "No hosts found in nodeset"})
            for n in present:
                self.hosts[n]["provision"] = route == "/v1/host/provision/"
            return 200, {"hosts": len(names)}  # the nodeset's size, not hosts touched (NOTES §2.3)
        if route == "/v1/bootimage":
            return self._classic_store_images(ctype, body)
        if route == "/v1/bootimage/list":
            return 200, [self._image_out(self.images[k]) for k in sorted(self.images)]
        if route == "/v1/bootimage/find/":
            image = self.images.get(arg)  # verbatim, case-sensitive lookup (NOTES §2.3)
            if method == "GET":
                if image is None:
                    raise Reject(404, {"message": "image not found"})
                return 200, [self._image_out(image)]  # a one-element list
            if image is None:
                raise Reject(500, {"message": "failed to delete image"})
            del self.images[arg]
            return 200, {"images": 1}
        raise AssertionError(route)

    def _ns(self, text: str) -> list[str]:
        try:
            return expand_nodeset(text)
        except (ValueError, IndexError):
            raise Reject(400, {"message": "invalid nodeset"}) from None

    def _bind_list(self, ctype: str, body: bytes, model: str) -> list[Any]:
        if not ctype.startswith("application/json"):
            raise Reject(400, {"message": "invalid content type"})
        if not body:
            return []  # POST with an empty body binds nothing (NOTES §2.3)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise Reject(400, {"message": f"Syntax error: offset={exc.pos}, error={exc.msg}"}) from None  # type: ignore[attr-defined]
        if not isinstance(data, list):
            got = "object" if isinstance(data, dict) else type(data).__name__
            raise Reject(400, {"message": f"Unmarshal type error: expected={model}, got={got}, field=, offset=1"})
        return data

    def _classic_store_hosts(self, ctype: str, body: bytes) -> tuple[int, Any]:
        docs = self._bind_list(ctype, body, "model.HostList")
        parsed = [self._host_in(d, _FIRMWARE_CLASSIC) for d in docs]
        for host in parsed:
            if not host["name"] or not _RFC952.match(host["name"]):
                raise Reject(400, {"message": "invalid data"})
        for host in parsed:
            name = host["name"].lower()  # StoreHosts lower-cases (NOTES §2.3)
            host["name"] = name
            old = self.hosts.get(name)
            host["id"] = old["id"] if old else ksuid()  # client ids are ignored
            self.hosts[name] = host  # the whole document is replaced
        return 201, {"hosts": len(parsed)}

    def _host_in(self, doc: Any, firmware_builds: set[str]) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise Reject(400, {"message": "Unmarshal type error: expected=model.Host, got=array, field=, offset=1"})
        if "id" in doc and self.api == "classic" and (not isinstance(doc["id"], str) or len(doc["id"]) != 27):
            raise Reject(400, {"message": "valid encoded KSUIDs are 27 characters"})
        firmware = doc.get("firmware") or ""
        if firmware and firmware not in firmware_builds:
            raise Reject(400, {"message": f"Invalid firmware build: {firmware}"})
        nics = []
        for nic in doc.get("interfaces") or []:
            mtu = int(nic.get("mtu") or 0)
            if mtu > 65535:
                raise Reject(
                    400,
                    {
                        "message": f"json: cannot unmarshal number {mtu} into Go struct field NetInterface.mtu of type uint16"
                    },
                )
            nics.append(
                {
                    "id": nic.get("id"),
                    "mac": parse_mac(nic["mac"]) if nic.get("mac") else "",
                    "ip": parse_prefix(nic["ip"]) if nic.get("ip") else "",
                    "ifname": str(nic.get("ifname") or ""),
                    "fqdn": str(nic.get("fqdn") or ""),
                    "bmc": bool(nic.get("bmc")),
                    "vlan": str(nic.get("vlan") or ""),
                    "mtu": mtu,
                }
            )
        return {
            "id": doc.get("id"),
            "uid": doc.get("uid"),
            "firmware": firmware,
            "name": str(doc.get("name") or ""),
            "interfaces": nics,
            "provision": bool(doc.get("provision")),
            "boot_image": str(doc.get("boot_image") or ""),  # not lower-cased (NOTES §2.3)
            "tags": [str(t) for t in doc.get("tags") or []] or None,
        }

    def _host_out(self, host: dict[str, Any]) -> dict[str, Any]:
        # Key order and null/omitted fields as verified in NOTES §3.5.
        nics = []
        for nic in host["interfaces"]:
            out = {k: nic[k] for k in ("mac", "ip", "ifname", "fqdn", "bmc", "vlan")}
            if nic["mtu"]:
                out["mtu"] = nic["mtu"]
            nics.append(out)
        doc: dict[str, Any] = {}
        if host["id"]:
            doc["id"] = host["id"]
        doc.update(
            firmware=host["firmware"],
            name=host["name"],
            interfaces=nics,
            provision=host["provision"],
            boot_image=host["boot_image"],
            tags=host["tags"] or None,  # `null` when the host has no tags (NOTES §3.1)
        )
        return doc

    def _classic_store_images(self, ctype: str, body: bytes) -> tuple[int, Any]:
        docs = self._bind_list(ctype, body, "model.BootImageList")
        for doc in docs:
            if not isinstance(doc, dict) or not doc.get("name") or not doc.get("kernel"):
                raise Reject(400, {"message": "invalid data"})
            if "id" in doc and (not isinstance(doc["id"], str) or len(doc["id"]) != 27):
                raise Reject(400, {"message": "valid encoded KSUIDs are 27 characters"})
        for doc in docs:
            name = str(doc["name"]).lower()  # StoreBootImages lower-cases (NOTES §2.3)
            self.images[name] = {
                # A new random id on every upsert unless a valid one is sent (NOTES §2.3).
                "id": doc.get("id") or ksuid(),
                "name": name,
                "kernel": doc["kernel"],
                "initrd": list(doc["initrd"]) if doc.get("initrd") is not None else None,
                "liveimg": doc.get("liveimg") or "",
                "cmdline": doc.get("cmdline") or "",
                "verify": bool(doc.get("verify")),
                "provision_template": doc.get("provision_template") or "",
                "provision_templates": doc.get("provision_templates") or None,
                "user_data": doc.get("user_data") or "",
                "butane": doc.get("butane") or "",
            }
        return 201, {"images": len(docs)}

    def _image_out(self, image: dict[str, Any]) -> dict[str, Any]:
        if self.api == "classic":
            return dict(image)  # key order of NOTES §3.5; initrd/provision_templates may be null
        return {
            "id": image["id"],
            "uid": image["uid"],
            "name": image["name"],
            "kernel": image["kernel"],
            "initrd": list(image["initrd"] or []),  # v0.2: [] not null (NOTES §6.4)
            "liveimg": "",  # v0.2 does not persist liveimg (NOTES §6.4, inferred)
            "cmdline": image["cmdline"],
            "verify": image["verify"],
            "provision_templates": dict(image["provision_templates"] or {}),
        }

    # -- v0.2 API (NOTES §6)

    def _v2_error(self, status: int, detail: str) -> Reject:
        return Reject(status, {"title": "Error", "status": status, "detail": detail})

    def _generic(self, detail: str, changed: int) -> dict[str, Any]:
        return {"title": "Success", "detail": detail, "changed": changed}

    def _v2_select(self, query: dict[str, list[str]]) -> list[str]:
        nodeset = (query.get("nodeset") or [""])[0]
        tags = [t for t in (query.get("tags") or [""])[0].split(",") if t]
        names = list(self.hosts)  # rowid order
        if nodeset:
            try:
                wanted = set(expand_nodeset(nodeset))
            except (ValueError, IndexError):
                raise self._v2_error(500, "failed to parse nodeset") from None
            names = [n for n in names if n in wanted]
        if tags:
            names = [n for n in names if set(self.hosts[n]["tags"] or []) & set(tags)]  # OR (FindTags)
        return names

    def _v2(self, method: str, path: str, query: dict[str, list[str]], ctype: str, body: bytes) -> tuple[int, Any]:
        def payload() -> Any:
            try:
                return json.loads(body or b"null")
            except ValueError:
                raise self._v2_error(500, "failed to parse body") from None  # fuego: 500 (NOTES §6.2)

        route = (method, path)
        if route == ("GET", "/v1/nodes"):
            return 200, [self._host_out_v2(self.hosts[n]) for n in self.hosts]
        if route == ("GET", "/v1/nodes/find"):
            return 200, [self._host_out_v2(self.hosts[n]) for n in self._v2_select(query)]
        if route == ("POST", "/v1/nodes"):
            return 200, self._v2_store_hosts(payload())
        if route == ("DELETE", "/v1/nodes"):
            if not query.get("nodeset") and not query.get("tags"):
                raise self._v2_error(500, "nodeset or tags required")
            names = self._v2_select(query)
            for n in names:
                del self.hosts[n]
            return 200, self._generic("successfully deleted nodes", len(names))
        if route == ("PATCH", "/v1/nodes/provision"):
            data = payload()
            names = self._v2_select(query)
            for n in names:
                self.hosts[n]["provision"] = bool(data.get("provision"))
            return 200, self._generic("successfully updated nodes", len(names))
        if method == "PATCH" and path.startswith("/v1/nodes/tags/"):
            action = path.rsplit("/", 1)[1]
            if action not in ("add", "remove"):
                raise self._v2_error(500, "invalid action")
            tags = [t for t in str(payload().get("tags") or "").split(",") if t]
            names = self._v2_select(query)
            for n in names:
                current = list(self.hosts[n]["tags"] or [])
                self.hosts[n]["tags"] = (
                    current + [t for t in tags if t not in current]
                    if action == "add"
                    else [t for t in current if t not in tags]
                )
            return 200, self._generic("successfully updated tags", len(names))
        if route == ("GET", "/v1/images"):
            return 200, [self._image_out(i) for i in self.images.values()]
        if route == ("GET", "/v1/images/find"):
            names = [n for n in (query.get("names") or [""])[0].split(",") if n]
            return 200, [self._image_out(self.images[n]) for n in names if n in self.images]
        if route == ("POST", "/v1/images"):
            return 200, self._v2_store_images(payload())
        if route == ("DELETE", "/v1/images"):
            # The handler reads the query parameter `name`, not the spec's `names` (NOTES §6.3).
            names = [n for n in (query.get("name") or [""])[0].split(",") if n]
            for n in names:
                self.images.pop(n, None)
            return 200, self._generic("successfully deleted images", len(names))
        if path in ("/v1/nodes", "/v1/nodes/find", "/v1/images", "/v1/images/find", "/v1/nodes/provision"):
            raise Reject(405, "Method Not Allowed\n", "text/plain; charset=utf-8")
        raise Reject(404, "404 page not found\n", "text/plain; charset=utf-8")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _v2_store_hosts(self, data: Any) -> dict[str, Any]:
        nodes = (data or {}).get("node_list") or []
        staged = dict(self.hosts)
        by_id = {h["id"]: n for n, h in staged.items()}
        for doc in nodes:
            host = self._host_in(doc, _FIRMWARE_V2)
            if host["boot_image"] and host["boot_image"] not in self.images:
                # boot_image must reference an existing image; the batch fails (NOTES §6.4)
                raise self._v2_error(500, "failed to add nodes: FOREIGN KEY constraint failed")
            if isinstance(host["id"], int) and host["id"] in by_id:
                old_name = by_id[host["id"]]
                old = staged.pop(old_name)
                old_nic_ids = {nic["id"] for nic in old["interfaces"]}
                for nic in host["interfaces"]:  # NICs upsert by id; unlisted NICs are deleted
                    if nic["id"] not in old_nic_ids:
                        nic["id"] = self._new_id()
                host["uid"] = old["uid"]
            else:
                if host["name"] in staged:
                    # `on conflict (id)` with a UNIQUE name: re-posting without the id fails (NOTES §6.4, inferred)
                    raise self._v2_error(500, "failed to add nodes: UNIQUE constraint failed: nodes.name")
                host["id"] = self._new_id()
                host["uid"] = ksuid()
                for nic in host["interfaces"]:
                    nic["id"] = self._new_id()
            staged[host["name"]] = host  # names are not lower-cased in v0.2 (NOTES §6.4)
            by_id[host["id"]] = host["name"]
        self.hosts = staged
        return self._generic("successfully added nodes", len(nodes))

    def _host_out_v2(self, host: dict[str, Any]) -> dict[str, Any]:
        nics = []
        for nic in host["interfaces"]:
            out = {k: nic[k] for k in ("id", "mac", "ip", "ifname", "fqdn", "bmc", "vlan")}
            if nic["mtu"]:
                out["mtu"] = nic["mtu"]
            nics.append(out)
        return {
            "id": host["id"],
            "uid": host["uid"],
            "name": host["name"],
            "provision": host["provision"],
            "firmware": host["firmware"],
            "boot_image": host["boot_image"],
            "interfaces": nics,
            "bonds": [],
            # node_view: concat_ws(':', key, value) with an empty value -> "ib:" (NOTES §6.4, inferred)
            "tags": [f"{t}:" for t in host["tags"] or []],
        }

    def _v2_store_images(self, data: Any) -> dict[str, Any]:
        images = (data or {}).get("boot_images") or []
        staged = dict(self.images)
        by_id = {i["id"]: n for n, i in staged.items()}
        for doc in images:
            if not doc.get("name") or not doc.get("kernel"):
                raise self._v2_error(500, "failed to add images: name and kernel are required")
            name = str(doc["name"])
            if isinstance(doc.get("id"), int) and doc["id"] in by_id:
                old = staged.pop(by_id[doc["id"]])
                image_id, uid = old["id"], old["uid"]
            elif name in staged:
                raise self._v2_error(500, "failed to add images: UNIQUE constraint failed: kernels.name")
            else:
                image_id, uid = self._new_id(), ksuid()
            staged[name] = {
                "id": image_id,
                "uid": uid,
                "name": name,
                "kernel": doc["kernel"],
                "initrd": list(doc.get("initrd") or []),
                "cmdline": doc.get("cmdline") or "",
                "verify": bool(doc.get("verify")),
                "provision_templates": dict(doc.get("provision_templates") or {}),
            }
            by_id[image_id] = name
        self.images = staged
        return self._generic("successfully added images", len(images))


@functools.cache
def read_doc(path: Path) -> dict[str, Any]:
    """An OpenAPI document (JSON or YAML) as data."""
    import yaml

    text = path.read_text()
    data: dict[str, Any] = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data


# --------------------------------------------------------------------------
# Our description against Grendel's published OpenAPI specs

#: Marks an item of our description that Grendel's published spec lacks; the value says why.
NOT_PUBLISHED = "x-not-in-published-spec"
#: A directory holding Grendel's published specs (openapi-*.json / .yaml), if not ../shared/grendel.
PUBLISHED_SPECS_ENV = "GRENDEL_PUBLISHED_SPECS"
_METHODS = ("get", "put", "post", "delete", "patch")


def published_specs() -> list[tuple[Path | None, Path]]:
    """(our description, Grendel's published spec) for each published spec at hand.

    They are looked for in ``$GRENDEL_PUBLISHED_SPECS``, else in
    ``../shared/grendel`` beside the checkout (beside the main checkout for a
    git worktree). None there: an empty list. A published spec of an API we do
    not describe comes with ``None``.
    """
    env = os.environ.get(PUBLISHED_SPECS_ENV)
    if env:
        if not Path(env).is_dir():
            raise FileNotFoundError(f"{PUBLISHED_SPECS_ENV}={env}: no such directory")
        folder: Path | None = Path(env)
    else:
        root = CONTRACT_DIR.parent.parent
        candidates = [root.parent / "shared" / "grendel"]
        main = _main_checkout(root)
        if main is not None:
            candidates.append(main.parent / "shared" / "grendel")
        folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        return []
    found = sorted(p for p in folder.iterdir() if p.name.startswith("openapi") and p.suffix in (".json", ".yaml"))
    pairs: list[tuple[Path | None, Path]] = []
    for path in found:
        ours = CLASSIC_SPEC if path.name.startswith("openapi-classic") else None
        ours = V2_SPEC if path.name.startswith("openapi-v0.2") else ours
        pairs.append((ours, path))
    return pairs


def _main_checkout(root: Path) -> Path | None:
    """The main checkout of a git worktree (its .git is a file naming the worktree's git dir)."""
    dot_git = root / ".git"
    if not dot_git.is_file():
        return None
    gitdir = Path(dot_git.read_text().removeprefix("gitdir:").strip())
    commondir = gitdir / "commondir"
    if not commondir.is_file():
        return None
    common = (gitdir / commondir.read_text().strip()).resolve()
    return common.parent if common.name == ".git" else None


def disagreements(ours: dict[str, Any], published: dict[str, Any]) -> list[str]:
    """Where our description and a published spec disagree.

    Every path, method, parameter, request body, response and schema field of
    ours must be in the published spec with the same type, unless marked
    ``x-not-in-published-spec``; a marked item must really be absent there.
    Published items we do not describe are not our concern. ``nullable`` and
    ``required`` are not compared (the classic spec is silent on both).
    """
    check = _Agreement(ours, published)
    check.run()
    return check.problems


class _Agreement:
    def __init__(self, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        self.ours = ours
        self.theirs = theirs
        self.problems: list[str] = []

    def run(self) -> None:
        their_paths = {_base_path(self.theirs) + t: item for t, item in self.theirs.get("paths", {}).items()}
        for template, item in self.ours["paths"].items():
            path = _base_path(self.ours) + template
            their_item = their_paths.get(path)
            if their_item is None:
                self.problems.append(f"{path}: not in the published spec")
                continue
            for method in _METHODS:
                if method in item:
                    self._operation(f"{method.upper()} {path}", item, item[method], their_item, their_item.get(method))

    def _operation(
        self, where: str, item: dict[str, Any], op: dict[str, Any], their_item: dict[str, Any], their_op: Any
    ) -> None:
        if their_op is None:
            self.problems.append(f"{where}: no such operation in the published spec")
            return
        theirs = {(p["name"], p["in"]): p for p in self._params(self.theirs, their_item, their_op)}
        for param in self._params(self.ours, item, op):
            name = f"{where} parameter {param['in']} {param['name']}"
            their = theirs.get((param["name"], param["in"]))
            if self._present(name, param, their):
                self._schema(name, param.get("schema", {}), their.get("schema"))
        if "requestBody" in op:
            body = self._ref(self.ours, op["requestBody"])
            their_body = self._ref(self.theirs, their_op.get("requestBody"))
            if self._present(f"{where} request body", body, their_body):
                self._content(f"{where} request body", body, their_body)
        their_responses = their_op.get("responses", {})
        for status, response in op.get("responses", {}).items():
            name = f"{where} response {status}"
            response = self._ref(self.ours, response)
            their = self._ref(self.theirs, their_responses.get(status) or their_responses.get("default"))
            if NOT_PUBLISHED in response:
                # Marked: the published spec has no such status, or none of its body.
                if their is not None and any(m.get("schema") for m in their.get("content", {}).values()):
                    self.problems.append(f"{name}: marked {NOT_PUBLISHED} but the published spec has it")
            elif their is None:
                self.problems.append(f"{name}: not in the published spec")
            else:
                self._content(name, response, their)
        for requirement in op.get("security", self.ours.get("security", [])):
            for scheme in requirement:
                ours_scheme = self.ours["components"]["securitySchemes"][scheme]
                their_scheme = self.theirs.get("components", {}).get("securitySchemes", {}).get(scheme)
                their_reqs = their_op.get("security", self.theirs.get("security")) or []
                if their_scheme is None or not any(scheme in r for r in their_reqs):
                    self.problems.append(f"{where}: security scheme {scheme} not in the published spec")
                elif (ours_scheme.get("type"), ours_scheme.get("scheme")) != (
                    their_scheme.get("type"),
                    their_scheme.get("scheme"),
                ):
                    self.problems.append(f"{where}: security scheme {scheme} differs from the published one")

    def _params(self, doc: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._ref(doc, p) for p in [*item.get("parameters", []), *op.get("parameters", [])]]

    def _content(self, where: str, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        for media, body in ours.get("content", {}).items():
            their = theirs.get("content", {}).get(media)
            if their is None or "schema" not in their:
                self.problems.append(f"{where} {media}: not in the published spec")
            else:
                self._schema(f"{where} {media}", body.get("schema", {}), their["schema"])

    def _present(self, where: str, ours: dict[str, Any], theirs: Any) -> bool:
        """Whether to compare further: the item is there and not marked (a wrong mark is a problem)."""
        if NOT_PUBLISHED in ours:
            if theirs is not None:
                self.problems.append(f"{where}: marked {NOT_PUBLISHED} but the published spec has it")
            return False
        if theirs is None:
            self.problems.append(f"{where}: not in the published spec")
            return False
        return True

    def _schema(self, where: str, ours: dict[str, Any], theirs: Any) -> None:
        ours = self._ref(self.ours, ours)
        theirs = self._ref(self.theirs, theirs)
        if not self._present(where, ours, theirs):
            return
        their_types = _types(theirs)
        if not their_types and not theirs.get("properties") and "items" not in theirs:
            return  # the published spec allows any value here
        if _types(ours) and their_types and _types(ours) != their_types:
            self.problems.append(
                f"{where}: type {'/'.join(sorted(_types(ours)))} here, "
                f"{'/'.join(sorted(their_types))} in the published spec"
            )
            return
        for name, sub in ours.get("properties", {}).items():
            self._schema(f"{where}.{name}", sub, theirs.get("properties", {}).get(name))
        if "items" in ours:
            self._schema(f"{where}[]", ours["items"], theirs.get("items"))
        extra = ours.get("additionalProperties")
        if isinstance(extra, dict) and isinstance(theirs.get("additionalProperties"), dict):
            self._schema(f"{where}{{*}}", extra, theirs["additionalProperties"])

    @staticmethod
    def _ref(doc: dict[str, Any], node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            target: Any = doc
            for part in str(node["$ref"]).removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node


def _base_path(doc: dict[str, Any]) -> str:
    servers = doc.get("servers") or [{"url": ""}]
    return urlsplit(str(servers[0]["url"])).path.rstrip("/")


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, list):
        return {str(k) for k in kind} - {"null"}
    return {str(kind)} if kind else set()


def _is_unknown_route(err: Exception) -> bool:
    name = type(err).__name__
    return name in ("PathNotFound", "OperationNotFound", "ServerNotFound")


def _describe(err: Exception) -> str:
    parts = [f"{type(err).__name__}: {err}"]
    cause = err.__cause__
    if cause is not None:
        parts.append(str(cause))
        for sub in getattr(cause, "schema_errors", []) or []:
            parts.append(f"- {getattr(sub, 'message', sub)}")
    return " ".join(parts)[:2000]


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def _make_handler(fake: FakeGrendel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fake-grendel"
        disable_nagle_algorithm = (
            fake.socket_path is None
        )  # TCP: one small answer per request: no 40 ms delayed-ACK stalls

        def address_string(self) -> str:
            return "unix" if not isinstance(self.client_address, tuple) else str(self.client_address[0])

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, out, ctype = fake.handle(self.command, self.path, headers, body)
            except Exception as exc:  # a bug in the fake: make it loud
                fake.violations.append(f"fake crashed on {self.command} {self.path}: {exc!r}")
                status, out, ctype = 500, {"message": "fake crashed"}, "application/json"
            data = out.encode() if isinstance(out, str) else (json.dumps(out) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    return Handler


def names_of(docs: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(d["name"] for d in docs)

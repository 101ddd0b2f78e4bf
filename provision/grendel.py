"""A client for Grendel's REST API, classic and v0.2.

Two API generations are in use (their contract as provision uses it: tests/contract/):

* **classic** — ubccr/grendel v0.0.x and the SquareFactory fork 0.8.x that
  ClusterFactory deploys: ``/v1/host…``, ``/v1/bootimage…``, no auth, usually
  over a unix socket;
* **v2** — ubccr/grendel v0.2.x: ``/v1/nodes…``, ``/v1/images…``, a JWT bearer
  token on TCP (none on the unix socket).

``GrendelClient`` speaks either (``api=auto`` probes the server) over a unix
socket (requests-unixsocket2) or HTTP(S). It exchanges Grendel documents in the
*classic* JSON shape, which is also what Grendel's file loader and the
ClusterFactory Helm chart take (``hosts.json``/``images.json``); the v2 side
converts. Everything sent is normalised (lower-case names, lower-case colon
MACs, CIDR addresses) and everything received is cleaned (``null`` lists,
v2's ``tag:`` suffix), because Grendel itself lower-cases names on store but
looks them up case-sensitively.

The token is read from the environment variable named by
``provision_grendel_token_env`` when a request needs it and is only ever put in
the ``Authorization`` header: never logged, never in an exception.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast
from urllib.parse import quote

import requests
import urllib3

from provision.boot.base import (
    BootHost,
    BootImage,
    address_of,
    check_host_name,
    check_image_name,
    config_flag,
    normalize_cidr,
    normalize_mac,
)
from provision.errors import BootError

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "PROVISION_GRENDEL_TOKEN"
DEFAULT_REPO_DIR = "/var/lib/grendel"
#: A live-image command line that works on the fork and on upstream: no sprig
#: functions (only the fork has them), dracut accepts ``BOOTIF=aa:bb:…``.
DEFAULT_CMDLINE = (
    "root=live:{{ $.endpoints.LiveImageURL }} BOOTIF={{ $.nic.MAC }} ip=dhcp rd.neednet=1 "
    "rd.live.overlay.readonly=1 rd.live.overlay.overlayfs=1 console=ttyS0,115200 console=tty0"
)
#: iPXE builds a host may name in ``firmware`` (fork 0.8.x and upstream).
FIRMWARE_BUILDS = frozenset(
    {
        "ipxe.pxe",
        "ipxe-i386.efi",
        "ipxe-x86_64.efi",
        "snponly-x86_64.efi",
        "undionly.kpxe",
        "ipxe-arm64.efi",
        "snponly-arm64.efi",
    }
)
# Longest nodeset put into one URL path segment or query value.
_MAX_NODESET_CHARS = 1500
_DIGITS = re.compile(r"[0-9]+")


class GrendelApi(StrEnum):
    AUTO = "auto"
    CLASSIC = "classic"
    V2 = "v2"


class GrendelError(BootError):
    """Grendel refused a request or could not be reached."""

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


# --------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class GrendelSettings:
    """Where Grendel is and how to talk to it (inventory ``provision_grendel_*``)."""

    url: str | None = None
    socket: Path | None = None
    api: GrendelApi = GrendelApi.AUTO
    token_env: str = DEFAULT_TOKEN_ENV
    ca_file: str | None = None
    tls_verify: bool = True
    timeout: float = 30.0
    firmware: str | None = None
    domain: str | None = None
    repo_dir: str = DEFAULT_REPO_DIR
    insecure_http: bool = False  # send the bearer token over plain http:// to a non-loopback server

    def __post_init__(self) -> None:
        if self.url and self.socket:
            raise GrendelError(
                "provision_grendel_url and provision_grendel_socket are both set",
                hint="set only one: the unix socket (as ClusterFactory runs it) or the URL of a TCP API",
            )
        if self.url:
            url = self.url.rstrip("/")
            url = url.removesuffix("/v1")
            if not re.match(r"^https?://[^/]+$", url):
                raise GrendelError(
                    f"provision_grendel_url: {self.url!r} is not an http(s) URL of a server",
                    hint="write e.g. http://grendel.example.com:6667 (without a path)",
                )
            object.__setattr__(self, "url", url)
        if self.firmware and self.firmware not in FIRMWARE_BUILDS:
            raise GrendelError(
                f"provision_grendel_firmware: unknown iPXE build {self.firmware!r}",
                hint="use one of: " + ", ".join(sorted(FIRMWARE_BUILDS)),
            )
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.token_env):
            raise GrendelError(
                f"provision_grendel_token_env: {self.token_env!r} is not an environment variable name",
                hint="name the variable that holds the token, e.g. PROVISION_GRENDEL_TOKEN",
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GrendelSettings:
        api_raw = str(config.get("provision_grendel_api") or "auto").lower()
        try:
            api = GrendelApi(api_raw)
        except ValueError:
            raise GrendelError(
                f"provision_grendel_api: unknown API {api_raw!r}", hint="use one of: auto, classic, v2"
            ) from None
        timeout_raw = config.get("provision_grendel_timeout", 30)
        try:
            timeout = float(timeout_raw)
            if timeout <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise GrendelError(
                f"provision_grendel_timeout: {timeout_raw!r} is not a positive number of seconds",
                hint="use e.g. 30",
            ) from None
        socket = config.get("provision_grendel_socket")
        return cls(
            url=str(config["provision_grendel_url"]) if config.get("provision_grendel_url") else None,
            socket=Path(str(socket)) if socket else None,
            api=api,
            token_env=str(config.get("provision_grendel_token_env") or DEFAULT_TOKEN_ENV),
            ca_file=str(config["provision_grendel_ca_file"]) if config.get("provision_grendel_ca_file") else None,
            tls_verify=config_flag(config, "provision_grendel_tls_verify", True),
            timeout=timeout,
            firmware=str(config["provision_grendel_firmware"]) if config.get("provision_grendel_firmware") else None,
            domain=str(config["provision_grendel_domain"]) if config.get("provision_grendel_domain") else None,
            repo_dir=str(config.get("provision_grendel_repo_dir") or DEFAULT_REPO_DIR),
            insecure_http=config_flag(config, "provision_grendel_insecure_http", False),
        )

    def require_endpoint(self) -> None:
        """Raise unless the API's socket or URL is configured."""
        if not self.url and not self.socket:
            raise GrendelError(
                "Grendel's API is not configured",
                hint="set provision_grendel_socket (e.g. /var/run/grendel/grendel-api.socket) "
                "or provision_grendel_url (e.g. http://grendel:6667) in group_vars",
            )

    @property
    def where(self) -> str:
        """Where the API is, for messages: ``unix socket /path`` or the URL."""
        return f"unix socket {self.socket}" if self.socket else str(self.url)

    @property
    def base_url(self) -> str:
        if self.socket:
            return "http+unix://" + quote(str(self.socket), safe="")
        return str(self.url)


# --------------------------------------------------------------------------
# Normalisation of Grendel documents (classic shape)


def normalize_host_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A Host document ready to send: lower-case names, MAC and CIDR forms, no empty id."""
    out = {k: v for k, v in doc.items() if k not in ("id", "uid")}
    out["name"] = check_host_name(str(doc.get("name", "")))
    if out.get("boot_image"):
        out["boot_image"] = check_image_name(str(out["boot_image"]))
    firmware = out.get("firmware")
    if firmware and firmware not in FIRMWARE_BUILDS:
        raise GrendelError(
            f"{out['name']}: unknown firmware {firmware!r}", hint="use one of: " + ", ".join(sorted(FIRMWARE_BUILDS))
        )
    nics = []
    for nic in doc.get("interfaces") or []:
        nic = {k: v for k, v in nic.items() if k != "id"}
        if nic.get("mac"):
            nic["mac"] = normalize_mac(str(nic["mac"]), field_name=f"{out['name']}: mac")
        else:
            nic.pop("mac", None)
        if nic.get("ip"):
            if "/" not in str(nic["ip"]):
                raise GrendelError(
                    f"{out['name']}: ip {nic['ip']!r} has no prefix length",
                    hint="Grendel wants interface addresses in CIDR form, e.g. 10.10.1.11/16",
                )
            nic["ip"] = normalize_cidr(str(nic["ip"]), field_name=f"{out['name']}: ip")
        else:
            nic.pop("ip", None)
        nics.append(nic)
    out["interfaces"] = nics
    out["tags"] = sorted({str(t) for t in doc.get("tags") or []})
    return out


def clean_host_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A Host document as received, with ``null`` lists made empty."""
    out = dict(doc)
    out["interfaces"] = [dict(n) for n in doc.get("interfaces") or [] if n]
    out["tags"] = [str(t) for t in doc.get("tags") or []]
    if "bonds" in out:
        out["bonds"] = list(doc.get("bonds") or [])
    return out


def normalize_image_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in ("uid",) and v is not None}
    if not out.get("id"):
        out.pop("id", None)
    out["name"] = check_image_name(str(doc.get("name", "")))
    if not out.get("kernel"):
        raise GrendelError(f"image {out['name']}: kernel is empty", hint="give the kernel's path on the Grendel host")
    out["initrd"] = [str(i) for i in doc.get("initrd") or []]
    return out


def clean_image_doc(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["initrd"] = [str(i) for i in doc.get("initrd") or []]
    if "provision_templates" in out:
        out["provision_templates"] = dict(doc.get("provision_templates") or {})
    return out


def host_to_doc(host: BootHost, *, firmware: str | None = None, domain: str | None = None) -> dict[str, Any]:
    """A BootHost as a classic Host document (API and ``hosts.json``)."""
    fqdn = f"{host.name}.{domain}" if domain else host.name
    nics: list[dict[str, Any]] = []
    for i, mac in enumerate(host.macs):
        nic: dict[str, Any] = {"mac": mac}
        if i < len(host.ips):
            nic["ip"] = host.ips[i]
        nic["fqdn"] = fqdn if i == 0 else ""
        nic["bmc"] = False
        nics.append(nic)
    if host.bmc_address:
        bmc: dict[str, Any] = {"bmc": True}
        try:
            bmc["ip"] = normalize_cidr(host.bmc_address)  # an address: a /32 (ClusterFactory's form)
        except BootError:
            bmc["fqdn"] = host.bmc_address.lower()  # a host name
        nics.append(bmc)
    doc: dict[str, Any] = {
        "name": host.name,
        "provision": host.provision,
        "boot_image": host.image or "",
        "interfaces": nics,
        "tags": list(host.tags),
    }
    if firmware:
        doc["firmware"] = firmware
    return doc


def host_from_doc(doc: Mapping[str, Any]) -> BootHost:
    """A (cleaned) Host document as a BootHost."""
    doc = clean_host_doc(doc)
    boot = [n for n in doc["interfaces"] if not n.get("bmc")]
    bmcs = [n for n in doc["interfaces"] if n.get("bmc")]
    bmc_address = None
    if bmcs:
        bmc_address = address_of(bmcs[0]["ip"]) if bmcs[0].get("ip") else (bmcs[0].get("fqdn") or None)
    return BootHost(
        name=str(doc["name"]),
        macs=tuple(str(n["mac"]) for n in boot if n.get("mac")),
        ips=tuple(str(n["ip"]) for n in boot if n.get("ip")),
        bmc_address=bmc_address,
        image=str(doc.get("boot_image") or "") or None,
        tags=tuple(doc["tags"]),
        provision=bool(doc.get("provision")),
    )


def image_to_doc(image: BootImage) -> dict[str, Any]:
    """A BootImage as a classic BootImage document (API and ``images.json``)."""
    doc: dict[str, Any] = {
        "name": image.name,
        "kernel": image.kernel,
        "initrd": list(image.initrds),
        "cmdline": image.cmdline,
    }
    if image.squashfs:
        doc["liveimg"] = image.squashfs
    return doc


def image_from_doc(doc: Mapping[str, Any]) -> BootImage:
    doc = clean_image_doc(doc)
    return BootImage(
        name=str(doc["name"]),
        kernel=str(doc.get("kernel") or ""),
        initrds=tuple(doc["initrd"]),
        squashfs=str(doc.get("liveimg") or "") or None,
        cmdline=str(doc.get("cmdline") or ""),
    )


# --------------------------------------------------------------------------
# Nodesets


def _pad_of(digits: str) -> int:
    """Grendel's padding rule for one number (nodeset/rangeset.go)."""
    if int(digits) != 0:
        return len(digits) if digits.startswith("0") else 0
    return len(digits) if len(digits) > 1 else 0


def nodeset_batches(names: Iterable[str], max_chars: int = _MAX_NODESET_CHARS) -> Iterator[str]:
    """Comma-joined nodesets that Grendel expands back to exactly ``names``.

    Grendel groups a nodeset's names by pattern (digit runs replaced) and
    gives each number position of a group one zero-padding, the first padded
    width it meets (NOTES §4). So ``cn1,cn01`` means just ``cn01`` to Grendel.
    A name goes into a batch only if every number keeps its digits under the
    batch's padding; long lists are split to keep URLs short.
    """
    batches: list[_Batch] = []
    for name in dict.fromkeys(names):
        for batch in batches:
            if batch.add(name, max_chars):
                break
        else:
            batch = _Batch()
            batch.add(name, max_chars=10**9)
            batches.append(batch)
    for batch in batches:
        yield ",".join(batch.names)


class _Batch:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.size = 0
        # (pattern, position) -> digit strings seen there
        self.numbers: dict[tuple[str, int], list[str]] = {}

    def add(self, name: str, max_chars: int) -> bool:
        if self.names and self.size + len(name) + 1 > max_chars:
            return False
        pattern = _DIGITS.sub("%s", name)
        found = _DIGITS.findall(name)
        for pos, digits in enumerate(found):
            seen = [*self.numbers.get((pattern, pos), []), digits]
            pads = {_pad_of(d) for d in seen} - {0}
            if len(pads) > 1 or (pads and any(len(d) < max(pads) for d in seen)):
                return False
        for pos, digits in enumerate(found):
            self.numbers.setdefault((pattern, pos), []).append(digits)
        self.names.append(name)
        self.size += len(name) + 1
        return True


# --------------------------------------------------------------------------
# Transport


class _Payload(TypedDict, total=False):
    """What a request carries besides its method and path."""

    params: Mapping[str, str] | None  # the query
    body: Any  # sent as JSON


class _Transport:
    """HTTP over a unix socket or TCP/TLS, with Grendel's errors made readable."""

    def __init__(self, settings: GrendelSettings, session: requests.Session | None = None) -> None:
        settings.require_endpoint()
        self.settings = settings
        if session is None:
            if settings.socket:
                import requests_unixsocket

                session = requests_unixsocket.Session()  # type: ignore[no-untyped-call]
            else:
                session = requests.Session()
        self.session = session
        self.session.trust_env = False  # no proxies from the environment for Grendel
        self.insecure = False
        if settings.url and settings.url.startswith("https://"):
            self.session.verify = settings.ca_file if settings.ca_file else settings.tls_verify
            self.insecure = not settings.ca_file and not settings.tls_verify
            if self.insecure:
                log.warning(
                    "grendel: not checking the TLS certificate of %s (provision_grendel_tls_verify)", settings.url
                )

    def close(self) -> None:
        self.session.close()

    def _check_token_transport(self) -> None:
        """The bearer token goes over TLS, a unix socket or loopback; plain http:// elsewhere only when the site says so."""
        url = self.settings.url or ""
        if not url.startswith("http://") or self.settings.insecure_http:
            return
        host = urllib.parse.urlsplit(url).hostname or ""
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                return
        if host == "localhost":
            return
        raise GrendelError(
            f"refusing to send the Grendel API token to {url} over plain HTTP (anyone on the path can read it)",
            hint="use an https:// provision_grendel_url (or the unix socket), or set "
            "provision_grendel_insecure_http: true for a network nobody else can reach",
        )

    def token(self) -> str | None:
        value = os.environ.get(self.settings.token_env)
        return value.strip() if value and value.strip() else None

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        auth: bool = False,
    ) -> requests.Response:
        headers = {"Accept": "application/json"}
        if auth and not self.settings.socket:
            token = self.token()
            if token:
                self._check_token_transport()
                headers["Authorization"] = f"Bearer {token}"
        url = self.settings.base_url + path
        log.debug("grendel: %s %s", method, path)
        try:
            with warnings.catch_warnings():
                if self.insecure:  # said once above, not on every request
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                return self.session.request(
                    method,
                    url,
                    params=params,
                    json=body,
                    headers=headers,
                    timeout=self.settings.timeout,
                    allow_redirects=False,
                )
        except requests.exceptions.SSLError as exc:
            raise GrendelError(
                f"Grendel at {self.settings.where}: TLS failed ({_reason(exc)})",
                hint="set provision_grendel_ca_file to the CA that signed Grendel's certificate",
            ) from None
        except requests.exceptions.Timeout:
            raise GrendelError(
                f"Grendel at {self.settings.where} did not answer within {self.settings.timeout:g} s",
                hint="check that Grendel runs; raise provision_grendel_timeout if it is just slow",
            ) from None
        except (requests.exceptions.ConnectionError, OSError) as exc:
            raise GrendelError(
                f"Grendel is not reachable at {self.settings.where} ({_reason(exc)})",
                hint="check that Grendel runs and that provision_grendel_socket / provision_grendel_url point at its API",
            ) from None


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection error, without URLs or headers."""
    seen = exc
    while True:
        nxt = seen.__cause__ or seen.__context__ or (seen.args[0] if seen.args else None)
        if isinstance(nxt, BaseException) and nxt is not seen:
            seen = nxt
            continue
        break
    if isinstance(seen, OSError) and seen.strerror:
        return seen.strerror.lower()
    text = str(seen)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip().lower()
    return type(seen).__name__


def _json(resp: requests.Response, settings: GrendelSettings) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise GrendelError(
            f"Grendel at {settings.where} sent a non-JSON answer to {resp.request.method} "
            f"{_path(resp)} (HTTP {resp.status_code})",
            hint="is this Grendel's API? check provision_grendel_url / provision_grendel_socket",
            status=resp.status_code,
        ) from None


def _path(resp: requests.Response) -> str:
    url = resp.request.path_url if resp.request is not None else "?"
    return url.split("?", 1)[0]


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:200] or resp.reason or ""
    if isinstance(body, dict):
        for key in ("message", "detail", "title"):
            if body.get(key):
                return str(body[key])
    return str(body)[:200]


# --------------------------------------------------------------------------
# The client


class GrendelClient:
    """Grendel's REST API, classic or v2, over a unix socket or HTTP(S)."""

    def __init__(self, settings: GrendelSettings, *, session: requests.Session | None = None) -> None:
        self.settings = settings
        self._http = _Transport(settings, session)
        self._api: GrendelApi | None = None if settings.api is GrendelApi.AUTO else settings.api

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GrendelClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- API selection

    @property
    def known_api(self) -> GrendelApi:
        """The API in use if already known (configured or detected), else ``auto``."""
        return self._api or GrendelApi.AUTO

    @property
    def api(self) -> GrendelApi:
        if self._api is None:
            self._api = self.detect()
        return self._api

    def detect(self) -> GrendelApi:
        """Which API the server speaks, probing routes both specs publish.

        ``GET /v1/images`` exists only in v0.2 (200, or 401/403 without a
        valid token); a classic server answers 404 there and 200 on
        ``GET /v1/bootimage/list``.
        """
        resp = self._http.request("GET", "/v1/images", auth=True)
        if resp.status_code in (200, 401, 403) or (resp.status_code == 400 and _is_v2_error(resp)):
            return GrendelApi.V2
        if resp.status_code == 404:
            classic = self._http.request("GET", "/v1/bootimage/list")
            if classic.status_code == 200 and isinstance(_json(classic, self.settings), list):
                return GrendelApi.CLASSIC
        raise GrendelError(
            f"{self.settings.where} does not look like Grendel's API (GET /v1/images answered HTTP {resp.status_code})",
            hint="check provision_grendel_url / provision_grendel_socket, or set provision_grendel_api",
        )

    # -- plumbing

    def _call(
        self, method: str, path: str, *, what: str, ok: tuple[int, ...] = (200,), **payload: Unpack[_Payload]
    ) -> requests.Response:
        resp = self._http.request(method, path, auth=self.api is GrendelApi.V2, **payload)
        if resp.status_code in ok:
            return resp
        raise self._failure(resp, what)

    def _failure(self, resp: requests.Response, what: str) -> GrendelError:
        text = _error_text(resp)
        where = self.settings.where
        env = self.settings.token_env
        if self.api is GrendelApi.V2 and (resp.status_code == 401 or (resp.status_code == 400 and _auth_text(text))):
            have = self._http.token() is not None
            return GrendelError(
                f"Grendel at {where} rejected the API token: {text}"
                if have
                else f"Grendel at {where} wants an API token: {text}",
                hint=f"export {env}=<JWT> (the variable named by provision_grendel_token_env); "
                "create one with `grendel auth token <user> <role> infinite`",
                status=resp.status_code,
            )
        if self.api is GrendelApi.V2 and resp.status_code == 403:
            return GrendelError(
                f"Grendel at {where}: the token in {env} may not {what}: {text}",
                hint="use a token of a user whose role allows it (e.g. admin)",
                status=resp.status_code,
            )
        return GrendelError(
            f"Grendel at {where} failed to {what}: HTTP {resp.status_code} {text}".rstrip(),
            hint="Grendel's log says more (grendel serve --debug)",
            status=resp.status_code,
        )

    # -- hosts

    def list_hosts(self) -> list[dict[str, Any]]:
        path = "/v1/host/list" if self.api is GrendelApi.CLASSIC else "/v1/nodes"
        resp = self._call("GET", path, what="list hosts")
        return [self._host_in(d) for d in _json(resp, self.settings) or []]

    def find_hosts(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """The stored hosts among ``names`` (lower-cased; unknown names skipped)."""
        found: dict[str, dict[str, Any]] = {}
        for ns in nodeset_batches(check_host_name(n) for n in names):
            if self.api is GrendelApi.CLASSIC:
                resp = self._call("GET", "/v1/host/find/" + quote(ns, safe=""), what=f"find hosts {ns}")
            else:
                resp = self._call("GET", "/v1/nodes/find", params={"nodeset": ns}, what=f"find hosts {ns}")
            for doc in _json(resp, self.settings) or []:
                host = self._host_in(doc)
                found[host["name"]] = host
        return list(found.values())

    def find_hosts_by_tags(self, tags: Sequence[str]) -> list[dict[str, Any]]:
        """Hosts having any of ``tags``."""
        if not tags:
            return []
        joined = ",".join(tags)
        if self.api is GrendelApi.CLASSIC:
            resp = self._call("GET", "/v1/host/tags/" + quote(joined, safe=""), what=f"find hosts tagged {joined}")
        else:
            resp = self._call("GET", "/v1/nodes/find", params={"tags": joined}, what=f"find hosts tagged {joined}")
        return [self._host_in(d) for d in _json(resp, self.settings) or []]

    def store_hosts(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Create or replace hosts (whole documents)."""
        out = [normalize_host_doc(d) for d in docs]
        if not out:
            return
        names = [d["name"] for d in out]
        if len(set(names)) != len(names):
            raise GrendelError("the same host name appears twice", hint="give each host its own name")
        self._check_images_exist(out)
        if self.api is GrendelApi.CLASSIC:
            self._call("POST", "/v1/host", body=out, ok=(201,), what=f"store {len(out)} hosts")
            return
        existing = {d["name"]: d for d in self.find_hosts(names)}
        node_list = [self._host_out_v2(d, existing.get(d["name"])) for d in out]
        self._call("POST", "/v1/nodes", body={"node_list": node_list}, what=f"store {len(out)} hosts")

    def delete_hosts(self, names: Sequence[str]) -> list[str]:
        """Delete the stored hosts among ``names``; returns those deleted.

        Only names that exist are sent: classic Grendel fails the whole
        request (500, nothing deleted) when one name is missing.
        """
        present = sorted(h["name"] for h in self.find_hosts(names))
        for ns in nodeset_batches(present):
            if self.api is GrendelApi.CLASSIC:
                self._call("DELETE", "/v1/host/find/" + quote(ns, safe=""), what=f"delete hosts {ns}")
            else:
                self._call("DELETE", "/v1/nodes", params={"nodeset": ns}, what=f"delete hosts {ns}")
        return present

    def set_provision(self, names: Sequence[str], provision: bool) -> list[str]:
        """Set ``provision`` on the stored hosts among ``names``; returns those."""
        present = sorted(h["name"] for h in self.find_hosts(names))
        verb = "provision" if provision else "unprovision"
        for ns in nodeset_batches(present):
            if self.api is GrendelApi.CLASSIC:
                self._call("PUT", f"/v1/host/{verb}/" + quote(ns, safe=""), what=f"{verb} {ns}")
            else:
                self._call(
                    "PATCH",
                    "/v1/nodes/provision",
                    params={"nodeset": ns},
                    body={"provision": provision},
                    what=f"{verb} {ns}",
                )
        return present

    def tag_hosts(self, names: Sequence[str], tags: Sequence[str], *, remove: bool = False) -> list[str]:
        """Add (or remove) tags on the stored hosts among ``names``; returns those."""
        tags = [t.strip() for t in tags if t.strip()]
        if not tags:
            raise GrendelError("no tags given", hint="name at least one tag, e.g. rack=r1")
        present = sorted(h["name"] for h in self.find_hosts(names))
        joined = ",".join(tags)
        for ns in nodeset_batches(present):
            if self.api is GrendelApi.CLASSIC:
                verb = "untag" if remove else "tag"
                self._call(
                    "PUT", f"/v1/host/{verb}/" + quote(ns, safe=""), params={"tags": joined}, what=f"{verb} {ns}"
                )
            else:
                action = "remove" if remove else "add"
                self._call(
                    "PATCH",
                    f"/v1/nodes/tags/{action}",
                    params={"nodeset": ns},
                    body={"tags": joined},
                    what=f"tag {ns}",
                )
        return present

    # -- images

    def list_images(self) -> list[dict[str, Any]]:
        path = "/v1/bootimage/list" if self.api is GrendelApi.CLASSIC else "/v1/images"
        resp = self._call("GET", path, what="list images")
        return [self._image_in(d) for d in _json(resp, self.settings) or []]

    def find_image(self, name: str) -> dict[str, Any] | None:
        name = check_image_name(name)
        if self.api is GrendelApi.CLASSIC:
            # A one-element list, or 404 {"message": "image not found"}.
            resp = self._call(
                "GET", "/v1/bootimage/find/" + quote(name, safe=""), ok=(200, 404), what=f"find image {name}"
            )
            if resp.status_code == 404:
                return None
        else:
            resp = self._call("GET", "/v1/images/find", params={"names": name}, what=f"find image {name}")
        for doc in _json(resp, self.settings) or []:
            image = self._image_in(doc)
            if image["name"] == name:
                return image
        return None

    def store_images(self, docs: Sequence[Mapping[str, Any]]) -> None:
        out = [normalize_image_doc(d) for d in docs]
        if not out:
            return
        existing = {d["name"]: d for d in self.list_images()}
        if self.api is GrendelApi.CLASSIC:
            for doc in out:
                # Send the stored id back, else classic Grendel makes a new id on every upsert.
                old = existing.get(doc["name"])
                if old and old.get("id") and str(old["id"]).strip("0") != "":
                    doc["id"] = old["id"]
                elif "id" in doc and not _is_ksuid(str(doc["id"])):
                    doc.pop("id")
            self._call("POST", "/v1/bootimage", body=out, ok=(201,), what=f"store {len(out)} images")
            return
        boot_images = []
        for doc in out:
            v2 = {k: v for k, v in doc.items() if k not in ("id", "provision_template", "user_data", "butane")}
            if doc.get("liveimg"):
                log.warning(
                    "grendel v0.2 does not keep liveimg (%s); point the cmdline at the squashfs instead", doc["name"]
                )
            templates = dict(doc.get("provision_templates") or {})
            for old_key, new_key in (
                ("provision_template", "kickstart"),
                ("user_data", "user_data"),
                ("butane", "butane"),
            ):
                if doc.get(old_key):
                    templates[new_key] = doc[old_key]
            if templates:
                v2["provision_templates"] = templates
            old = existing.get(doc["name"])
            if old and isinstance(old.get("id"), int):
                v2["id"] = old["id"]
            boot_images.append(v2)
        self._call("POST", "/v1/images", body={"boot_images": boot_images}, what=f"store {len(out)} images")

    def delete_image(self, name: str) -> bool:
        """Delete an image; False if there was none (classic answers 500 for a missing one)."""
        name = check_image_name(name)
        if self.find_image(name) is None:
            return False
        if self.api is GrendelApi.CLASSIC:
            self._call("DELETE", "/v1/bootimage/find/" + quote(name, safe=""), what=f"delete image {name}")
            return True
        # v0.2's handler reads the query parameter `name` while the spec, CLI
        # and UI send `names` (NOTES §6.3): send both, then check.
        self._call("DELETE", "/v1/images", params={"names": name, "name": name}, what=f"delete image {name}")
        if self.find_image(name) is not None:
            raise GrendelError(
                f"Grendel at {self.settings.where} answered OK but kept image {name}",
                hint="delete it with `grendel image delete` on the Grendel host",
            )
        return True

    # -- helpers

    def _check_images_exist(self, hosts: Sequence[Mapping[str, Any]]) -> None:
        wanted = {str(h["boot_image"]) for h in hosts if h.get("boot_image")}
        if not wanted:
            return
        known = {d["name"] for d in self.list_images()}
        missing = sorted(wanted - known)
        if missing:
            users = sorted(h["name"] for h in hosts if h.get("boot_image") in missing)
            raise GrendelError(
                f"Grendel at {self.settings.where} has no image {', '.join(missing)} "
                f"(wanted by {', '.join(users[:5])}{', …' if len(users) > 5 else ''})",
                hint="register the image first (`provision grendel export --output DIR` writes images.json), "
                "or change provision_image",
            )

    def _host_in(self, doc: Any) -> dict[str, Any]:
        host = clean_host_doc(cast(Mapping[str, Any], doc))
        if self.api is GrendelApi.V2:
            # v0.2 returns tags as "key:value" with an empty value ("ib:"), NOTES §6.4.
            host["tags"] = [t[:-1] if t.endswith(":") else t for t in host["tags"]]
        return host

    def _image_in(self, doc: Any) -> dict[str, Any]:
        return clean_image_doc(cast(Mapping[str, Any], doc))

    @staticmethod
    def _host_out_v2(doc: Mapping[str, Any], old: Mapping[str, Any] | None) -> dict[str, Any]:
        """A v0.2 node: upserts go by numeric id, so reuse the stored host's and NICs' ids."""
        out = dict(doc)
        if old is not None:
            if isinstance(old.get("id"), int):
                out["id"] = old["id"]
            if old.get("uid"):
                out["uid"] = old["uid"]
            old_nics = list(old.get("interfaces") or [])
            nics = []
            for nic in doc.get("interfaces") or []:
                match = next(
                    (
                        o
                        for o in old_nics
                        if isinstance(o.get("id"), int)
                        and (
                            (nic.get("mac") and o.get("mac") == nic.get("mac"))
                            or (nic.get("bmc") and o.get("bmc") and not nic.get("mac"))
                        )
                    ),
                    None,
                )
                nic = dict(nic)
                if match is not None:
                    nic["id"] = match["id"]
                    old_nics.remove(match)
                nics.append(nic)
            out["interfaces"] = nics
        return out


def _is_v2_error(resp: requests.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and ("title" in body or "detail" in body)


def _auth_text(text: str) -> bool:
    lowered = text.lower()
    return any(w in lowered for w in ("token", "authenticat", "unauthori", "disabled", "user"))


_KSUID = re.compile(r"^[0-9A-Za-z]{27}$")


def _is_ksuid(value: str) -> bool:
    return bool(_KSUID.match(value))


# --------------------------------------------------------------------------
# Export for GitOps (hosts.json / images.json)


def image_for_export(name: str, config: Mapping[str, Any], repo_dir: str) -> BootImage:
    """The Grendel image ``name``: ``provision_grendel_images[name]`` or the repo layout.

    Default layout under Grendel's ``provision.repo_dir``:
    ``<repo>/<name>/vmlinuz``, ``<repo>/<name>/initramfs.img``,
    ``<repo>/<name>/rootfs.squashfs``, booted diskless with ``DEFAULT_CMDLINE``.
    """
    overrides = config.get("provision_grendel_images") or {}
    if not isinstance(overrides, Mapping):
        raise GrendelError(
            "provision_grendel_images must be a mapping of image name to {kernel, initrds, squashfs, cmdline}",
            hint="see the Grendel section of the README",
        )
    spec = overrides.get(name) or {}
    if not isinstance(spec, Mapping):
        raise GrendelError(f"provision_grendel_images.{name} must be a mapping", hint="give kernel, initrds, ...")
    base = f"{repo_dir.rstrip('/')}/{name}"
    initrds = spec.get("initrds", [f"{base}/initramfs.img"])
    if isinstance(initrds, str):
        initrds = [initrds]
    extra = str(config.get("provision_grendel_cmdline_extra") or "").strip()
    cmdline = str(spec.get("cmdline") or DEFAULT_CMDLINE)
    if extra:
        cmdline = f"{cmdline} {extra}"
    return BootImage(
        name=name,
        kernel=str(spec.get("kernel") or f"{base}/vmlinuz"),
        initrds=tuple(str(i) for i in initrds),
        squashfs=str(spec.get("squashfs") or f"{base}/rootfs.squashfs"),
        cmdline=cmdline,
    )


def export_documents(
    hosts: Sequence[BootHost], images: Sequence[BootImage], settings: GrendelSettings | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``{"hosts": [...], "images": [...]}`` as Grendel's file loader reads them."""
    firmware = settings.firmware if settings else None
    domain = settings.domain if settings else None
    host_docs = [normalize_host_doc(host_to_doc(h, firmware=firmware, domain=domain)) for h in hosts]
    image_docs = [normalize_image_doc(image_to_doc(i)) for i in images]
    return {
        "hosts": sorted(host_docs, key=lambda d: d["name"]),
        "images": sorted(image_docs, key=lambda d: d["name"]),
    }

"""Redfish BMCs: power and one-time or persistent boot override, through sushy.

One node is one ``RedfishClient`` (a ``sushy.Sushy`` root, the node's
ComputerSystem: ``provision_bmc_system_id`` or the single member of
/redfish/v1/Systems). ``run_clients`` runs an operation over many nodes in a
thread pool with at most ``fanout`` in flight, a per-node timeout (also
sushy's connect and read timeout) and retries of unreachable BMCs; each node
gets an ``Outcome`` exactly as the IPMI engine gives it.

Authentication (``provision_bmc_redfish_auth``): ``session`` (default) posts
to the SessionService and sends X-Auth-Token; the session is deleted when the
node's work is done. ``basic`` sends HTTP basic auth on every request. The
password reaches sushy in memory only (sushy masks it in its debug log).

TLS is always verified: against the system CAs, a site CA bundle
(``provision_bmc_ca_file``), or a pinned SHA-256 fingerprint of the BMC's
certificate (``provision_bmc_tls_fingerprint``; for self-signed BMC
certificates). sushy takes only ``verify`` (bool or CA path), so pinning is a
requests adapter mounted on the connector's session whose connection pools
carry urllib3's ``assert_fingerprint``: the handshake is refused unless the
peer's certificate hashes to the pinned value (chain and host name are then
not checked: the pin is the trust). ``provision_bmc_tls_insecure: true``
turns checking off and is logged as a warning on every run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import requests
import sushy
import urllib3
from requests.adapters import HTTPAdapter
from sushy import exceptions as sushy_exc
from sushy.connector import Connector

from provision.errors import BmcError
from provision.fanout import Outcome, Result, failure_outcome, timeout_outcome
from provision.inventory import Bmc, RedfishAuth
from provision.ipmi.errors import AUTH_HINT, UNREACHABLE_HINT, BmcAuthError, BmcUnreachableError

log = logging.getLogger(__name__)

T = TypeVar("T")

TLS_HINT = (
    "check the BMC's certificate: set provision_bmc_ca_file (the site CA) or provision_bmc_tls_fingerprint "
    "(openssl x509 -noout -fingerprint -sha256) for this node"
)


class BmcTlsError(BmcError):
    """The BMC's TLS certificate was not trusted (never retried)."""


class PinnedFingerprintAdapter(HTTPAdapter):
    """HTTPS whose only trust is the peer certificate's SHA-256 (urllib3 ``assert_fingerprint``)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


class _Connector(Connector):  # type: ignore[misc]
    """sushy's connector with our TLS policy on its requests session."""

    def __init__(self, url: str, bmc: Bmc, timeout: float) -> None:
        pinned = bmc.tls.fingerprint
        verify: bool | str = bmc.tls.ca_file or True
        if pinned or bmc.tls.insecure:
            verify = False  # with a pin, the adapter below checks the certificate instead
        # One attempt per call (provision retries whole operations); connect and read bounded by the timeout.
        super().__init__(
            url,
            verify=verify,
            server_side_retries=1,
            server_side_retries_delay=0,
            default_request_timeout=timeout,
            connect_timeout=min(timeout, 10.0),
        )
        if pinned:
            self._session.mount("https://", PinnedFingerprintAdapter(pinned))
        # sushy asks for "Connection: close" (for BMCs that choke on long-lived connections); a client
        # here lives for a few requests, and one TLS handshake instead of one per request halves its time.
        self._session.headers.pop("Connection", None)


@dataclass(frozen=True)
class SystemState:
    power: str  # "on" or "off" (PoweringOn counts as on, PoweringOff as off)
    target: str | None  # BootSourceOverrideTarget, e.g. "Pxe", "Hdd", "BiosSetup", "None"
    enabled: str | None  # BootSourceOverrideEnabled: "Once", "Continuous", "Disabled"
    mode: str | None  # BootSourceOverrideMode: "UEFI", "Legacy"


class RedfishClient:
    """One node's Redfish system; a context manager (closes the session)."""

    def __init__(self, name: str, bmc: Bmc, timeout: float = 30.0) -> None:
        self.name = name
        self.bmc = bmc
        self.where = f"BMC {bmc.address}:{bmc.port}"
        self.url = f"https://{bmc.address}:{bmc.port}"
        self.timeout = timeout
        self._root: Any = None
        self._system: Any = None
        self._stale = False  # the system was changed since it was read

    # -- connection -------------------------------------------------------------
    def __enter__(self) -> RedfishClient:
        password = self.bmc.password.reveal()
        auth_class = sushy.auth.SessionAuth if self.bmc.redfish_auth is RedfishAuth.SESSION else sushy.auth.BasicAuth
        auth = auth_class(username=self.bmc.user, password=password)
        connector = _Connector(self.url, self.bmc, self.timeout)
        try:
            self._root = self.call(
                "connect",
                lambda: sushy.Sushy(self.url, auth=auth, connector=connector, public_connector=_NoPublic()),
            )
        except BmcAuthError:
            if self.bmc.redfish_auth is RedfishAuth.SESSION and not _offers_sessions(connector):
                connector.close()
                raise BmcError(
                    f"{self.where}: connect: the BMC offers no SessionService",
                    hint="set provision_bmc_redfish_auth: basic for this node",
                ) from None
            connector.close()
            raise
        except BaseException:
            connector.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        root, self._root = self._root, None
        if root is None:
            return
        try:
            root._auth.close()  # DELETE the session (sushy only does this in __del__)
        except Exception as exc:
            log.warning("%s: %s: closing the Redfish session failed: %s", self.name, self.where, exc)
        root._auth = None
        root._conn.close()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, with sushy's and requests' errors turned into provision's BMC errors."""
        try:
            return fn()
        except sushy_exc.ConnectionError as exc:
            cause = exc.__context__
            if isinstance(cause, requests.exceptions.SSLError):
                raise BmcTlsError(f"{self.where}: TLS: {_tls_reason(cause)}", hint=TLS_HINT) from None
            raise BmcUnreachableError(
                f"{self.where}: no answer ({what}): {_reason(cause)}", hint=UNREACHABLE_HINT
            ) from None
        except sushy_exc.AccessError as exc:
            raise BmcAuthError(
                f"{self.where}: {what}: HTTP {exc.status_code}, credentials refused", hint=AUTH_HINT
            ) from None
        except sushy_exc.MissingAttributeError as exc:
            if "SessionService" in str(exc):
                raise BmcError(
                    f"{self.where}: {what}: the BMC offers no SessionService",
                    hint="set provision_bmc_redfish_auth: basic for this node",
                ) from None
            raise BmcError(f"{self.where}: {what}: {exc}") from None
        except sushy_exc.UnknownDefaultError:
            raise BmcError(
                f"{self.where}: /redfish/v1/Systems does not hold exactly one system",
                hint="set provision_bmc_system_id to the system's id (the last part of its /redfish/v1/Systems/<id>)",
            ) from None
        except sushy_exc.ResourceNotFoundError:
            raise BmcError(
                f"{self.where}: {what}: not found (system id {self.bmc.system_id!r})",
                hint="check provision_bmc_system_id against the BMC's /redfish/v1/Systems",
            ) from None
        except sushy_exc.InvalidParameterValueError as exc:
            raise BmcError(f"{self.where}: {what}: {exc}", hint="the BMC does not offer this setting") from None
        except sushy_exc.HTTPError as exc:
            raise BmcError(
                f"{self.where}: {what}: HTTP {exc.status_code}: {getattr(exc, 'detail', None) or exc}"
            ) from None
        except sushy_exc.SushyError as exc:
            raise BmcError(f"{self.where}: {what}: {exc}") from None

    @property
    def system(self) -> Any:
        if self._system is None:
            root = self._root
            if root is None:
                raise RuntimeError("RedfishClient used outside its with block")
            path = f"/redfish/v1/Systems/{self.bmc.system_id}" if self.bmc.system_id else None
            self._system = self.call("system", lambda: root.get_system(path))
        return self._system

    # -- reading -----------------------------------------------------------------
    def state(self) -> SystemState:
        system = self.system
        if self._stale:
            self.call("read the system", lambda: system.refresh(force=True))
            self._stale = False
        power = system.power_state
        boot = system.boot
        return SystemState(
            power="on" if power in (sushy.PowerState.ON, sushy.PowerState.POWERING_ON) else "off",
            target=_value(boot.target),
            enabled=_value(boot.enabled),
            mode=_value(boot.mode),
        )

    # -- writing -----------------------------------------------------------------
    def reset(self, reset_type: str) -> None:
        system = self.system
        self.call(f"reset {reset_type}", lambda: system.reset_system(sushy.ResetType(reset_type)))
        self._stale = True

    def allowed_reset(self) -> set[str]:
        system = self.system
        return {str(_value(v)) for v in self.call("reset types", system.get_allowed_reset_system_values)}

    def set_boot(self, target: str, *, persistent: bool, uefi: bool) -> None:
        system = self.system
        enabled = sushy.BootSourceOverrideEnabled.CONTINUOUS if persistent else sushy.BootSourceOverrideEnabled.ONCE
        if target == "None":
            enabled = sushy.BootSourceOverrideEnabled.DISABLED
        mode = sushy.BootSourceOverrideMode.UEFI if uefi else sushy.BootSourceOverrideMode.LEGACY
        self.call(
            f"set boot override {target}",
            lambda: system.set_system_boot_options(
                target=sushy.BootSource(target), enabled=enabled, mode=None if target == "None" else mode
            ),
        )
        self._stale = True


# --------------------------------------------------------------------------
# The operations (provision.bmc maps its PowerAction/BootDevice onto these names)

# ResetType per power action, in order of preference among those the BMC offers.
RESET_TYPES = {
    "on": ("On", "ForceOn"),
    "off": ("ForceOff",),
    "soft": ("GracefulShutdown",),
    "cycle": ("PowerCycle", "ForceRestart"),
    "reset": ("ForceRestart", "PowerCycle"),
}
# provision's boot devices as BootSourceOverrideTarget values.
BOOT_TARGETS = {"pxe": "Pxe", "disk": "Hdd", "bios": "BiosSetup", "cdrom": "Cd", "none": "None"}
BOOT_DEVICES = {v: k for k, v in BOOT_TARGETS.items()}


def power(client: RedfishClient, action: str) -> str:
    """Carry out ``action`` (status, on, off, soft, cycle, reset); the power state the node is in or heads to.

    Like ``ipmipower --on-if-off``, cycle and reset power on a node that is
    off; on, off and soft on a node already there send nothing (several BMCs
    answer an error to "On" when on).
    """
    now = client.state().power
    if action == "status":
        return now
    if action in ("cycle", "reset") and now == "off":
        action = "on"
    target = "off" if action in ("off", "soft") else "on"
    if action in ("on", "off", "soft") and now == target:
        return target
    offered = client.allowed_reset()
    choice = next((t for t in RESET_TYPES[action] if t in offered), None)
    if choice is None:
        raise BmcError(
            f"{client.where}: the BMC offers no ResetType for {action} "
            f"(wanted {' or '.join(RESET_TYPES[action])}; offers {', '.join(sorted(offered)) or 'none'})"
        )
    client.reset(choice)
    return target


@dataclass(frozen=True)
class BootOverride:
    device: str  # a key of BOOT_TARGETS
    persistent: bool
    uefi: bool


def read_boot(client: RedfishClient) -> BootOverride:
    state = client.state()
    if state.enabled in (None, "Disabled") or state.target in (None, "None"):
        return BootOverride("none", False, False)
    device = BOOT_DEVICES.get(state.target or "")
    if device is None:
        raise BmcError(f"{client.where}: boot override target {state.target} is not one provision knows")
    return BootOverride(device, state.enabled == "Continuous", state.mode == "UEFI")


def set_boot(client: RedfishClient, device: str, *, persistent: bool, uefi: bool) -> BootOverride:
    """Set the override; what was asked for (``read_boot`` says what the BMC kept)."""
    client.set_boot(BOOT_TARGETS[device], persistent=persistent, uefi=uefi)
    if device == "none":
        return BootOverride("none", False, False)
    return BootOverride(device, persistent, uefi)


class _NoPublic:
    """sushy's connector for public message registries: never used (BMCs are not on the Internet)."""

    def get(self, *args: object, **kwargs: object) -> Any:
        raise requests.exceptions.ConnectionError("public registries are not fetched")


def _offers_sessions(connector: Connector) -> bool:
    """Whether the service root (readable without credentials) links a SessionService."""
    try:
        root = connector.get("/redfish/v1/").json()
    except Exception:
        return True  # cannot tell: report the credentials
    return bool(root.get("SessionService") or root.get("Links", {}).get("Sessions"))


def _value(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _reason(cause: object) -> str:
    text = str(cause) if cause is not None else "connection failed"
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return text[-200:]


def _tls_reason(cause: requests.exceptions.SSLError) -> str:
    text = str(cause)
    if "Fingerprints did not match" in text:
        return "the certificate does not match the pinned SHA-256 fingerprint (provision_bmc_tls_fingerprint)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("CERTIFICATE_VERIFY_FAILED]", 1)[-1].split("(_ssl.c")[0].strip(" ]:)'\"")
        return f"certificate verify failed ({detail or 'untrusted'})"
    return text[-200:]


_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_insecure(bmcs: Sequence[tuple[str, Bmc]]) -> None:
    """One warning per run naming the nodes whose BMC certificate is not checked."""
    names = [name for name, bmc in bmcs if bmc.tls.insecure]
    if not names:
        return
    key = ",".join(names)
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    log.warning(
        "TLS certificate checking is OFF for the BMCs of %s (provision_bmc_tls_insecure: true): "
        "anyone on the path can take their passwords",
        shown,
    )
    # urllib3 would warn once per request; the warning above says it once.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)


# --------------------------------------------------------------------------
# Many nodes: a thread pool

Job = Callable[[RedfishClient], Any]


def run_clients(
    items: Sequence[tuple[str, Bmc]],
    job: Job,
    *,
    fanout: int,
    timeout: float | None,
    retries: int,
    backoff: float,
    retry_on: tuple[type[BaseException], ...],
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``job`` on every (name, bmc) with at most ``fanout`` threads; one Outcome per item, in order.

    A node that has no result after ``timeout`` seconds is reported as timed
    out (its thread ends by itself: every request is bounded by the same
    timeout); a node whose attempt raised one of ``retry_on`` is tried again
    after ``backoff`` seconds, up to ``retries`` times.
    """
    warn_insecure(items)
    request_timeout = timeout or 30.0
    outcomes: list[Outcome | None] = [None] * len(items)

    def attempt_loop(index: int) -> Outcome:
        name, bmc = items[index]
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                with RedfishClient(name, bmc, request_timeout) as client:
                    value = job(client)
                return Outcome(name, Result.OK, value=value, seconds=time.monotonic() - started, attempts=attempts)
            except BaseException as exc:
                in_time = timeout is None or time.monotonic() - started + backoff < timeout
                if isinstance(exc, retry_on) and attempts <= retries and in_time:
                    time.sleep(backoff)
                    continue
                if not isinstance(exc, Exception):
                    raise
                return failure_outcome(name, exc, time.monotonic() - started, attempts)

    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(fanout, len(items)), thread_name_prefix="redfish")
    try:
        started: dict[Future[Outcome], tuple[int, float]] = {}
        pending = list(range(len(items)))
        pending.reverse()
        running: set[Future[Outcome]] = set()
        while pending or running:
            while pending and len(running) < fanout:
                index = pending.pop()
                future = pool.submit(attempt_loop, index)
                started[future] = (index, time.monotonic())
                running.add(future)
            wait_for = None
            if timeout is not None:
                soonest = min(started[f][1] for f in running) + timeout
                wait_for = max(0.0, soonest - time.monotonic())
            done, _ = wait(running, timeout=wait_for, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for future in list(running):
                index, t0 = started[future]
                if future in done:
                    outcome = future.result()
                elif timeout is not None and now - t0 >= timeout:
                    outcome = timeout_outcome(items[index][0], timeout, now - t0)
                else:
                    continue
                running.discard(future)
                outcomes[index] = outcome
                if on_outcome:
                    on_outcome(outcome)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [o for o in outcomes if o is not None]


__all__ = [
    "BOOT_TARGETS",
    "BmcTlsError",
    "BootOverride",
    "PinnedFingerprintAdapter",
    "RedfishClient",
    "SystemState",
    "power",
    "read_boot",
    "run_clients",
    "set_boot",
    "warn_insecure",
]

"""The join service: each stateless node fetches its join bundle at every boot.

Stateless nodes lose their configuration at every reboot. This service, on
the admin/boot node, hands each node, and only that node in this boot, its
join bundle (MUNGE key, SSSD and Slurm configuration, ... rendered by the
join playbook under ``<state dir>/service/bundles/<node>/``); an agent in the
image fetches it at every boot.

Trust design
------------
* **The console is the trust anchor.** At each boot the node makes new SSH
  host keys and prints on its kernel log, which reaches the serial console
  (a channel nobody on the provisioning network can write to):
  ``provision: boot <boot_id>`` (``/proc/sys/kernel/random/boot_id``), then
  ``provision: ssh-host-key <type> <base64>`` per key. The service follows
  every node's console log (``provision_console_log``: conserver at a site,
  QEMU's file in the lab) continuously, so a reboot nobody asked for is seen
  too. ``provision.console`` accepts a marker only when it is well formed and
  starts its line (after an optional kernel timestamp), takes keys only
  after the latest boot marker, and keeps the first key of each type: text
  typed at a login prompt, or printed later in the boot, is never pinned.
  A truncated log is a new writer: its boot is forgotten.
* **Protocol** (the in-image agent implements the node side):

  1. ``GET /v1/challenge?node=NAME`` -> ``{"nonce": <urlsafe base64 of 32
     random bytes>, "expires_in": 60}``; a nonce is single-use, expires after
     60 s, and at most 4 are outstanding per node (the oldest goes first).
  2. The node signs ``provision-join-v1\\nnode=NAME\\nboot_id=BOOTID\\nnonce=NONCE\\n``
     with its ed25519 host key: ``ssh-keygen -Y sign -f
     /etc/ssh/ssh_host_ed25519_key -n provision-join@v1 FILE``.
  3. ``POST /v1/bundle`` ``{"node", "boot_id", "nonce", "signature"}`` -> 200
     ``application/octet-stream``: the bundle tar encrypted with age to the
     ssh-ed25519 key pinned from the node's console for its current boot
     (``age -d -i /etc/ssh/ssh_host_ed25519_key``). The tar holds the
     manifest's files (paths relative to /, owner and group by name, modes
     from the manifest) and ``manifest.json`` at its top. The answer's
     ``X-Provision-Report-Nonce`` header is a challenge for the report
     (single-use, valid 10 minutes): the report needs no second round trip.
  4. ``POST /v1/report`` ``{"node", "boot_id", "nonce", "status":
     "joined"|"failed", "step", "release", "signature"}``, signed (same namespace) over
     ``provision-report-v2\\nnode=…\\nboot_id=…\\nnonce=…\\nstatus=…\\nstep=…\\nrelease=…\\n``
     (``release``: ``IMAGE/VERSION`` from the image's /etc/provision-release; an
     agent without it signs ``provision-report-v1`` without that line) with the
     bundle answer's challenge or a fresh one -> 204; the node's state is recorded.

* **Refusals** are 403 ``{"error": …}`` (no secret, nothing about other
  nodes): unknown node; source address not the node's ``provision_ip``;
  nonce unknown, expired or used (replay); a boot_id that is an earlier boot
  on the console; a signature not by the key pinned from the console for
  the current boot (another node's key, a key never on the console, an
  earlier boot's key). 503 (with ``Retry-After``) while the claimed boot or
  its ed25519 key has not reached the console yet (console lag: the agent
  retries) or the node's bundle is not rendered. A nonce is used up only by
  a request that passes every check, so a forged request cannot burn the
  node's challenge.
* **What an eavesdropper learns**: the bundle is end-to-end encrypted to a
  key whose private half never leaves the node's RAM, so plain HTTP leaks
  nothing secret; a captured request is useless (single-use nonce, source
  check). The service listens on its own port, not behind nginx: it needs the
  true peer address, and secrets never pass through nginx's world-readable
  web root or logs. What the design trusts: the console path (serial line,
  BMC SOL, conserver) and the admin node; a node's own root can of course
  read its own bundle.
* **Audit**: every refusal is one log line (time, peer, claimed node,
  reason; never a signature or a bundle) and an event in a bounded list.
  The status (per node: current boot, pinned key fingerprint, bundles
  served, last report, refusals; and the events) is written to
  ``<state dir>/service/status.json``, mode 0600, rather than served over
  HTTP: it survives the service, needs no second (loopback) listener, and
  file permissions say who may read it. ``read_status`` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from provision.inventory import Site
from provision.service.errors import BundleError, JoinServiceError
from provision.service.settings import JoinSettings
from provision.service.state import Event, EventKind, NodeRecord, ServiceStatus, read_status

if TYPE_CHECKING:
    from provision.service.server import NAMESPACE, JoinService, join_message, report_message, serve_forever

# The server (aiohttp) is imported on first use: every CLI command imports this
# package, and only `service run` serves (a quarter of a second per command).
_SERVER_NAMES = frozenset({"NAMESPACE", "JoinService", "join_message", "report_message", "serve_forever"})


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from provision.service import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NAMESPACE",
    "BundleError",
    "Event",
    "EventKind",
    "JoinService",
    "JoinServiceError",
    "JoinSettings",
    "NodeRecord",
    "ServiceStatus",
    "join_message",
    "read_status",
    "report_message",
    "serve_forever",
    "site_status",
]


def site_status(site: Site) -> ServiceStatus | None:
    """The join service's last written status for ``site`` (None when it never ran)."""
    return read_status(site.state_dir / "service" / "status.json")

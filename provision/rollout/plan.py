"""A rollout's plan: every check first, then the waves. A refusal changes nothing."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provision.errors import RolloutError
from provision.image.store import ImageStore
from provision.kube import Kubectl
from provision.names import is_exact_image_name, is_version
from provision.slurm import Slurm, SlurmNode

if TYPE_CHECKING:
    from provision.boot.base import BootBackend
    from provision.inventory import Node, Site
    from provision.service.state import NodeRecord

_PERCENT = re.compile(r"^(\d{1,3})%$")


@dataclass(frozen=True)
class RolloutRequest:
    """What the operator asked for (``provision image rollout``)."""

    image: str
    version: str | None = None  # None: the image store's current version
    canary: int = 1  # nodes in the first wave; 0: no canary wave
    max_unavailable: str = "1"  # nodes (N) or a share of the selection (P%) out of service at once
    batch_wait: float = 0.0  # seconds between waves
    timeout: float = 900.0  # per node: from its reboot (jobs ended) to back in service
    deadline: float | None = None  # for the whole rollout: nodes still busy then are reported, never forced
    verify: str | None = None  # a site check, run as a one-node Slurm job on each node back in service

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def max_out(value: str, selected: int) -> int:
    """``--max-unavailable``: ``2`` or ``25%`` of the selection (rounded down, at least 1)."""
    text = str(value).strip()
    percent = _PERCENT.match(text)
    if percent:
        share = int(percent.group(1))
        if not 1 <= share <= 100:
            raise RolloutError(f"--max-unavailable {text}: not a share between 1% and 100%", hint="write e.g. 25%")
        return max(1, selected * share // 100)
    if not text.isdigit() or int(text) < 1:
        raise RolloutError(f"--max-unavailable {text!r}: not a number of nodes or a share", hint="write e.g. 1 or 25%")
    return int(text)


@dataclass(frozen=True)
class Plan:
    image: str
    version: str
    waves: tuple[tuple[str, ...], ...]
    previous: Mapping[str, str]  # node -> the version it boots now
    skipped: tuple[str, ...]  # already on the version
    max_unavailable: int
    slurm: Mapping[str, SlurmNode] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "version": self.version,
            "waves": [list(w) for w in self.waves],
            "previous": dict(self.previous),
            "skipped": list(self.skipped),
            "max_unavailable": self.max_unavailable,
            "slurm": {n: s.state for n, s in self.slurm.items()},
        }


def _resolve_version(store: ImageStore, image: str, version: str | None) -> str:
    if not is_exact_image_name(image):
        raise RolloutError(f"image {image!r}: not a valid image name", hint="name an image of `provision image list`")
    versions = [v.version for v in store.versions(image)]
    if not versions:
        raise RolloutError(f"image {image}: unknown (not in the image store {store.root})",
                           hint=f"build it: provision image build {image}")  # fmt: skip
    if version is None:
        return store.current(image).version
    if not is_version(version) or version not in versions:
        raise RolloutError(f"image {image}: no version {version!r} in the store (has {', '.join(versions)})",
                           hint="name a version of `provision image list`")  # fmt: skip
    return version


def make_plan(
    site: Site,
    nodes: Sequence[Node],
    request: RolloutRequest,
    *,
    backend: BootBackend,
    slurm: Slurm,
    joins: Mapping[str, NodeRecord],
    kube: Kubectl | None = None,
) -> Plan:
    """Check the request; the waves, canaries first. Raises RolloutError (nothing changed) when unsafe."""
    if not nodes:
        raise RolloutError("no node selected", hint="select nodes with --rack, --nodes or --all")
    image = request.image
    version = _resolve_version(ImageStore(site.settings.image_store), image, request.version)
    other = sorted(n.name for n in nodes if (n.image or site.default_image) != image)
    if other:
        raise RolloutError(f"{', '.join(other)}: boot another image than {image}",
                           hint="select only nodes whose provision_image is the image rolled out")  # fmt: skip
    published, _ = backend.versions_of(image)
    if version not in published:
        raise RolloutError(f"image {image}: version {version} is not published to the boot backend",
                           hint=f"provision image publish {image} --version {version}")  # fmt: skip
    names = [n.name for n in nodes]
    limit = max_out(request.max_unavailable, len(names))
    if request.canary < 0:
        raise RolloutError(f"--canary {request.canary}: not a number of nodes", hint="write 0 or more")
    if request.canary > limit:
        raise RolloutError(f"--canary {request.canary} takes more nodes out at once than --max-unavailable "
                           f"{request.max_unavailable} ({limit})", hint="lower --canary or raise --max-unavailable")  # fmt: skip
    states = slurm.nodes(names)
    unknown = [n for n in names if n not in states]
    if unknown:
        raise RolloutError(f"{', '.join(unknown)}: not in Slurm", hint="join them first (provision node boot --join)")
    out = [f"{n} ({states[n].state}{f': {states[n].reason}' if states[n].reason else ''})"
           for n in names if states[n].out]  # fmt: skip
    if out:
        raise RolloutError(f"not in service: {'; '.join(out)}",
                           hint="a rollout starts from nodes in service: resume or fix them, or leave them out")  # fmt: skip
    k0s = site.settings.get("k0s_controller_host") or str(site.settings.get("join_k0s")).lower() == "true"
    if kube is None and k0s:
        raise RolloutError("the nodes join k0s here but provision_kubectl is not set: they would not be drained in k0s",
                           hint='set provision_kubectl to how this host runs kubectl, e.g. ["k0s", "kubectl"]')  # fmt: skip
    if kube is not None:
        ready = kube.ready(names)
        absent = [n for n in names if n not in ready]
        if absent:
            raise RolloutError(f"{', '.join(absent)}: not in the k0s cluster",
                               hint="join them to k0s first, or leave provision_kubectl unset")  # fmt: skip
        unready = [n for n in names if not ready[n]]
        if unready:
            raise RolloutError(f"{', '.join(unready)}: not Ready in k0s",
                               hint="a rollout starts from nodes in service: fix them or leave them out")  # fmt: skip
    current = backend.next_versions(names)
    missing = [n for n in names if n not in current]
    if missing:
        raise RolloutError(f"{', '.join(missing)}: not registered with the boot backend",
                           hint="provision node sync, or boot them once with provision node boot")  # fmt: skip
    target = f"{image}/{version}"
    reported = {n: r.this_boot_report().get("release", "") for n, r in joins.items()}
    skipped = [n for n in names if current[n] == version and reported.get(n) == target]
    todo = [n for n in names if n not in skipped]
    # Canaries: idle nodes first, so the first verdict does not wait for someone's job.
    ordered = sorted(todo, key=lambda n: (states[n].busy, names.index(n)))
    canaries = ordered[: request.canary]
    rest = [n for n in todo if n not in canaries]
    waves = ([tuple(canaries)] if canaries else []) + [tuple(rest[i : i + limit]) for i in range(0, len(rest), limit)]
    return Plan(image, version, tuple(waves), {n: current[n] for n in names}, tuple(skipped), limit, states)

"""Kubernetes (k0s) nodes as a rollout needs them: Ready or not, cordon, drain, uncordon.

Through ``kubectl`` as the site runs it from the admin host
(``provision_kubectl``, an argv prefix such as ``[k0s, kubectl]`` or
``[ssh, k0s-controller, k0s, kubectl]``); nothing is configured when the site
does not set it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from provision import proc
from provision.errors import CommandError, ProvisionError


class KubeError(ProvisionError):
    """kubectl could not be run or refused a request."""


@dataclass(frozen=True)
class Kubectl:
    argv: tuple[str, ...]
    timeout: float = 120.0

    @classmethod
    def from_vars(cls, variables: Mapping[str, Any]) -> Kubectl | None:
        """``provision_kubectl`` (a list of strings), or None when the site does not use k0s for rollouts."""
        value = variables.get("provision_kubectl")
        if not value:
            return None
        if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
            raise KubeError(f"provision_kubectl: {value!r} is not a command line",
                            hint='write a list, e.g. ["k0s", "kubectl"]')  # fmt: skip
        return cls(tuple(value))

    def _run(self, *args: str, timeout: float | None = None) -> str:
        try:
            return proc.output([*self.argv, *args], what=f"kubectl {' '.join(args[:2])}",
                               timeout=timeout or self.timeout, hint="check provision_kubectl and the k0s controller")  # fmt: skip
        except CommandError as exc:
            raise KubeError(exc.message, hint=exc.hint) from exc

    def ready(self, names: Sequence[str]) -> dict[str, bool]:
        """Ready per named node the cluster knows (an unknown name is absent)."""
        data = json.loads(self._run("get", "nodes", "-o", "json") or "{}")
        found = {}
        for item in data.get("items", []):
            name = item.get("metadata", {}).get("name")
            conditions = item.get("status", {}).get("conditions", [])
            if name in names:
                found[name] = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return found

    def drain(self, name: str, timeout: float) -> None:
        """Cordon, then evict its pods (DaemonSets stay; emptyDir data goes with the pod)."""
        self._run("cordon", name)
        self._run("drain", name, "--ignore-daemonsets", "--delete-emptydir-data", f"--timeout={int(timeout)}s",
                  timeout=timeout + 30)  # fmt: skip

    def uncordon(self, name: str) -> None:
        self._run("uncordon", name)

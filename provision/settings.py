"""Site settings: one typed, frozen object built once when the inventory loads.

Every part of provision reads the site-wide settings from here (the state
directory, the image store, the site's image definitions, package mirrors,
the boot backend and its variables, the pinned host keys), and the
playbooks get the same values as extra vars (``playbook_vars``), so the CLI
and a plain ``ansible-playbook`` run agree on every path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from provision.boot.base import DEFAULT_BACKEND, BackendName
from provision.errors import InventoryError

BACKENDS = tuple(b.value for b in BackendName)
STATE_DIR_ENV = "PROVISION_STATE_DIR"


def _path(value: Any, key: str, base: Path) -> Path | None:
    """A path setting, relative ones against the inventory directory."""
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bool):
        raise InventoryError(f"{key}: {value!r} is not a path", hint=f"write {key} as a directory path string")
    text = os.fspath(value)
    if "\0" in text or "\n" in text:
        raise InventoryError(f"{key}: {value!r} is not a path", hint="remove control characters from the path")
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


@dataclass(frozen=True)
class SiteSettings:
    """The site-wide settings (group_vars/all), resolved and checked."""

    inventory_dir: Path
    state_dir: Path  # provision_state_dir (or $PROVISION_STATE_DIR), default <inventory>/.state
    image_store: Path  # provision_image_store, default <state_dir>/images
    images_dir: Path | None  # provision_images_dir: the site's own image definitions
    network: str | None  # provision_network
    default_image: str | None  # provision_default_image
    boot_backend: str  # provision_boot_backend: builtin | grendel
    mirrors: Mapping[str, str] = field(default_factory=dict)  # provision_mirrors
    slurm_bin_dir: Path | None = None  # provision_slurm_bin_dir: scontrol/srun on this host (None: PATH)
    boot_netns: str | None = None  # provision_boot_netns: the boot services' network namespace (the lab)
    #: The rest of group_vars/all (rendered; lookups kept as written; no BMC password).
    variables: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def known_hosts_dir(self) -> Path:
        """Where this boot's pinned SSH host keys live, one file per node."""
        return self.state_dir / "known_hosts"

    @property
    def boot_state_dir(self) -> Path:
        return self.state_dir / "boot"

    def get(self, key: str, default: Any = None) -> Any:
        """A site variable (``provision_*``) that has no typed field."""
        return self.variables.get(key, default)

    def backend_vars(self) -> dict[str, Any]:
        """The variables a boot backend reads, with the resolved values in place."""
        config = dict(self.variables)
        config.update(
            provision_state_dir=str(self.state_dir),
            provision_image_store=str(self.image_store),
            provision_network=self.network,
            provision_default_image=self.default_image,
            provision_boot_backend=self.boot_backend,
        )
        return config

    def playbook_vars(self) -> dict[str, str]:
        """Extra vars for the playbooks, so they read the same paths as the CLI."""
        return {"provision_state_dir": str(self.state_dir), "join_known_hosts_dir": str(self.known_hosts_dir)}

    @classmethod
    def from_vars(cls, variables: Mapping[str, Any], inventory_dir: Path) -> SiteSettings:
        """Build from rendered group_vars/all; raises InventoryError naming the variable."""
        base = Path(inventory_dir)
        state = _path(
            os.environ.get(STATE_DIR_ENV) or variables.get("provision_state_dir"), "provision_state_dir", base
        )
        state_dir = state or (base / ".state").resolve()
        store = _path(variables.get("provision_image_store"), "provision_image_store", base)
        images_dir = _path(variables.get("provision_images_dir"), "provision_images_dir", base)
        if images_dir is not None and base.is_dir() and images_dir.resolve().is_relative_to(base.resolve()):
            # Ansible reads every YAML file under an inventory directory as inventory: a definition
            # there would be parsed as hosts and groups (a planted one could add a rack).
            raise InventoryError(
                f"provision_images_dir: {images_dir} is inside the inventory directory {base}",
                hint="keep the site's image definitions beside the inventory, e.g. ../images",
            )
        network = variables.get("provision_network")
        if network is not None and not isinstance(network, str):
            raise InventoryError(f"provision_network: {network!r} is not a CIDR", hint="write e.g. 10.10.0.0/16")
        default_image = variables.get("provision_default_image")
        if default_image is not None and not isinstance(default_image, str):
            raise InventoryError(
                f"provision_default_image: {default_image!r} is not an image name", hint="write an image name"
            )
        backend = variables.get("provision_boot_backend") or DEFAULT_BACKEND
        if not isinstance(backend, str) or backend.lower() not in BACKENDS:
            raise InventoryError(
                f"provision_boot_backend: unknown boot backend {backend!r}", hint=f"use one of: {', '.join(BACKENDS)}"
            )
        mirrors_raw = variables.get("provision_mirrors") or {}
        if not isinstance(mirrors_raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mirrors_raw.items()
        ):
            raise InventoryError(
                "provision_mirrors: must be a mapping of mirror name to URL", hint="fix group_vars/all"
            )
        slurm_bin_dir = _path(variables.get("provision_slurm_bin_dir"), "provision_slurm_bin_dir", base)
        rest = {k: v for k, v in variables.items() if not str(k).startswith("provision_bmc_password")}
        return cls(
            inventory_dir=base,
            state_dir=state_dir,
            image_store=store or state_dir / "images",
            images_dir=images_dir,
            network=network or None,
            default_image=default_image or None,
            boot_backend=backend.lower(),
            mirrors=MappingProxyType(dict(mirrors_raw)),
            slurm_bin_dir=slurm_bin_dir,
            boot_netns=str(variables["provision_boot_netns"]) if variables.get("provision_boot_netns") else None,
            variables=MappingProxyType(rest),
        )

"""Root-filesystem bootstrappers: one module per distribution family.

Each module declares only what differs between families (after mkosi's
``distribution/``): the tool that bootstraps a tree, the cache inputs, how
to list installed packages, and how to keep services from starting inside a
chroot. ``for_family()`` is the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from provision.errors import ImageError
from provision.image.definition import DistroFamily, ImageDefinition

LogFn = Callable[[str], None]


class Bootstrapper(Protocol):
    family: DistroFamily
    tool: str

    def tool_version(self) -> str:
        """The bootstrap tool's version (part of the cache key)."""
        ...

    def cache_inputs(self, definition: ImageDefinition) -> dict[str, Any]:
        """Everything that changes the bootstrap result, JSON-serialisable."""
        ...

    def bootstrap(self, definition: ImageDefinition, target: Path, workdir: Path, log: LogFn) -> None:
        """Bootstrap a root filesystem into the directory target (created here)."""
        ...

    def packages(self, root: Path) -> list[dict[str, str]]:
        """Installed packages: name, version, arch."""
        ...

    def block_services(self, root: Path) -> Callable[[], None]:
        """Keep package scripts from starting services; return the undo."""
        ...


def for_family(family: DistroFamily) -> Bootstrapper:
    from provision.image.distro import debian, redhat

    registry: dict[DistroFamily, Bootstrapper] = {
        DistroFamily.DEBIAN: debian.Debian(),
        DistroFamily.REDHAT: redhat.RedHat(),
    }
    try:
        return registry[family]
    except KeyError:  # pragma: no cover - the enum is closed
        raise ImageError(f"no bootstrapper for {family}") from None


def for_definition(definition: ImageDefinition) -> Bootstrapper:
    return for_family(definition.family)

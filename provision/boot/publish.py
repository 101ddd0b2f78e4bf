"""Publish an image version from the image store to a boot backend.

The built-in backend serves the store's files where they are and records the
version; nodes boot it once it is activated. Grendel serves files from its own
``provision.repo_dir``: the version's files are copied there (each file
written beside its target and renamed into place, so Grendel never serves
half a kernel) and the image is registered through its API.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.boot.base import BackendName, backend_config, get_backend
from provision.errors import BootError
from provision.image.store import ImageStore, ImageVersion


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    backend: str
    activated: bool
    where: str

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def publish(
    site: Any,
    store: ImageStore,
    name: str,
    *,
    version: str | None = None,
    backend: str | None = None,
    activate: bool = False,
    dry_run: bool = False,
) -> Published:
    """Make ``name`` (``version``, default the store's current) bootable on ``backend``."""
    config = backend_config(site)
    chosen = str(backend or config.get("provision_boot_backend") or BackendName.BUILTIN).lower()
    image = store.get(name, version) if version else store.current(name)
    image.verify()
    if chosen == BackendName.BUILTIN:
        return _publish_builtin(config, store, image, activate=activate, dry_run=dry_run)
    if chosen == BackendName.GRENDEL:
        return _publish_grendel(config, image, dry_run=dry_run)
    raise BootError(f"--to: unknown boot backend {chosen!r}", hint="use builtin or grendel")


def _publish_builtin(
    config: dict[str, Any], store: ImageStore, image: ImageVersion, *, activate: bool, dry_run: bool
) -> Published:
    from provision.boot.builtin import BuiltinBackend

    backend = get_backend(BackendName.BUILTIN, config)
    assert isinstance(backend, BuiltinBackend)
    _, active = backend.versions(image.name)
    becomes_active = activate or active is None
    if not dry_run:
        backend.add_store_version(store.root, image.name, image.version, activate=activate)
    return Published(image.name, image.version, BackendName.BUILTIN, becomes_active, backend.describe())


def _publish_grendel(config: dict[str, Any], image: ImageVersion, *, dry_run: bool) -> Published:
    from provision.grendel import GrendelSettings, image_for_export

    settings = GrendelSettings.from_config(config)
    boot_image = image_for_export(image.name, config, settings.repo_dir)
    repo = Path(settings.repo_dir)
    if not repo.is_dir():
        raise BootError(
            f"Grendel's repo directory {repo} is not on this machine",
            hint="run on the Grendel host, mount its repo_dir, or set provision_grendel_repo_dir",
        )
    copies = [(image.kernel, Path(boot_image.kernel))]
    copies += [(image.initrd, Path(p)) for p in boot_image.initrds[:1]]
    if boot_image.squashfs:
        copies.append((image.squashfs, Path(boot_image.squashfs)))
    if not dry_run:
        for source, target in copies:
            _copy_atomic(source, target)
        backend = get_backend(BackendName.GRENDEL, config)
        try:
            backend.put_images([boot_image])
        finally:
            backend.close()
    return Published(image.name, image.version, BackendName.GRENDEL, True, settings.where)


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BootError(f"cannot copy {source.name} to {target}: {exc.strerror}", hint="check the directory") from exc

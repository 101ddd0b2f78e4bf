"""Publish an image version from the image store to a boot backend.

The version's files are checked against its manifest, then the backend
makes it bootable (``BootBackend.publish``): the built-in backend serves the
store's files where they are and records the version; Grendel gets the files
copied into its repo directory and the image registered through its API.
"""

from __future__ import annotations

from provision.boot.base import Published, backend_for
from provision.image.store import ImageStore
from provision.inventory import Site


def publish(
    site: Site,
    store: ImageStore,
    name: str,
    *,
    version: str | None = None,
    to: str | None = None,
    activate: bool = False,
    dry_run: bool = False,
) -> Published:
    """Make ``name`` (``version``, default the store's current) bootable on the site's backend (or ``to``)."""
    backend = backend_for(site, to)
    try:
        image = store.get(name, version) if version else store.current(name)
        image.verify()
        return backend.publish(store, image, activate=activate, dry_run=dry_run)
    finally:
        backend.close()

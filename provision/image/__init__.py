"""Stateless images: definitions, bootstrap, roles, initramfs, squashfs, store.

Boot backends need only ``ImageStore(path).current(name)`` (an
``ImageVersion`` with ``kernel``, ``initrd``, ``squashfs``, ``manifest``).
"""

from provision.image.store import ImageStore, ImageVersion

__all__ = ["ImageStore", "ImageVersion"]

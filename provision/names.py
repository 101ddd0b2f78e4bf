"""The naming rules every part of provision shares: hosts, images, versions."""

from __future__ import annotations

import re

# RFC 952 host names as Grendel validates them and DHCP/DNS want them: one
# label, a letter first, letters, digits and inner hyphens, at most 63.
# Dotted names are refused everywhere (inventory check and every backend):
# a node's name is its short host name; the domain belongs to the site's DNS.
_HOST = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
# Image names and versions become one path component (image store, web root,
# Grendel's repo_dir): never empty, never '.' or '..', no '/' and no control
# character, bounded length.
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")

HOST_RULE = "use one label of letters, digits and inner '-', starting with a letter, no dots (e.g. cn01)"
IMAGE_RULE = "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (e.g. compute-rocky9)"
VERSION_RULE = "use letters, digits, '.', '_', '+' and '-', starting with a letter or digit (e.g. 20260101-120000)"


def host_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid node name, or None."""
    lowered = str(name).strip().lower()
    if _HOST.match(lowered):
        return None
    if "." in lowered:
        return f"{name!r} has a dot: node names are short host names (RFC 952)"
    return f"{name!r} is not a valid host name (RFC 952)"


def is_image_name(name: str) -> bool:
    """A valid image name once lower-cased and stripped (what backends normalise to)."""
    return bool(_IMAGE.fullmatch(str(name).strip().lower()))


def is_exact_image_name(name: object) -> bool:
    """A valid image name as written: what a path in the image store may be called."""
    return isinstance(name, str) and bool(_IMAGE.fullmatch(name))


def is_version(version: object) -> bool:
    """A valid image version as written (store directories, backend records)."""
    return isinstance(version, str) and bool(_VERSION.fullmatch(version))

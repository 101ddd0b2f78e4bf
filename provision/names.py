"""The naming rules every part of provision shares: hosts, images, versions."""

from __future__ import annotations

import re

# RFC 952 host names as Grendel validates them and DHCP/DNS want them: one
# label, a letter first, letters, digits and inner hyphens, at most 63.
# Dotted names are refused everywhere (inventory check and every backend):
# a node's name is its short host name; the domain belongs to the site's DNS.
_HOST = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

HOST_RULE = "use one label of letters, digits and inner '-', starting with a letter, no dots (e.g. cn01)"
IMAGE_RULE = "use lower-case letters, digits, '.', '_' and '-' (e.g. compute-rocky9)"


def host_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid node name, or None."""
    lowered = str(name).strip().lower()
    if _HOST.match(lowered):
        return None
    if "." in lowered:
        return f"{name!r} has a dot: node names are short host names (RFC 952)"
    return f"{name!r} is not a valid host name (RFC 952)"


def is_image_name(name: str) -> bool:
    return bool(_IMAGE.match(str(name).strip().lower()))

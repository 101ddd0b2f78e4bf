"""The manifest: what an image is, how it was made, and its artefacts' hashes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from provision import __version__, proc
from provision.catalog import ROLES_DIR, SOURCE_CHECKOUT
from provision.image.definition import ImageDefinition
from provision.image.store import ARTEFACTS, MANIFEST, sha256_file

FORMAT = 1


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def role_revisions(roles: tuple[str, ...], roles_dir: Path = ROLES_DIR) -> list[dict[str, Any]]:
    """Each role's git revision (last commit touching it, dirty flag) and content hash."""
    result = []
    for role in roles:
        path = roles_dir / role
        entry: dict[str, Any] = {"name": role, "sha256": _tree_digest(path) if path.is_dir() else None}
        entry["revision"] = entry["dirty"] = None  # an installed provision: no checkout to ask
        if SOURCE_CHECKOUT is not None:
            source = SOURCE_CHECKOUT / "roles" / role
            rev = proc.run(["git", "-C", SOURCE_CHECKOUT, "log", "-1", "--format=%H", "--", source], check=False)
            entry["revision"] = rev.stdout.strip() or None if rev.returncode == 0 else None
            dirty = proc.run(["git", "-C", SOURCE_CHECKOUT, "status", "--porcelain", "--", source], check=False)
            entry["dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
        result.append(entry)
    return result


def build_manifest(
    *,
    definition: ImageDefinition,
    version: str,
    kernel_version: str,
    cmdline: str,
    packages: list[dict[str, str]],
    out_dir: Path,
    stages: Mapping[str, float],
    bootstrap: Mapping[str, Any],
    sizes: Mapping[str, int],
) -> dict[str, Any]:
    artefacts = {}
    for filename in ARTEFACTS.values():
        path = out_dir / filename
        artefacts[filename] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {
        "format": FORMAT,
        "name": definition.name,
        "version": version,
        "description": definition.description,
        "distro": definition.distro.value,
        "release": definition.release,
        "family": definition.family.value,
        "kernel": {"version": kernel_version, "cmdline": cmdline},
        "roles": role_revisions(definition.roles),
        "variables": definition.public_variables(),
        "mirrors": dict(definition.mirrors),
        "packages": packages,
        "bootstrap": dict(bootstrap),
        "squashfs": {
            "compression": definition.squashfs.compression.value,
            "level": definition.squashfs.level,
            "block_size": definition.squashfs.block_size,
        },
        "sizes": dict(sizes),
        "artefacts": artefacts,
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "built_by": {"provision": __version__, "host": socket.gethostname(), "uid": os.geteuid()},
    }


def write(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    path.chmod(0o644)
    return path


#: Inside the image: which image and version this root filesystem is (read by the join agent, reported at each boot).
RELEASE_FILE = "etc/provision-release"


def release_text(name: str, version: str) -> str:
    """``/etc/provision-release``: shell-readable, like os-release."""
    return f"PROVISION_IMAGE={name}\nPROVISION_VERSION={version}\n"


def write_release(root: Path, name: str, version: str) -> Path:
    path = root / RELEASE_FILE
    path.write_text(release_text(name, version))
    path.chmod(0o644)
    return path

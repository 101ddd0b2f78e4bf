"""Secrets never enter an image: scan a root filesystem before it is packed.

An image is served unauthenticated over HTTP to anything on the provisioning
network, so the build fails if the tree holds a MUNGE key, a private key
(PEM or OpenSSH, SSH host keys included), a WireGuard private key, a token
file, or a password hash that is not locked in /etc/shadow. Findings name
the file; the content is never echoed.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from provision.errors import ImageError

_MAX_READ = 256 * 1024
# Trees that cannot hold a planted secret or are not real files.
_SKIP_DIRS = {"proc", "sys", "dev", "run", "lib/modules", "usr/lib/modules", "usr/share/doc", "usr/share/man"}
_PEM = re.compile(rb"-----BEGIN ((RSA|DSA|EC|OPENSSH|ENCRYPTED) )?PRIVATE KEY-----")
_WG_KEY = re.compile(rb"^\s*PrivateKey\s*=\s*[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\s*$", re.MULTILINE)
_WG_BARE = re.compile(rb"^\s*[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\s*$")
_TOKEN_NAME = re.compile(r"(^|[._-])(join-?)?token([._-]|$)|^token$", re.IGNORECASE)
# Where operators and services put token files; /usr holds code (token.py).
_TOKEN_DIRS = ("etc", "var/lib", "root", "opt", "srv", "home")


class SecretKind(StrEnum):
    MUNGE_KEY = "MUNGE key"
    PRIVATE_KEY = "private key"
    WIREGUARD_KEY = "WireGuard private key"
    TOKEN = "token file"
    PASSWORD_HASH = "password hash"


@dataclass(frozen=True)
class Finding:
    path: str  # inside the image, absolute
    kind: SecretKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.kind.value}" + (f" ({self.detail})" if self.detail else "")


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)).removeprefix("./") not in _SKIP_DIRS
        ]
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield os.path.normpath(os.path.join("/", rel_dir, name)), st


def _shadow(root: Path) -> list[Finding]:
    findings: list[Finding] = []
    shadow = root / "etc/shadow"
    if not shadow.is_file():
        return findings
    for line in shadow.read_text(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) < 2 or not parts[0]:
            continue
        user, field = parts[0], parts[1]
        if field == "":
            findings.append(Finding("/etc/shadow", SecretKind.PASSWORD_HASH, f"{user} has an empty password"))
        elif not field.startswith(("!", "*")):
            findings.append(Finding("/etc/shadow", SecretKind.PASSWORD_HASH, f"{user} has a password hash"))
    return findings


def scan(root: Path) -> list[Finding]:
    """Every secret found in the tree at root."""
    findings: list[Finding] = []
    for path, st in _walk(root):
        name = os.path.basename(path)
        if name == "munge.key" or (path.startswith("/etc/munge/") and name.endswith(".key")):
            if st.st_size > 0:
                findings.append(Finding(path, SecretKind.MUNGE_KEY))
            continue
        if _TOKEN_NAME.search(name) and path.lstrip("/").startswith(_TOKEN_DIRS) and st.st_size > 0:
            findings.append(Finding(path, SecretKind.TOKEN))
            continue
        if st.st_size == 0 or st.st_size > _MAX_READ or path == "/etc/shadow":
            continue
        try:
            with open(root / path.lstrip("/"), "rb") as handle:
                data = handle.read(_MAX_READ)
        except OSError:
            continue
        if b"\0" in data:
            continue  # binaries carry PEM markers as strings; key files are text
        if _PEM.search(data):
            findings.append(Finding(path, SecretKind.PRIVATE_KEY))
        elif _WG_KEY.search(data) or (path.startswith("/etc/wireguard/") and _WG_BARE.match(data)):
            findings.append(Finding(path, SecretKind.WIREGUARD_KEY))
    findings += _shadow(root)
    return sorted(findings, key=lambda f: (f.path, f.kind))


def require_clean(root: Path) -> None:
    """Raise ImageError naming the first secret found (and how many)."""
    if not (root / "etc").is_dir() or not (root / "usr").is_dir():
        raise ImageError(f"{root} holds no root filesystem (no /etc, /usr) to scan", hint="report this as a bug")
    findings = scan(root)
    if findings:
        more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
        raise ImageError(
            f"secret in the image: {findings[0]}{more}",
            hint="secrets are fetched at boot, never baked in: remove it from the role (see postboot)",
        )

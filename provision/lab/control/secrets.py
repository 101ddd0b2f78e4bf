"""The control node's secrets: MUNGE key, generated passwords, a private TLS CA.

Each is created once under ``paths.secrets`` / ``paths.tls`` and reused on
later starts (booted nodes keep the MUNGE key they were given); files are
written with their final mode and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets

from provision.files import write_atomic
from provision.lab.control.config import ControlPlaneConfig, ControlPlanePaths
from provision.proc import run


def ssha(password: str) -> str:
    """An LDAP ``{SSHA}`` hash of ``password``."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def ensure_munge_key(paths: ControlPlanePaths) -> None:
    key = paths.munge_key
    if key.is_file() and key.stat().st_size >= 32:
        key.chmod(0o400)
        return
    write_atomic(key, secrets.token_bytes(1024), mode=0o400)


def ensure_password(paths: ControlPlanePaths, name: str) -> str:
    """The password ``name`` (``secrets/NAME.password``, 0600), generated on first use."""
    path = paths.password_file(name)
    if path.is_file():
        value = path.read_text().strip()
        if value:
            path.chmod(0o600)
            return value
    value = secrets.token_urlsafe(24)
    write_atomic(path, value, mode=0o600)
    return value


def ensure_tls(paths: ControlPlanePaths, config: ControlPlaneConfig) -> None:
    """A CA (kept) and a server certificate for slapd (re-issued: it follows the address)."""
    tls = paths.tls
    tls.mkdir(mode=0o755, exist_ok=True)
    ca_key, ca_crt = tls / "ca.key", tls / "ca.crt"
    key, crt = tls / "server.key", tls / "server.crt"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    if not (ca_key.is_file() and ca_crt.is_file()):
        subject = f"/CN=provision lab CA ({config.cluster_name})"
        ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
        run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-keyout",
                ca_key,
                "-out",
                ca_crt,
                "-days",
                "365",
                "-subj",
                subject,
                *ca_ext,
            ]
        )
    ext = tls / "server.ext"
    san = f"subjectAltName=IP:{config.address},DNS:{config.hostname}"
    ext.write_text(f"{san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    csr = tls / "server.csr"
    run(["openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={config.hostname}"])
    sign: list[str | os.PathLike[str]] = ["-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-days", "365"]
    run(["openssl", "x509", "-req", "-in", csr, *sign, "-extfile", ext, "-out", crt])
    for f, mode in ((ca_key, 0o600), (key, 0o600), (ca_crt, 0o644), (crt, 0o644)):
        f.chmod(mode)

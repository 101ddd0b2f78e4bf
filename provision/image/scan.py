"""Secrets never enter an image: scan a root filesystem and its initramfs before they are served.

An image and its initramfs are served unauthenticated over HTTP and TFTP to
anything on the provisioning network, so the build fails if either holds a
secret: private keys in any format (PEM, PKCS#8, encrypted PEM, OpenSSH,
PuTTY, SSH2, PGP, age, WireGuard, OpenVPN, JWK), MUNGE and Slurm keys,
Kerberos keytabs, password hashes (locked ones included: a `!` in front does
not stop a hash from being cracked), password and credential files
(.pgpass, .netrc, cloud CLIs, kubeconfig, container registry auth, .my.cnf),
passwords in service configs (slurmdbd `StoragePass`, SSSD `authtok`,
Wi-Fi PSKs), token files and well-known token formats. Every regular file is
read, large and binary ones included, in chunks that overlap so a key across
a chunk boundary is still seen. Findings name the file and the kind; the
content is never echoed.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from provision import proc
from provision.errors import CommandError, ImageError

# Variable names that look secret: never copied into a manifest or a log
# (provision/image/definition.py filters image variables with it).
SECRET_VARIABLE = re.compile(
    r"passw|passphrase|secret|token|private|credential|creds?($|_)|api_?key|bearer|jwt|psk|authtok|cookie"
    r"|keytab|(^|_)key$|(^|_)(pw|pwd|pass|pin)($|_)",
    re.IGNORECASE,
)

_CHUNK = 1 << 20
_OVERLAP = 8 << 10  # longer than any pattern below can need
_SMALL = 1 << 20  # account and config files are read whole up to this size


class SecretKind(StrEnum):
    MUNGE_KEY = "MUNGE key"
    SLURM_KEY = "Slurm key"
    PRIVATE_KEY = "private key"
    PGP_PRIVATE_KEY = "PGP private key"
    PUTTY_KEY = "PuTTY private key"
    AGE_KEY = "age secret key"
    WIREGUARD_KEY = "WireGuard private key"
    OPENVPN_KEY = "OpenVPN static key"
    JWK_PRIVATE_KEY = "JWK private key"
    KEY_FILE = "key file"
    KEYSTORE = "PKCS#12 keystore"
    KEYTAB = "Kerberos keytab"
    TOKEN = "token file"
    TOKEN_VALUE = "access token"
    PASSWORD_HASH = "password hash"
    PASSWORD_FILE = "password file"
    PASSWORD = "password in a config file"
    CLOUD_CREDENTIALS = "cloud credentials"
    KUBECONFIG_CREDENTIALS = "kubeconfig credentials"
    REGISTRY_AUTH = "container registry credentials"
    SECRET_FILE = "secret file"


@dataclass(frozen=True)
class Finding:
    path: str  # inside the image (or the initramfs), absolute
    kind: SecretKind
    detail: str = ""
    source: str = ""  # "" for the image's root filesystem, else e.g. "initrd.img"
    by_name: bool = field(default=False, compare=False)  # a secret by its name, whatever the content

    def __str__(self) -> str:
        where = f"{self.source}:{self.path}" if self.source else self.path
        return f"{where}: {self.kind.value}" + (f" ({self.detail})" if self.detail else "")


# -- rules on names -------------------------------------------------------------

# Where operators and services put secrets; /usr holds code and public data.
_CONFIG_DIRS = ("etc/", "var/", "root/", "home/", "opt/", "srv/", "usr/local/etc/", "run/")
# Code and documentation named like a secret (token.py, credentials.rb) is not one.
_CODE_SUFFIXES = (
    ".py", ".pyc", ".pyi", ".so", ".js", ".mjs", ".ts", ".rb", ".pm", ".pl", ".go", ".h", ".c", ".java", ".class",
    ".html", ".md", ".rst", ".txt.gz", ".gz", ".json.schema", ".mo", ".po", ".list", ".md5sums", ".conffiles",
)  # fmt: skip
_TOKEN_NAME = re.compile(r"(^|[._-])(join-?|api-?|access-?|auth-?|bearer-?|refresh-?)?token(s)?([._-]|$)", re.I)
_SECRET_NAME = re.compile(
    r"(^|[._-])(secrets?|passphrase|password|passwd\.txt|pw|pass|apikey|api-?key|jwt)([._-]|$)|\.secret$", re.I
)
_SSH_KEY_NAME = re.compile(r"^(ssh_host_[a-z0-9]+_key|id_(rsa|dsa|ecdsa|ed25519)(_sk)?|identity)$")
_CLOUD_FILES = {
    ".aws/credentials": "AWS",
    ".aws/config": "",  # only when it holds a key (content rule)
    ".config/gcloud/credentials.db": "gcloud",
    ".config/gcloud/access_tokens.db": "gcloud",
    ".config/gcloud/application_default_credentials.json": "gcloud",
    ".azure/accessTokens.json": "Azure",
    ".azure/msal_token_cache.json": "Azure",
    ".azure/msal_token_cache.bin": "Azure",
    ".azure/service_principal_entries.json": "Azure",
    ".azure/service_principal_entries.bin": "Azure",
    ".oci/config": "",
    ".s3cfg": "",
    ".boto": "",
}
# Account databases, checked field by field.
_ACCOUNT_FILES = {
    "/etc/shadow": "shadow",
    "/etc/shadow-": "shadow",
    "/etc/gshadow": "gshadow",
    "/etc/gshadow-": "gshadow",
    "/etc/passwd": "passwd",
    "/etc/passwd-": "passwd",
    "/etc/group": "group",
    "/etc/group-": "group",
}


def _meaningful(data: bytes) -> bool:
    """Anything besides blank lines and comments (a shipped template is not a secret)."""
    for line in data.splitlines():
        text = line.strip()
        if text and not text.startswith((b"#", b";", b"//")):
            return True
    return False


def _public_key_material(data: bytes) -> bool:
    """A public key, certificate or public keyring saved under a key-like name."""
    head = data.lstrip()[:64]
    return (
        head.startswith(
            (
                b"-----BEGIN PGP PUBLIC KEY",
                b"-----BEGIN PUBLIC KEY",
                b"-----BEGIN CERTIFICATE",
                b"-----BEGIN RSA PUBLIC",
            )
        )
        or head.startswith((b"ssh-", b"ecdsa-sha2-", b"sk-ssh-", b"sk-ecdsa-"))
        or (bool(data) and data[0] in (0x98, 0x99, 0xC6))  # OpenPGP public-key packet
    )


def _name_rule(path: str) -> tuple[SecretKind, str, bool] | None:
    """(kind, detail, needs meaningful content) for a path that is a secret by its name alone."""
    name = os.path.basename(path)
    rel = path.lstrip("/")
    lower = name.lower()
    if lower == "munge.key" or (rel.startswith("etc/munge/") and lower.endswith(".key")):
        return SecretKind.MUNGE_KEY, "", False
    if re.fullmatch(r"jwt.*\.key|slurm\.key", lower) or (
        re.match(r"(etc|var/(spool|lib))/slurm", rel) and lower.endswith(".key")
    ):
        return SecretKind.SLURM_KEY, "", False
    if lower.endswith(".keytab") or lower == "keytab":
        return SecretKind.KEYTAB, "", False
    if lower.endswith((".p12", ".pfx")):
        return SecretKind.KEYSTORE, "", False
    if _SSH_KEY_NAME.match(name):
        return SecretKind.PRIVATE_KEY, "SSH key by name", False
    if name == "secring.gpg" or "/private-keys-v1.d/" in path:
        return SecretKind.PGP_PRIVATE_KEY, "", False
    for suffix, cloud in _CLOUD_FILES.items():
        if cloud and path.endswith("/" + suffix):
            return SecretKind.CLOUD_CREDENTIALS, cloud, False
    if lower in (".pgpass", "pgpass.conf"):
        return SecretKind.PASSWORD_FILE, "PostgreSQL", True
    if lower in (".netrc", "_netrc", ".git-credentials", ".dockercfg", ".vault_pass", ".vault-password"):
        return SecretKind.PASSWORD_FILE, name, True
    if path == "/etc/security/opasswd":
        return SecretKind.PASSWORD_HASH, "old passwords", True
    if re.match(r"etc/credstore(\.encrypted)?/", rel):
        return SecretKind.SECRET_FILE, "systemd credential", False
    if not rel.startswith(_CONFIG_DIRS) or lower.endswith(_CODE_SUFFIXES) or rel.startswith("etc/pam.d/"):
        return None
    if _TOKEN_NAME.search(name):
        return SecretKind.TOKEN, "", True
    if _SECRET_NAME.search(name):
        return SecretKind.SECRET_FILE, "", True
    if lower.endswith(".key") or lower == "key":
        return SecretKind.WIREGUARD_KEY if rel.startswith("etc/wireguard/") else SecretKind.KEY_FILE, "", True
    return None


# -- rules on contents --------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    kind: SecretKind
    markers: tuple[bytes, ...]  # one must occur in the chunk before the regex runs
    pattern: re.Pattern[bytes]
    detail: str = ""
    config_only: bool = False  # only under _CONFIG_DIRS (public code quotes examples)
    text_only: bool = False  # not in files with NUL bytes
    names: re.Pattern[str] | None = None  # only in files with these names


_B64 = rb"[A-Za-z0-9+/=]"
_NL = rb"(?:\r?\n|\\(?:r\\)?n)"  # a line break, or one escaped inside a JSON string
_PEM_BODY = _NL + rb"(?:[A-Za-z-]+: ?[^\r\n\\]*" + _NL + rb")*" + _NL + rb"?" + _B64 + rb"{16,}"
_RULES: tuple[_Rule, ...] = (
    # PEM of any private key (PKCS#1, PKCS#8, encrypted PEM, EC, OpenSSH, …), in a file or a JSON string; the
    # body must follow (binaries quote the bare marker).
    _Rule(
        SecretKind.PRIVATE_KEY,
        (b"PRIVATE KEY-----",),
        re.compile(rb"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----" + _PEM_BODY),
    ),
    _Rule(
        SecretKind.PGP_PRIVATE_KEY,
        (b"PGP PRIVATE KEY BLOCK",),
        re.compile(rb"-----BEGIN PGP PRIVATE KEY BLOCK-----" + _PEM_BODY),
    ),
    _Rule(
        SecretKind.PGP_PRIVATE_KEY,
        (b"private-key",),
        re.compile(rb"\(\d+:(protected-)?private-key\(|^Key: \((protected-)?private-key", re.M),
        "gpg-agent key",
    ),
    _Rule(
        SecretKind.PRIVATE_KEY,
        (b"SSH2 ENCRYPTED PRIVATE KEY", b"SSH2 PRIVATE KEY", b"SSH PRIVATE KEY FILE FORMAT"),
        re.compile(rb"---- BEGIN SSH2 (ENCRYPTED )?PRIVATE KEY ----\r?\n|^SSH PRIVATE KEY FILE FORMAT 1\.1\n", re.M),
    ),
    _Rule(SecretKind.PUTTY_KEY, (b"PuTTY-User-Key-File",), re.compile(rb"PuTTY-User-Key-File-\d: ")),
    _Rule(SecretKind.AGE_KEY, (b"AGE-SECRET-KEY-",), re.compile(rb"AGE-SECRET-KEY-1[0-9A-Z]{58}")),
    _Rule(
        SecretKind.PRIVATE_KEY,
        (b"secret key",),
        re.compile(rb"^untrusted comment: (minisign encrypted |signify )secret key", re.M),
        "minisign/signify",
    ),
    _Rule(
        SecretKind.OPENVPN_KEY,
        (b"OpenVPN Static key",),
        re.compile(rb"-----BEGIN OpenVPN Static key V1-----\r?\n[0-9a-f]{32}"),
    ),
    _Rule(
        SecretKind.WIREGUARD_KEY,
        (b"PrivateKey", b"privatekey", b"Privatekey"),
        re.compile(rb"^\s*PrivateKey\s*=\s*[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\s*$", re.M | re.I),
    ),
    _Rule(
        SecretKind.JWK_PRIVATE_KEY,
        (b'"kty"',),
        re.compile(
            rb'"kty"\s*:\s*"(RSA|EC|OKP|oct)"[^{}]*"(d|k)"\s*:\s*"[A-Za-z0-9_-]{16,}"|'
            rb'"(d|k)"\s*:\s*"[A-Za-z0-9_-]{16,}"[^{}]*"kty"\s*:\s*"(RSA|EC|OKP|oct)"'
        ),
    ),
    # Cloud CLIs, kubeconfig, registries.
    _Rule(
        SecretKind.CLOUD_CREDENTIALS,
        (b"aws_secret_access_key", b"AWS_SECRET_ACCESS_KEY", b"aws_session_token"),
        re.compile(rb"(aws_secret_access_key|aws_session_token)\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{16,}", re.I),
        "AWS",
    ),
    _Rule(
        SecretKind.CLOUD_CREDENTIALS,
        (b'"service_account"', b'"authorized_user"', b'"external_account"'),
        re.compile(rb'"type"\s*:\s*"(service_account|authorized_user|external_account)"'),
        "Google",
    ),
    _Rule(
        SecretKind.CLOUD_CREDENTIALS,
        (b"secret_key", b"access_key"),
        re.compile(rb"^\s*(secret_key|gs_secret_access_key)\s*=\s*[A-Za-z0-9/+=]{16,}", re.M),
        "S3",
        config_only=True,
        text_only=True,
    ),
    _Rule(
        SecretKind.KUBECONFIG_CREDENTIALS,
        (b"client-key-data", b"token:", b"password:", b"auth-provider"),
        re.compile(
            rb"^\s*(client-key-data|token|id-token|refresh-token|password):\s*['\"]?[A-Za-z0-9._~+/=-]{8,}",
            re.M,
        ),
        text_only=True,
        names=re.compile(r"(^|[._-])(kube|kubeconfig|config|admin\.conf|kubelet\.conf)", re.I),
    ),
    _Rule(
        SecretKind.REGISTRY_AUTH,
        (b'"auth"', b'"identitytoken"', b'"registrytoken"'),
        re.compile(rb'"(auth|identitytoken|registrytoken)"\s*:\s*"[A-Za-z0-9+/=._-]{8,}"', re.I),
        text_only=True,
        names=re.compile(r"(config|auth|\.dockercfg|registries).*(json)?$|\.dockercfg$", re.I),
    ),
    # Passwords in service configs.
    _Rule(
        SecretKind.PASSWORD,
        (b"StoragePass", b"storagepass", b"STORAGEPASS", b"Storagepass"),
        re.compile(rb"^[ \t]*(Accounting)?StoragePass[ \t]*=[ \t]*\S", re.M | re.I),
        "Slurm StoragePass",
        text_only=True,
    ),
    _Rule(
        SecretKind.PASSWORD,
        (b"authtok", b"bindpw", b"rootpw", b"BINDPW"),
        re.compile(rb"^[ \t]*(ldap_default_authtok|ldap_tls_key_pass|bindpw|rootpw)[ \t]*[=: \t][ \t]*\S", re.M | re.I),
        "LDAP bind password",
        config_only=True,
        text_only=True,
    ),
    _Rule(
        SecretKind.PASSWORD,
        (b"password", b"psk", b"Password", b"PASSWORD"),
        re.compile(rb"^[ \t]*(password|psk|wep-key0|private-key-password|pass)[ \t]*=[ \t]*\S", re.M | re.I),
        "password or PSK",
        text_only=True,
        names=re.compile(
            r"\.(nmconnection|my\.cnf|cnf)$|^(\.my\.cnf|wpa_supplicant.*\.conf|debian\.cnf|\.smbcredentials)$"
        ),
    ),
    _Rule(
        SecretKind.PASSWORD_FILE,
        (b"machine", b"password"),
        re.compile(rb"\bmachine\s+\S+\s+(login\s+\S+\s+)?password\s+\S+"),
        "netrc-style login",
        config_only=True,
        text_only=True,
    ),
    _Rule(
        SecretKind.PASSWORD,
        (b"://",),
        re.compile(rb"^[^#\n]*\b[a-z][a-z0-9+.-]{1,15}://[A-Za-z0-9._%~-]+:[^\s/@'\"<>{}$]{3,}@[A-Za-z0-9[]", re.M),
        "password in a URL",
        config_only=True,
        text_only=True,
    ),
    _Rule(
        SecretKind.PASSWORD,
        (b"PASS", b"SECRET", b"TOKEN", b"API_KEY", b"APIKEY", b"_PW"),
        re.compile(
            rb"^[ \t]*(export[ \t]+)?[A-Z0-9_]*(PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|API_?KEY|_PW|_PASS)"
            rb"[A-Z0-9_]*[ \t]*=[ \t]*['\"]?[^\s'\"$#{}<>]{6,}",
            re.M,
        ),
        "secret in an environment file",
        config_only=True,
        text_only=True,
    ),
    # Password hashes outside the account files (copies of shadow, htpasswd).
    _Rule(
        SecretKind.PASSWORD_HASH,
        (b":$", b":!$", b":{SHA}", b":{SSHA}"),
        re.compile(
            rb"^[^:\s#]+:!*(\$(1|2[abxy]?|5|6|7|y|gy|sha1|md5|apr1)\$[^:\s]{8,}|\{S?SHA\}[A-Za-z0-9+/=]{20,})",
            re.M,
        ),
        config_only=True,
        text_only=True,
    ),
    # Well-known token formats.
    _Rule(
        SecretKind.TOKEN_VALUE,
        (
            b"ghp_",
            b"gho_",
            b"ghu_",
            b"ghs_",
            b"ghr_",
            b"github_pat_",
            b"glpat-",
            b"xox",
            b"AKIA",
            b"ASIA",
            b"AIza",
            b"sk-",
            b"hf_",
            b"npm_",
            b"pypi-",
            b"eyJ",
        ),
        re.compile(
            rb"\b(gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,}|glpat-[A-Za-z0-9_-]{20}"
            rb"|xox[abprs]-[A-Za-z0-9-]{10,}|(AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|sk-[A-Za-z0-9_-]{32,}"
            rb"|hf_[A-Za-z0-9]{30,}|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_-]{50,}"
            rb"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{16,})"
        ),
        config_only=True,
    ),
)


# -- one file ----------------------------------------------------------------


def _chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The stream in chunks, each starting with the previous chunk's last _OVERLAP bytes."""
    tail = b""
    while True:
        block = read(_CHUNK)
        if not block:
            return
        yield tail + block
        tail = (tail + block)[-_OVERLAP:]


# Kinds a name only suggests: what the contents show is reported instead when it is more precise.
_GENERIC_NAME_KINDS = {SecretKind.KEY_FILE, SecretKind.SECRET_FILE, SecretKind.TOKEN, SecretKind.WIREGUARD_KEY}


def _scan_stream(path: str, size: int, read: Callable[[int], bytes]) -> list[Finding]:
    """The secrets in one file: by its name, by account fields, then by its contents (streamed)."""
    if size == 0:
        return []
    by_name = _name_rule(path)
    if by_name and not by_name[2]:
        return [Finding(path, by_name[0], by_name[1], by_name=True)]
    account = _ACCOUNT_FILES.get(path)
    head = read(_SMALL)
    if account:
        return _accounts(path, account, head)
    named = by_name is not None and _meaningful(head) and not _public_key_material(head)
    if by_name and named and by_name[0] not in _GENERIC_NAME_KINDS:
        return [Finding(path, by_name[0], by_name[1], by_name=True)]
    findings = _scan_contents(path, _chunks(_prefixed(head, read)))
    if by_name and named and not findings:
        return [Finding(path, by_name[0], by_name[1], by_name=True)]
    return findings


def _scan_contents(path: str, chunks: Iterable[bytes]) -> list[Finding]:
    findings: list[Finding] = []
    in_config = path.lstrip("/").startswith(_CONFIG_DIRS)
    name = os.path.basename(path)
    rules = [r for r in _RULES if (in_config or not r.config_only) and (r.names is None or r.names.search(name))]
    seen: set[tuple[SecretKind, str]] = set()
    binary = False
    for index, chunk in enumerate(chunks):
        if index == 0:
            binary = b"\0" in chunk[:8192]
        for rule in rules:
            if (rule.kind, rule.detail) in seen or (binary and rule.text_only):
                continue
            if any(m in chunk for m in rule.markers) and rule.pattern.search(chunk):
                seen.add((rule.kind, rule.detail))
                findings.append(Finding(path, rule.kind, rule.detail))
    return findings


def _prefixed(head: bytes, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """read() that first returns head (already read from the stream)."""
    pending = [head]

    def again(n: int) -> bytes:
        if pending:
            return pending.pop()
        return read(n)

    return again


def _accounts(path: str, kind: str, data: bytes) -> list[Finding]:
    """Hashes and empty passwords in shadow, gshadow, passwd and group (second field)."""
    findings: list[Finding] = []
    for raw in data.decode(errors="replace").splitlines():
        parts = raw.split(":")
        if len(parts) < 2 or not parts[0] or parts[0].startswith("#"):
            continue
        user, secret = parts[0], parts[1]
        if secret == "":
            # No password: a login without one (shadow, passwd); for groups it only limits newgrp.
            if kind in ("shadow", "passwd"):
                findings.append(Finding(path, SecretKind.PASSWORD_HASH, f"{user} has an empty password"))
            continue
        bare = secret.lstrip("!")
        if bare in ("", "*", "x") or bare.startswith("*"):
            continue
        state = "locked password hash" if secret.startswith("!") else "password hash"
        findings.append(Finding(path, SecretKind.PASSWORD_HASH, f"{user} has a {state}"))
    return findings


# -- trees and initramfs ----------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every regular file under root; directories of other mounted filesystems (proc, sys, dev) are skipped."""
    device = root.stat().st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        kept = []
        for d in dirnames:
            try:
                if os.lstat(os.path.join(dirpath, d)).st_dev == device:
                    kept.append(d)
            except OSError:
                continue
        dirnames[:] = kept
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield os.path.normpath(os.path.join("/", rel_dir, name)), Path(full), st


class _Packaged:
    """Files a Debian package installed unchanged under /usr (dpkg's md5sums).

    Their contents are public: libgnutls carries self-test keys, -dev
    packages example keys. Only findings of the content rules under /usr are
    let through this way, never a file that is a secret by its name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sums: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        sums: dict[str, str] = {}
        for listing in (self.root / "var/lib/dpkg/info").glob("*.md5sums"):
            for line in listing.read_text(errors="replace").splitlines():
                digest, _, rel = line.partition("  ")
                if rel:
                    sums["/" + rel] = digest
        return sums

    def public(self, finding: Finding, read: Callable[[int], bytes]) -> bool:
        """True when finding came from a content rule in a packaged file under /usr whose bytes (read) are as shipped."""
        if finding.by_name or not finding.path.startswith("/usr/"):
            return False
        if self._sums is None:
            self._sums = self._load()
        aliases = (finding.path, "/" + finding.path.removeprefix("/usr/"))  # merged /usr: dpkg may list /lib/…
        expected = next((self._sums[p] for p in aliases if p in self._sums), None)
        if expected is None:
            return False
        digest = hashlib.md5(usedforsecurity=False)
        for block in iter(lambda: read(_CHUNK), b""):
            digest.update(block)
        return digest.hexdigest() == expected


def scan(root: Path) -> list[Finding]:
    """Every secret found in the tree at root."""
    findings: list[Finding] = []
    packaged = _Packaged(root)
    for path, full, st in _walk(root):
        try:
            with open(full, "rb") as handle:
                found = _scan_stream(path, st.st_size, handle.read)
                if found and packaged.public(found[0], _rewound(handle, 0, st.st_size)):
                    continue
                findings += found
        except OSError as exc:
            raise ImageError(f"cannot read {path} in the image to scan it: {exc.strerror}") from exc
    return sorted(findings, key=lambda f: (f.path, f.kind))


_CPIO_MAGIC = (b"070701", b"070702")
_COMPRESSED = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x02\x21\x4c\x18": "lz4",
    b"\x04\x22\x4d\x18": "lz4",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
}


class _Limited:
    """A reader that stops after n bytes of handle."""

    def __init__(self, handle: BinaryIO, n: int) -> None:
        self.handle, self.left = handle, n

    def read(self, n: int) -> bytes:
        data = self.handle.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def _skip_padding(handle: BinaryIO) -> bytes:
    """Skip NUL padding between archives; return the next 6 bytes (b"" at the end)."""
    while True:
        pos = handle.tell()
        block = handle.read(4096)
        if not block:
            return b""
        stripped = block.lstrip(b"\0")
        if stripped:
            handle.seek(pos + len(block) - len(stripped))
            head = handle.read(6)
            handle.seek(-len(head), os.SEEK_CUR)
            return head


def _rewound(handle: BinaryIO, start: int, size: int) -> Callable[[int], bytes]:
    handle.seek(start)
    return _Limited(handle, size).read


def _read_cpio(handle: BinaryIO, source: str, packaged: _Packaged | None) -> list[Finding]:
    """Scan one or more concatenated newc archives from handle, up to the first non-cpio data."""
    findings: list[Finding] = []
    while True:
        head = _skip_padding(handle)
        if head not in _CPIO_MAGIC:
            return findings
        header = handle.read(110)
        if len(header) < 110:
            raise ImageError(f"{source}: truncated cpio header", hint="rebuild the image (dracut output is damaged)")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise ImageError(f"{source}: damaged cpio header", hint="rebuild the image") from exc
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = handle.read(namesize).rstrip(b"\0").decode(errors="replace")
        handle.read((4 - (110 + namesize) % 4) % 4)
        if name == "TRAILER!!!":
            continue
        start = handle.tell()
        if stat.S_ISREG(mode) and filesize:
            path = os.path.normpath("/" + name)
            found = _scan_stream(path, filesize, _Limited(handle, filesize).read)
            if found and packaged and packaged.public(found[0], _rewound(handle, start, filesize)):
                found = []
            findings += [Finding(f.path, f.kind, f.detail, source, f.by_name) for f in found]
        handle.seek(start + filesize + (4 - filesize % 4) % 4)


def _decompress(handle: BinaryIO, method: str, offset: int, workdir: Path, source: str) -> Path:
    """The rest of handle from offset, decompressed into a file in workdir."""
    packed, out = workdir / "packed", workdir / "unpacked.cpio"
    handle.seek(offset)
    if method in ("zstd", "lz4"):
        with open(packed, "wb") as dest:
            shutil.copyfileobj(handle, dest)
        argv: list[str | os.PathLike[str]] = (
            ["zstd", "-d", "-q", "-f", packed, "-o", out]
            if method == "zstd"
            else ["lz4", "-d", "-q", "-f", packed, out]
        )
        try:
            proc.run(argv, timeout=600, hint=f"install {method} to scan the initramfs")
        except CommandError as exc:
            raise ImageError(f"{source}: cannot unpack ({method}): {exc.message}", hint=exc.hint) from exc
        packed.unlink()
        return out
    opener = {"gzip": gzip.open, "xz": lzma.open, "lzma": lzma.open, "bzip2": bz2.open}[method]
    try:
        with opener(handle) as stream, open(out, "wb") as dest:  # type: ignore[operator]
            shutil.copyfileobj(stream, dest)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise ImageError(f"{source}: cannot unpack ({method}): {exc}", hint="rebuild the image") from exc
    return out


def scan_initrd(initrd: Path, root: Path | None = None, workdir: Path | None = None) -> list[Finding]:
    """Every secret in an initramfs: uncompressed cpio segments and the compressed one, as the kernel reads them.

    With root (the image the initramfs was built from), a file copied unchanged from a package's
    files under /usr (a library with self-test keys) is not reported.
    """
    source = initrd.name
    findings: list[Finding] = []
    with tempfile.TemporaryDirectory(prefix=".scan-initrd-", dir=workdir) as tmp, open(initrd, "rb") as handle:
        packaged = _Packaged(root) if root is not None else None
        findings += _read_cpio(handle, source, packaged)
        head = _skip_padding(handle)
        if head:
            method = next((m for magic, m in _COMPRESSED.items() if head.startswith(magic)), None)
            if method is None:
                raise ImageError(
                    f"{source}: unknown data at byte {handle.tell()}, cannot scan it for secrets",
                    hint="build the initramfs with dracut's --compress zstd, gzip, xz or lz4",
                )
            unpacked = _decompress(handle, method, handle.tell(), Path(tmp), source)
            with open(unpacked, "rb") as inner:
                findings += _read_cpio(inner, source, packaged)
                if _skip_padding(inner):
                    raise ImageError(f"{source}: data after the archive, cannot scan it", hint="rebuild the image")
    return sorted(findings, key=lambda f: (f.path, f.kind))


_LISTED = 200


def _raise_if_any(findings: list[Finding], where: str) -> None:
    if not findings:
        return
    named = "; ".join(str(f) for f in findings[:_LISTED])
    more = f"; and {len(findings) - _LISTED} more" if len(findings) > _LISTED else ""
    raise ImageError(
        f"secret in the {where}: {named}{more}",
        hint="secrets are fetched at boot, never baked in: remove it from the role (see postboot)",
    )


def require_clean(root: Path, initrd: Path | None = None, *, workdir: Path | None = None) -> None:
    """Raise ImageError naming every secret found in the tree at root and in the initramfs."""
    if not (root / "etc").is_dir() or not (root / "usr").is_dir():
        raise ImageError(f"{root} holds no root filesystem (no /etc, /usr) to scan", hint="report this as a bug")
    found = scan(root)
    if initrd is not None:
        found += scan_initrd(initrd, root, workdir)
    _raise_if_any(found, "image")

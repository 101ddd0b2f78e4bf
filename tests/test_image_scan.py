"""The secret scan: each kind of secret planted in an image tree and in a real initramfs fails the build, naming it.

The clean side is a tree of real public files copied from this Debian machine (ssh_config, CA bundle, docs,
binaries and libraries that quote key markers, the archive keyring, libgnutls with its self-test keys).
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import requires

from provision.errors import ImageError
from provision.image.scan import SECRET_VARIABLE, SecretKind, require_clean, scan, scan_initrd

WG_KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
B64 = base64.b64encode(bytes(range(256)) * 2).decode()
BODY = "\n".join(B64[i : i + 64] for i in range(0, 320, 64))


def noise(n: int) -> bytes:
    """Binary-looking bytes, the same every run."""
    return bytes((i * 37 + 11) % 256 for i in range(n))


def pem(label: str, headers: str = "") -> str:
    return f"-----BEGIN {label}-----\n{headers}{BODY}\n-----END {label}-----\n"


OPENSSH = pem("OPENSSH PRIVATE KEY")
SHADOW_CLEAN = "root:*:19000:0:99999:7:::\ndaemon:!:19000::::::\nsshd:!*:19000::::::\n"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJub2RlMDEiLCJleHAiOjE3MDAwMDB9.dGhpc2lzYXNpZ25hdHVyZTEyMzQ1Ng"
KUBECONFIG = (
    "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://10.0.0.1:6443\n  name: k\n"
    "users:\n- name: admin\n  user:\n    {field}: {value}\n"
)

# (path in the image, content, kind): one entry per kind of planted secret.
PLANTED: list[tuple[str, str | bytes, SecretKind]] = [
    ("etc/munge/munge.key", b"\x01\x02" * 512, SecretKind.MUNGE_KEY),
    ("etc/slurm/jwt_hs256.key", noise(32), SecretKind.SLURM_KEY),
    ("etc/slurm/slurm.key", noise(64), SecretKind.SLURM_KEY),
    ("etc/ssh/ssh_host_ed25519_key", OPENSSH, SecretKind.PRIVATE_KEY),
    ("etc/ssh/ssh_host_rsa_key", "SSH PRIVATE KEY FILE FORMAT 1.1\n\0\0", SecretKind.PRIVATE_KEY),
    ("root/.ssh/id_ed25519", OPENSSH, SecretKind.PRIVATE_KEY),
    ("etc/ssl/private/site.key", pem("RSA PRIVATE KEY"), SecretKind.PRIVATE_KEY),
    ("opt/app/pkcs8.pem", pem("PRIVATE KEY"), SecretKind.PRIVATE_KEY),
    ("opt/app/encrypted-pkcs8.pem", pem("ENCRYPTED PRIVATE KEY"), SecretKind.PRIVATE_KEY),
    (
        "srv/legacy-encrypted.pem",
        pem("RSA PRIVATE KEY", "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0123456789ABCDEF\n\n"),
        SecretKind.PRIVATE_KEY,
    ),
    ("etc/pki/tls/ec.pem", pem("EC PRIVATE KEY"), SecretKind.PRIVATE_KEY),
    ("usr/share/app/dsa.pem", pem("DSA PRIVATE KEY"), SecretKind.PRIVATE_KEY),
    ("home/ops/ssh2.key.pub.bak", f"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\n{BODY}\n", SecretKind.PRIVATE_KEY),
    ("home/ops/minisign.sec", "untrusted comment: minisign encrypted secret key\nRWRTY0Iy\n", SecretKind.PRIVATE_KEY),
    ("home/ops/.ssh/work.ppk", f"PuTTY-User-Key-File-3: ssh-ed25519\nPrivate-Lines: 1\n{BODY}\n", SecretKind.PUTTY_KEY),
    ("root/backup.asc", pem("PGP PRIVATE KEY BLOCK", "Version: GnuPG\n\n"), SecretKind.PGP_PRIVATE_KEY),
    ("root/.gnupg/private-keys-v1.d/0123ABCD.key", "Created: 20240101\nKey: (private-key (rsa", SecretKind.PGP_PRIVATE_KEY),
    ("root/.gnupg/secring.gpg", b"\x95\x01\xd8\x04" + noise(64), SecretKind.PGP_PRIVATE_KEY),
    ("var/lib/age/key.txt", "# created\nAGE-SECRET-KEY-1" + "QZ" * 29 + "\n", SecretKind.AGE_KEY),
    ("etc/wireguard/wg0.conf", f"[Interface]\nAddress = 10.0.0.2/32\nPrivateKey = {WG_KEY}\n", SecretKind.WIREGUARD_KEY),
    ("etc/wireguard/private.key", f"{WG_KEY}\n", SecretKind.WIREGUARD_KEY),
    ("etc/openvpn/ta.key", "-----BEGIN OpenVPN Static key V1-----\n" + "0f" * 32 + "\n", SecretKind.OPENVPN_KEY),
    ("opt/svc/jwks.json", '{"keys":[{"kty":"RSA","n":"0vx7","e":"AQAB","d":"X4cTteJY_gn4FYPsXB8rdXix5vwsg1"}]}', SecretKind.JWK_PRIVATE_KEY),
    ("etc/nginx/site.p12", noise(128), SecretKind.KEYSTORE),
    ("etc/krb5.keytab", b"\x05\x02" + noise(80), SecretKind.KEYTAB),
    ("etc/k0s/join-token", "H4sIAAAAAAAC/2xVS4/iOBK+8ys", SecretKind.TOKEN),
    ("var/lib/provision/api.token", "s3cr3t", SecretKind.TOKEN),
    ("etc/slurm/token", "abc", SecretKind.TOKEN),
    ("etc/shadow", SHADOW_CLEAN + "ops:$6$salt$hashhashhash:19000::::::\n", SecretKind.PASSWORD_HASH),
    ("etc/shadow-", SHADOW_CLEAN + "root:$y$j9T$abc$def:19000:0:99999:7:::\n", SecretKind.PASSWORD_HASH),
    ("etc/gshadow", "root:*::\nadm:$6$salt$grouphash:root:\n", SecretKind.PASSWORD_HASH),
    ("etc/gshadow-", "root:*::\nops:!$6$salt$lockedgroup::\n", SecretKind.PASSWORD_HASH),
    ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nold:$1$ab$cdefgh:1000:1000::/home/old:/bin/sh\n", SecretKind.PASSWORD_HASH),
    ("var/backups/shadow.bak", "root:!$6$rounds=5000$salt$lockedbutcrackable:19000::::::\n", SecretKind.PASSWORD_HASH),
    ("etc/nginx/.htpasswd", "admin:$apr1$abcdefgh$0123456789abcdefghijk\n", SecretKind.PASSWORD_HASH),
    ("etc/security/opasswd", "ops:1000:1:$6$old$hash\n", SecretKind.PASSWORD_HASH),
    ("root/.pgpass", "db:5432:slurm:slurm:hunter2\n", SecretKind.PASSWORD_FILE),
    ("root/.netrc", "machine mirror.example.org login ops password hunter2\n", SecretKind.PASSWORD_FILE),
    ("home/ops/.git-credentials", "https://ops:ghx@git.example.org\n", SecretKind.PASSWORD_FILE),
    ("etc/enroot/.credentials", "machine nvcr.io login $oauthtoken password nvapi-abcdef\n", SecretKind.PASSWORD_FILE),
    ("root/.aws/credentials", "[default]\naws_access_key_id = X\naws_secret_access_key = abc\n", SecretKind.CLOUD_CREDENTIALS),
    ("opt/tools/aws.ini", "[p]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", SecretKind.CLOUD_CREDENTIALS),
    ("root/.config/gcloud/credentials.db", b"SQLite format 3\0" + noise(64), SecretKind.CLOUD_CREDENTIALS),
    (
        "opt/app/sa.json",
        '{"type": "service_account", "project_id": "p", "private_key_id": "1", "client_email": "x@p"}',
        SecretKind.CLOUD_CREDENTIALS,
    ),
    ("root/.azure/msal_token_cache.json", '{"AccessToken": {}}', SecretKind.CLOUD_CREDENTIALS),
    ("root/.kube/config", KUBECONFIG.format(field="token", value="abcdef0123456789.tokentoken"), SecretKind.KUBECONFIG_CREDENTIALS),
    (
        "etc/kubernetes/admin.conf",
        KUBECONFIG.format(field="client-key-data", value=B64[:120]),
        SecretKind.KUBECONFIG_CREDENTIALS,
    ),
    ("root/.docker/config.json", '{"auths": {"registry.example.org": {"auth": "b3BzOmh1bnRlcjI="}}}', SecretKind.REGISTRY_AUTH),
    ("etc/containers/auth.json", '{"auths": {"quay.io": {"auth": "b3BzOmh1bnRlcjI="}}}', SecretKind.REGISTRY_AUTH),
    ("etc/slurm/slurmdbd.conf", "DbdHost=master\nStorageType=accounting_storage/mysql\nStoragePass=hunter2\n", SecretKind.PASSWORD),
    ("etc/sssd/sssd.conf", "[domain/x]\nldap_default_bind_dn = cn=x\nldap_default_authtok = hunter2\n", SecretKind.PASSWORD),
    ("etc/NetworkManager/system-connections/wifi.nmconnection", "[wifi-security]\npsk=hunter2hunter2\n", SecretKind.PASSWORD),
    ("etc/mysql/debian.cnf", "[client]\nuser = debian-sys-maint\npassword = hunter2\n", SecretKind.PASSWORD),
    ("etc/apt/sources.list.d/private.list", "deb https://ops:hunter2@apt.example.org/debian bookworm main\n", SecretKind.PASSWORD),
    ("etc/default/exporter", "EXPORTER_API_TOKEN=f00dfeedcafe1234\n", SecretKind.PASSWORD),
    ("opt/ci/settings.yml", f"github: ghp_{'a1B2' * 9}\n", SecretKind.TOKEN_VALUE),
    ("var/lib/svc/session.yml", f"bearer: {JWT}\n", SecretKind.TOKEN_VALUE),
    ("etc/ldap.secret", "hunter2\n", SecretKind.SECRET_FILE),
    ("var/lib/systemd/credential.secret", noise(32), SecretKind.SECRET_FILE),
    ("etc/credstore/db.password", "hunter2", SecretKind.SECRET_FILE),
    ("etc/app/db_pw", "hunter2", SecretKind.SECRET_FILE),
    ("etc/app/vault_pass", "hunter2", SecretKind.SECRET_FILE),
    ("etc/app/passphrase", "correct horse", SecretKind.SECRET_FILE),
    ("etc/app/apikey", "0123456789", SecretKind.SECRET_FILE),
    ("etc/app/signing.key", "not a public key", SecretKind.KEY_FILE),
    # A key inside a large binary file with NUL bytes, after the first chunk (and across a chunk boundary).
    ("opt/blob/firmware.bin", b"\0" * ((1 << 20) - 100) + pem("PRIVATE KEY").encode() + b"\0" * 4096, SecretKind.PRIVATE_KEY),
    ("usr/lib/x86_64-linux-gnu/libplanted.so.1", b"\x7fELF\0\0" + pem("EC PRIVATE KEY").encode() + b"\0", SecretKind.PRIVATE_KEY),
    ("opt/app/sa-key.json", '{"private_key": "' + pem("PRIVATE KEY").replace("\n", "\\n") + '"}', SecretKind.PRIVATE_KEY),
]  # fmt: skip


def plant(root: Path, path: str, content: str | bytes) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content.encode() if isinstance(content, str) else content)


def host_file(root: Path, source: str) -> None:
    """Copy a public file of this Debian machine into the tree (a missing one fails the test)."""
    target = root / source.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(source):
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)


GNUTLS = sorted(glob.glob("/usr/lib/*-linux-gnu/libgnutls.so.30.*"))
HOST_PUBLIC = [
    "/etc/ssh/ssh_config",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/passwd",
    "/etc/group",
    "/usr/share/doc/openssh-client",
    "/usr/share/doc/bash",
    "/usr/share/doc/ca-certificates",
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "/usr/bin/ssh",
    "/usr/bin/ssh-keygen",
    "/usr/bin/openssl",
    *glob.glob("/usr/lib/*-linux-gnu/libcrypto.so.3"),
    *glob.glob("/usr/lib/*-linux-gnu/libssl.so.3"),
    *glob.glob("/usr/lib/python3/dist-packages/cryptography/hazmat/primitives/serialization/*.py"),
]


def clean_tree(root: Path) -> Path:
    """A tree shaped like an image: real public files, locked accounts, public keys, code named like secrets."""
    for source in HOST_PUBLIC:
        host_file(root, source)
    plant(root, "etc/shadow", SHADOW_CLEAN)
    plant(root, "etc/gshadow", "root:*::\nadm:*::\nsudo:!::ops\n")
    plant(root, "etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI host\n")
    plant(root, "root/.ssh/authorized_keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI admin\n")
    plant(root, "etc/machine-id", "")
    plant(root, "usr/lib/python3.11/token.py", "NAME = 1\n")
    plant(root, "opt/venv/lib/python3.11/site-packages/google/auth/credentials.py", "class Credentials: ...\n")
    plant(root, "etc/ssl/certs/ca.pem", pem("CERTIFICATE"))
    plant(root, "etc/apt/keyrings/vendor.key", pem("PGP PUBLIC KEY BLOCK"))
    plant(root, "etc/wireguard/wg0.conf.example", "[Interface]\nPrivateKey = <fetched at boot>\n")
    plant(root, "etc/ppp/chap-secrets", "# Secrets for authentication using CHAP\n# client\tserver\tsecret\n")
    plant(root, "etc/slurm/slurm.conf", "ClusterName=c\nSlurmctldHost=master\nAuthType=auth/munge\n")
    plant(root, "etc/default/useradd", "SHELL=/bin/sh\n# PASSWORD=example\n")
    plant(root, "etc/munge/munge.key", "")  # an empty placeholder is not a key
    (root / "etc/ssl/private").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssl/private/link.key").symlink_to("/etc/ssl/certs/ca.pem")
    # libgnutls ships self-test private keys: public, because the file is dpkg's, unchanged.
    for lib in GNUTLS:
        host_file(root, lib)
    for sums in glob.glob("/var/lib/dpkg/info/libgnutls30*.md5sums"):
        host_file(root, sums)
    return root


HAVE_HOST_FILES = all(os.path.exists(p) for p in HOST_PUBLIC) and bool(GNUTLS)
host_files = requires(HAVE_HOST_FILES, "Debian base files (openssh-client, ca-certificates, libgnutls30, openssl)")


@host_files
def test_clean_debian_tree_passes(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    assert scan(root) == []
    require_clean(root)


@host_files
def test_changed_packaged_library_is_reported(tmp_path: Path) -> None:
    """The dpkg exemption holds only for the bytes dpkg installed."""
    root = clean_tree(tmp_path)
    lib = root / GNUTLS[0].lstrip("/")
    with open(lib, "ab") as handle:
        handle.write(b"\0")
    assert [(f.path, f.kind) for f in scan(root)] == [(GNUTLS[0], SecretKind.PRIVATE_KEY)]


def test_planted_kinds_are_many() -> None:
    assert len(PLANTED) >= 40
    assert len({k for _, _, k in PLANTED}) == len(SecretKind)


@host_files
@pytest.mark.parametrize(("path", "content", "kind"), PLANTED, ids=[p for p, _, _ in PLANTED])
def test_planted_secret_fails_naming_the_file(
    tmp_path: Path, path: str, content: str | bytes, kind: SecretKind
) -> None:
    root = clean_tree(tmp_path)
    plant(root, path, content)
    findings = scan(root)
    assert [(f.path, f.kind) for f in findings] == [(f"/{path}", kind)]
    with pytest.raises(ImageError) as info:
        require_clean(root)
    assert f"/{path}: {kind.value}" in info.value.message
    if isinstance(content, str) and "hunter2" in content:
        assert "hunter2" not in info.value.message


def make_initrd(tree: Path, out: Path, *, early: Path | None = None) -> Path:
    """A real initramfs: an optional uncompressed early cpio, then the tree as newc cpio compressed with zstd."""

    def cpio(directory: Path) -> bytes:
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=directory, check=True, capture_output=True).stdout
        listing = b"\n".join(n.removeprefix(b"./") for n in names.splitlines()) + b"\n"
        return subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=directory,
            input=listing,
            check=True,
            capture_output=True,
        ).stdout

    packed = subprocess.run(["zstd", "-q", "-c", "-19"], input=cpio(tree), check=True, capture_output=True).stdout
    head = cpio(early) if early else b""
    out.write_bytes(head + b"\0" * (-len(head) % 512) + packed)
    return out


@host_files
def test_every_planted_kind_in_the_initramfs_is_named(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "initrd-tree")
    for path, content, _ in PLANTED:
        plant(tree, path, content)
    early = tmp_path / "early"
    plant(early, "kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 4096)
    plant(early, "root/.netrc", "machine m login x password early-segment\n")
    initrd = make_initrd(tree, tmp_path / "initrd.img", early=early)
    found = scan_initrd(initrd, root=tree)
    expected = {(f"/{p}", k) for p, _, k in PLANTED} | {("/root/.netrc", SecretKind.PASSWORD_FILE)}
    assert {(f.path, f.kind) for f in found} == expected
    assert all(f.source == "initrd.img" for f in found)
    # The build's scan stage: a clean image, a dirty initramfs; the error names every finding.
    image = clean_tree(tmp_path / "image")
    with pytest.raises(ImageError) as info:
        require_clean(image, initrd, workdir=tmp_path)
    for path, _, kind in PLANTED:
        assert f"initrd.img:/{path}: {kind.value}" in info.value.message
    assert not list(tmp_path.glob(".scan-initrd-*"))


@host_files
@pytest.mark.parametrize(
    "compress", [["zstd", "-q", "-c"], ["gzip", "-c"], ["xz", "-c", "--check=crc32"], ["lz4", "-l", "-q", "-c"]]
)
def test_initramfs_compressions(tmp_path: Path, compress: list[str]) -> None:
    tree = tmp_path / "t"
    plant(tree, "etc/munge/munge.key", b"k" * 64)
    plant(tree, "usr/bin/busybox", b"\x7fELF\0-----BEGIN OPENSSH PRIVATE KEY-----\n\0")
    raw = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=b"etc\netc/munge\netc/munge/munge.key\nusr/bin/busybox\n",
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(subprocess.run(compress, input=raw, check=True, capture_output=True).stdout)
    assert [(f.path, f.kind) for f in scan_initrd(initrd)] == [("/etc/munge/munge.key", SecretKind.MUNGE_KEY)]


@host_files
def test_clean_initramfs_passes_and_garbage_is_refused(tmp_path: Path) -> None:
    tree = clean_tree(tmp_path / "t")
    initrd = make_initrd(tree, tmp_path / "initrd.img")
    assert scan_initrd(initrd, root=tree) == []
    require_clean(tree, initrd, workdir=tmp_path)
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"MZ not an initramfs")
    with pytest.raises(ImageError, match="cannot scan it for secrets"):
        scan_initrd(junk)


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        ("root:$6$salt$hashhashhash:19000:0:99999:7:::", "root has a password hash"),
        ("admin:$y$j9T$abc$def:19000::::::", "admin has a password hash"),
        ("ops:!$6$salt$hash:19000::::::", "ops has a locked password hash"),
        ("guest::19000::::::", "guest has an empty password"),
    ],
    ids=["sha512", "yescrypt", "locked", "empty"],
)
@host_files
def test_shadow_entries_fail(tmp_path: Path, entry: str, detail: str) -> None:
    root = clean_tree(tmp_path)
    with open(root / "etc/shadow", "a") as shadow:
        shadow.write(entry + "\n")
    with pytest.raises(ImageError) as info:
        require_clean(root)
    assert info.value.message == f"secret in the image: /etc/shadow: password hash ({detail})"


@host_files
def test_every_secret_is_named(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    plant(root, "etc/munge/munge.key", b"k" * 32)
    plant(root, "etc/ssh/ssh_host_rsa_key", OPENSSH)
    with pytest.raises(ImageError) as info:
        require_clean(root)
    assert "/etc/munge/munge.key: MUNGE key" in info.value.message
    assert "/etc/ssh/ssh_host_rsa_key: private key" in info.value.message


def test_empty_tree_is_an_error_not_a_pass(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="holds no root filesystem"):
        require_clean(tmp_path)


@pytest.mark.parametrize(
    "name",
    ["db_pw", "ldap_pass", "passphrase", "apikey", "api_key", "slurm_jwt", "bearer", "bmc_password", "k0s_token",
     "wg_private", "munge_key", "aws_credentials", "sssd_authtok", "wifi_psk", "client_secret", "session_cookie"],
)  # fmt: skip
def test_secret_variable_names(name: str) -> None:
    assert SECRET_VARIABLE.search(name)


@pytest.mark.parametrize(
    "name", ["storage_layout_world_mode", "stateless_ssh_host_key_types", "slurm_node_version", "keyboard", "passive"]
)
def test_public_variable_names(name: str) -> None:
    assert not SECRET_VARIABLE.search(name)

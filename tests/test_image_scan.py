"""The secret scan: each kind of secret planted in a fake tree fails the build, naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.errors import ImageError
from provision.image.scan import SecretKind, require_clean, scan

WG_KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PEM_RSA = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n"
PEM_PKCS8 = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----\n"
OPENSSH = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def clean_tree(root: Path) -> Path:
    """A tree shaped like an image: shadow with locked accounts, public keys, code named token.py."""
    (root / "etc/ssh").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:!:19000::::::\nsshd:!*:19000::::::\n")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAC3Nza host\n")
    (root / "etc/machine-id").write_text("")
    (root / "usr/lib/python3.11").mkdir(parents=True)
    (root / "usr/lib/python3.11/token.py").write_text("NAME = 1\n")
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (root / "etc/wireguard").mkdir(parents=True)
    (root / "etc/wireguard/wg0.conf.example").write_text("[Interface]\nPrivateKey = <fetched at boot>\n")
    return root


def test_clean_tree_passes(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    assert scan(root) == []
    require_clean(root)


PLANTED = [
    ("etc/munge/munge.key", "\x01" * 1024, SecretKind.MUNGE_KEY),
    ("etc/ssh/ssh_host_ed25519_key", OPENSSH, SecretKind.PRIVATE_KEY),
    ("etc/ssl/private/site.key", PEM_RSA, SecretKind.PRIVATE_KEY),
    ("opt/app/key.pem", PEM_PKCS8, SecretKind.PRIVATE_KEY),
    ("root/.ssh/id_ed25519", OPENSSH, SecretKind.PRIVATE_KEY),
    (
        "etc/wireguard/wg0.conf",
        f"[Interface]\nAddress = 10.0.0.2/32\nPrivateKey = {WG_KEY}\n",
        SecretKind.WIREGUARD_KEY,
    ),
    ("etc/wireguard/private.key", f"{WG_KEY}\n", SecretKind.WIREGUARD_KEY),
    ("etc/k0s/join-token", "H4sIAAAAAAAC/2xVS4/iOBK+8ys", SecretKind.TOKEN),
    ("var/lib/provision/api.token", "s3cr3t", SecretKind.TOKEN),
    ("etc/slurm/token", "abc", SecretKind.TOKEN),
]


@pytest.mark.parametrize(("path", "content", "kind"), PLANTED, ids=[p for p, _, _ in PLANTED])
def test_planted_secret_fails_naming_the_file(tmp_path: Path, path: str, content: str, kind: SecretKind) -> None:
    root = clean_tree(tmp_path)
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    findings = scan(root)
    assert [(f.path, f.kind) for f in findings] == [(f"/{path}", kind)]
    with pytest.raises(ImageError) as info:
        require_clean(root)
    assert f"/{path}" in info.value.message
    assert kind.value in info.value.message
    assert content.strip()[:20] not in info.value.message or content.startswith("-----")


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        ("root:$6$salt$hashhashhash:19000:0:99999:7:::", "root has a password hash"),
        ("admin:$y$j9T$abc$def:19000::::::", "admin has a password hash"),
        ("guest::19000::::::", "guest has an empty password"),
    ],
    ids=["sha512", "yescrypt", "empty"],
)
def test_unlocked_shadow_entry_fails(tmp_path: Path, entry: str, detail: str) -> None:
    root = clean_tree(tmp_path)
    with open(root / "etc/shadow", "a") as shadow:
        shadow.write(entry + "\n")
    with pytest.raises(ImageError) as info:
        require_clean(root)
    assert info.value.message == f"secret in the image: /etc/shadow: password hash ({detail})"


def test_locked_hash_passes(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    with open(root / "etc/shadow", "a") as shadow:
        shadow.write("ops:!$6$salt$hash:19000::::::\n")
    assert scan(root) == []


def test_several_secrets_are_counted(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    (root / "etc/munge").mkdir()
    (root / "etc/munge/munge.key").write_bytes(b"k" * 32)
    (root / "etc/ssh/ssh_host_rsa_key").write_text(OPENSSH)
    with pytest.raises(ImageError, match=r"and 1 more"):
        require_clean(root)


def test_empty_munge_key_and_symlinks_are_not_secrets(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    (root / "etc/munge").mkdir()
    (root / "etc/munge/munge.key").write_text("")
    (root / "etc/ssl/private").mkdir(parents=True)
    (root / "etc/ssl/private/link.key").symlink_to("/etc/ssl/certs/ca.pem")
    assert scan(root) == []


def test_empty_tree_is_an_error_not_a_pass(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="holds no root filesystem"):
        require_clean(tmp_path)


def test_binaries_quoting_pem_markers_are_not_keys(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/libssh2.so.1").write_bytes(b"\x7fELF\0\0" + PEM_RSA.encode() + b"\0")
    assert scan(root) == []

"""playbooks/bundle.yml: each node's join bundle, rendered on the admin host from the join roles.

The bundle must hold exactly what `playbooks/join.yml` writes on a node: the
byte-for-byte comparison against a really joined node is in
tests/test_join_playbook.py (``assert_bundle_matches_node``, vm); here the
rendering itself: layout, modes, manifest, secrets kept out of the output,
idempotence and check mode.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "playbooks" / "bundle.yml"
BIN = Path(sys.executable).parent
BIND_PASSWORD = "bundle-bind-secret-4711"
CA = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
PEER = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def render(inv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
    }
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), str(BUNDLE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def stats(proc: subprocess.CompletedProcess[str], host: str = "node01") -> dict[str, int]:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return dict(json.loads(proc.stdout)["stats"][host])


def write_inventory(inv: Path, **overrides: Any) -> None:
    inv.mkdir(parents=True, exist_ok=True)
    # Secrets on the admin host, beside (not in) the inventory directory.
    (inv.parent / "bind.password").write_text(BIND_PASSWORD)
    node_vars: dict[str, Any] = {
        "slurm_controller_host": "localhost",
        "slurm_conf_server": "10.99.0.1:6817",
        "munge_key_file": str(inv.parent / "munge.key"),
        "sssd_ldap_uri": ["ldap://10.99.0.1"],
        "sssd_ldap_search_base": "dc=lab,dc=provision",
        "sssd_ldap_bind_dn": "cn=sssd,ou=services,dc=lab,dc=provision",
        "sssd_ldap_bind_password": f"{{{{ lookup('ansible.builtin.file', '{inv.parent / 'bind.password'}') }}}}",
        "sssd_ldap_tls_cacert_content": CA,
        "join_wireguard": True,
        "wireguard_address": ["10.98.0.2/32"],
        "wireguard_peers": [{"public_key": PEER, "allowed_ips": ["10.98.0.0/24"], "endpoint": "192.0.2.1:51820"}],
        # The node's SSH settings: the bundle never connects to it.
        "ansible_host": "192.0.2.99",
        "ansible_user": "nobody-here",
        **overrides,
    }
    (inv / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {"provision_state_dir": ".state"},
                    "children": {"compute": {"hosts": {"node01": node_vars}}},
                }
            }
        )
    )


def owner_name(uid: int, node_root: Path | None) -> str:
    if node_root is None:
        return pwd.getpwuid(uid).pw_name
    for line in (node_root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if int(fields[2]) == uid:
            return fields[0]
    raise AssertionError(f"uid {uid} not in {node_root}/etc/passwd")


def group_name(gid: int, node_root: Path | None) -> str:
    if node_root is None:
        return grp.getgrgid(gid).gr_name
    for line in (node_root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if int(fields[2]) == gid:
            return fields[0]
    raise AssertionError(f"gid {gid} not in {node_root}/etc/group")


def assert_bundle_matches_node(node_dir: Path, node_root: Path) -> list[str]:
    """Every bundle file has the bytes of the node's file; the manifest its owner, group and mode."""
    manifest = json.loads((node_dir / "manifest.json").read_text())
    listed = []
    for entry in manifest["files"]:
        path = entry["path"]
        staged = node_dir / "files" / path.lstrip("/")
        on_node = node_root / path.lstrip("/")
        assert staged.read_bytes() == on_node.read_bytes(), path
        st = on_node.stat()
        assert entry["mode"] == f"{stat.S_IMODE(st.st_mode):04o}", path
        assert entry["owner"] == owner_name(st.st_uid, node_root), path
        assert entry["group"] == group_name(st.st_gid, node_root), path
        listed.append(path)
    staged_files = sorted("/" + str(p.relative_to(node_dir / "files")) for p in (node_dir / "files").rglob("*"))
    assert sorted(listed) == [p for p in staged_files if (node_dir / "files" / p.lstrip("/")).is_file()]
    return listed


@pytest.mark.integration
def test_bundle_renders_the_join_files_with_a_manifest(tmp_path: Path) -> None:
    inv = tmp_path / "inventory"
    write_inventory(inv)
    key = os.urandom(1024)
    (inv.parent / "munge.key").write_bytes(key)

    first = render(inv)
    assert stats(first)["changed"] > 0
    node_dir = inv / ".state" / "service" / "bundles" / "node01"
    manifest = json.loads((node_dir / "manifest.json").read_text())
    assert manifest == {
        "files": [
            {"path": "/etc/wireguard/wg0.conf", "owner": "root", "group": "root", "mode": "0600"},
            {"path": "/etc/munge/munge.key", "owner": "munge", "group": "munge", "mode": "0400"},
            {"path": "/etc/sssd/pki/ldap-ca.pem", "owner": "root", "group": "root", "mode": "0644"},
            {"path": "/etc/sssd/sssd.conf", "owner": "root", "group": "root", "mode": "0600"},
            {"path": "/etc/sssd/conf.d/50-provision-bind.conf", "owner": "root", "group": "root", "mode": "0600"},
            {"path": "/etc/default/slurmd", "owner": "root", "group": "root", "mode": "0644"},
        ],
        "services": ["wg-quick@wg0.service", "munge", "sssd", "slurmd"],
    }
    files = node_dir / "files"
    assert (files / "etc/munge/munge.key").read_bytes() == key
    assert (files / "etc/sssd/pki/ldap-ca.pem").read_text() == CA
    assert f"ldap_default_authtok = {BIND_PASSWORD}\n" in (files / "etc/sssd/conf.d/50-provision-bind.conf").read_text()
    assert "ldap_default_authtok" not in (files / "etc/sssd/sssd.conf").read_text()
    assert 'SLURMD_OPTIONS="--conf-server 10.99.0.1:6817"' in (files / "etc/default/slurmd").read_text()
    wg = (files / "etc/wireguard/wg0.conf").read_text()
    assert f"PublicKey = {PEER}" in wg and "PrivateKey" not in wg
    # Root's only: directories 0700, files 0600 (the manifest carries the node's modes).
    for path in [inv / ".state" / "service" / "bundles", *node_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert sorted(assert_bundle_matches_staging(node_dir)) == sorted(e["path"] for e in manifest["files"])
    # No secret in the output.
    for proc in (first,):
        assert BIND_PASSWORD not in proc.stdout + proc.stderr
        assert base64.b64encode(key[:48]).decode() not in proc.stdout

    again = render(inv)
    assert stats(again)["changed"] == 0
    check = render(inv, "--check", "--diff")
    assert stats(check)["changed"] == 0
    assert BIND_PASSWORD not in check.stdout + check.stderr

    # The same key given as base64 (munge_key, from a vault) leaves the same bytes: nothing changes.
    write_inventory(inv, munge_key=base64.b64encode(key).decode(), munge_key_file="")
    assert stats(render(inv))["changed"] == 0
    assert (files / "etc/munge/munge.key").read_bytes() == key

    # A switch turned off takes its files and services out of the bundle.
    write_inventory(inv, join_wireguard=False, join_sssd=False)
    assert stats(render(inv))["changed"] > 0
    manifest = json.loads((node_dir / "manifest.json").read_text())
    assert [e["path"] for e in manifest["files"]] == ["/etc/munge/munge.key", "/etc/default/slurmd"]
    assert manifest["services"] == ["munge", "slurmd"]
    assert not (files / "etc/wireguard/wg0.conf").exists()
    assert not (files / "etc/sssd/conf.d/50-provision-bind.conf").exists()


def assert_bundle_matches_staging(node_dir: Path) -> list[str]:
    """The manifest lists exactly the staged files."""
    manifest = json.loads((node_dir / "manifest.json").read_text())
    staged = sorted(
        "/" + str(p.relative_to(node_dir / "files")) for p in (node_dir / "files").rglob("*") if p.is_file()
    )
    listed = sorted(e["path"] for e in manifest["files"])
    assert staged == listed
    return listed


@pytest.mark.integration
def test_bundle_for_a_rocky_image_and_a_k0s_token(tmp_path: Path) -> None:
    """The node's OS comes from its image definition (slurmd's options file differs); a pre-made k0s token goes in."""
    inv = tmp_path / "inventory"
    write_inventory(
        inv,
        provision_image="compute-rocky9",
        join_wireguard=False,
        k0s_controller_host="localhost",
        k0s_worker_token="k0s-token-secret-0815",
        k0s_worker_checksum="sha256:" + "0" * 64,
    )
    (inv.parent / "munge.key").write_bytes(os.urandom(64))
    proc = render(inv)
    assert stats(proc)["changed"] > 0
    assert "k0s-token-secret-0815" not in proc.stdout + proc.stderr
    node_dir = inv / ".state" / "service" / "bundles" / "node01"
    manifest = json.loads((node_dir / "manifest.json").read_text())
    paths = [e["path"] for e in manifest["files"]]
    assert "/etc/sysconfig/slurmd" in paths and "/etc/default/slurmd" not in paths
    assert paths[-1] == "/etc/k0s/worker-token"
    assert (node_dir / "files/etc/k0s/worker-token").read_text() == "k0s-token-secret-0815\n"
    assert manifest["services"] == ["munge", "sssd", "slurmd"]
    assert_bundle_matches_staging(node_dir)

"""Join mode: the node's services run for real and did join."""

from __future__ import annotations

import re


def test_munge_key_installed_0400_and_round_trip(host):
    key = host.file("/etc/munge/munge.key")
    assert key.exists
    assert key.user == "munge"
    assert key.mode == 0o400
    assert key.size >= 32
    assert host.service("munge").is_running
    out = host.run("munge -n | unmunge")
    assert out.rc == 0, out.stderr
    assert "STATUS:          Success (0)" in out.stdout


def test_slurmd_configless_registered_idle(host):
    assert not host.file("/etc/slurm/slurm.conf").exists  # configless: no local slurm.conf
    assert host.service("slurmd").is_running
    assert host.service("slurmd").is_enabled
    assert "--conf-server 127.0.0.1:6817" in host.file("/etc/default/slurmd").content_string
    dropin = host.file("/etc/systemd/system/slurmd.service.d/10-provision.conf").content_string
    assert "Restart=on-failure" in dropin
    state = host.check_output("sinfo -h -N -o %T -n $(hostname)")
    assert state.strip() == "idle"
    assert host.check_output("srun -N1 hostname").strip() == host.check_output("hostname").strip()


def test_slurm_uses_pmix4_and_fixed_ids(host):
    assert host.package("libpmix2").version.startswith("4.")
    assert "pmix_v4" in host.check_output("srun --mpi=list 2>&1")
    # The plugin loads the library (Debian: the unversioned name the role links) and a PMIx step runs.
    assert "can not load PMIx library" not in host.check_output("journalctl -u slurmd --no-pager")
    assert host.check_output("srun --mpi=pmix -N1 hostname").strip() == host.check_output("hostname").strip()
    assert host.user("slurm").uid == 64030
    assert host.group("slurm").gid == 64030
    assert host.user("munge").uid == 981


def test_sssd_binds_with_the_join_time_password(host):
    snippet = host.file("/etc/sssd/conf.d/50-provision-bind.conf")
    assert snippet.mode == 0o600
    assert "ldap_default_authtok" not in host.file("/etc/sssd/sssd.conf").content_string
    assert host.service("sssd").is_running
    # slapd refuses anonymous reads: this lookup only works through the bind password.
    anonymous = host.run("ldapsearch -x -H ldap://127.0.0.1 -b dc=example,dc=org uid=alice uid")
    assert "uid: alice" not in anonymous.stdout
    entry = host.check_output("getent passwd alice")
    assert entry.startswith("alice:*:20001:20001:")
    assert host.run("sssctl config-check").rc == 0


def test_wireguard_key_made_on_node_and_config_valid(host):
    key = host.file("/etc/wireguard/wg0.key")
    assert key.mode == 0o600
    assert key.user == "root"
    pub = host.check_output("wg pubkey < /etc/wireguard/wg0.key")
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", pub.strip())
    conf = host.file("/etc/wireguard/wg0.conf").content_string
    assert "PrivateKey" not in conf  # the key stays in its own file, set by PostUp
    stripped = host.check_output("wg-quick strip wg0")
    assert "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=" in stripped
    assert host.service("provision-wireguard-keygen@wg0").is_enabled


def test_postboot_steps_ran_in_order(host):
    for step in ("storage", "ldap-ca", "sssd", "helpers"):
        unit = host.service(f"provision-postboot-{step}")
        assert unit.is_enabled
        assert host.check_output(f"systemctl show -P Result provision-postboot-{step}.service") == "success"
    assert host.service("provision-postboot.target").is_enabled
    after = host.check_output("systemctl show -P After provision-postboot-helpers.service")
    assert "provision-postboot-sssd.service" in after
    assert "provision-local-disk.service" in after
    helper = host.file("/usr/local/bin/hello-helper")
    assert helper.mode == 0o755
    assert host.check_output("/usr/local/bin/hello-helper") == "grid helper ok"
    served = host.check_output("sha256sum < /srv/www/ldap-ca.pem").split()[0]
    assert host.check_output("sha256sum < /etc/sssd/pki/ldap-ca.pem").split()[0] == served
    assert host.file("/etc/ssl/certs/provision-ldap-ca.pem").is_symlink

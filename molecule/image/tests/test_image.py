"""Image mode: installed and enabled, nothing node-specific, nothing started by the roles."""

from __future__ import annotations

import pytest

SCRATCH = "/mnt/localdisk"


@pytest.mark.parametrize(
    "package",
    [
        "munge",
        "slurmd",
        "slurm-client",
        "libpmix2",
        "libhwloc15",
        "sssd-ldap",
        "sssd-tools",
        "wireguard-tools",
        "curl",
        "wget",
        "screen",
        "squashfs-tools",
        "cpio",
        "s3cmd",
        "slirp4netns",
        "grepcidr",
        "git-lfs",
        "xz-utils",
        "unzip",
    ],
)
def test_packages_installed(host, package):
    assert host.package(package).is_installed


def test_no_node_secret_in_the_image(host):
    assert not host.file("/etc/munge/munge.key").exists
    assert not host.file("/etc/wireguard/wg0.key").exists
    assert not host.file("/etc/sssd/conf.d/50-provision-bind.conf").exists
    assert "authtok" not in host.file("/etc/sssd/sssd.conf").content_string


def test_munge_enabled_with_fixed_ids_and_modes(host):
    assert host.service("munge").is_enabled
    assert host.user("munge").uid == 981
    assert host.file("/etc/munge").mode == 0o700
    assert host.file("/var/log/munge").mode == 0o700


def test_slurmd_enabled_configless_not_started(host):
    slurmd = host.service("slurmd")
    assert slurmd.is_enabled
    assert not slurmd.is_running  # no MUNGE key yet: its drop-in condition holds it back
    assert (
        'SLURMD_OPTIONS="--conf-server slurmctld.example.org:6817"' in host.file("/etc/default/slurmd").content_string
    )
    dropin = host.file("/etc/systemd/system/slurmd.service.d/10-provision.conf").content_string
    assert "Restart=on-failure" in dropin
    assert "ConditionPathExists=/etc/munge/munge.key" in dropin
    assert "ConstrainCores=yes" in host.file("/etc/slurm/cgroup.conf").content_string
    hw = host.check_output("slurmd -C")  # the real parser/probe: prints this node's line
    assert hw.startswith("NodeName=")
    assert host.user("slurm").uid == 64030


def test_sssd_config_valid_and_private(host):
    conf = host.file("/etc/sssd/sssd.conf")
    assert conf.mode == 0o600
    assert "ldap_uri = ldaps://ldap.example.org" in conf.content_string
    assert "ldap_default_bind_dn = cn=reader,dc=example,dc=org" in conf.content_string
    assert "Issues identified by validators: 0" in host.check_output("sssctl config-check")
    assert host.service("sssd").is_enabled
    # The responders start on first use (socket activation), not with sssd: no services line.
    assert "services =" not in conf.content_string
    for socket in ("sssd-nss.socket", "sssd-pam.socket"):
        assert host.run(f"systemctl is-enabled {socket}").stdout.strip() == "enabled", socket
    # sssd.conf has no services line: the package's check before each socket is reset (roles/sssd).
    for socket in ("sssd-nss.socket", "sssd-pam.socket", "sssd-pam-priv.socket"):
        dropin = host.file(f"/etc/systemd/system/{socket}.d/provision-no-check.conf")
        assert dropin.content_string.splitlines()[-2:] == ["[Socket]", "ExecStartPre="], socket
    for socket in ("sssd-sudo.socket", "sssd-ssh.socket", "sssd-autofs.socket", "sssd-pac.socket"):
        assert not host.file(f"/etc/systemd/system/{socket}.d/provision-no-check.conf").exists, socket
    for socket in ("sssd-sudo.socket", "sssd-ssh.socket", "sssd-autofs.socket", "sssd-pac.socket"):
        assert host.run(f"systemctl is-enabled {socket}").stdout.strip() == "disabled", socket
    assert "pam_mkhomedir" in host.file("/etc/pam.d/common-session").content_string


def test_wireguard_keygen_enabled(host):
    assert host.service("provision-wireguard-keygen@wg0").is_enabled
    assert host.file("/etc/wireguard").mode == 0o700
    assert not host.package("wireguard-dkms").is_installed


def test_nvidia_modprobe_config_rendered(host):
    assert "blacklist nouveau" in host.file("/etc/modprobe.d/blacklist-nouveau.conf").content_string
    assert (
        "options nvidia NVreg_PreserveVideoMemoryAllocations=1"
        in host.file("/etc/modprobe.d/nvidia-provision.conf").content_string
    )
    assert host.file("/etc/modules-load.d/nvidia.conf").content_string.split("\n")[-4:-1] == [
        "nvidia",
        "nvidia_uvm",
        "nvidia_modeset",
    ]


def test_enroot_paths_on_local_disk(host):
    conf = host.file("/etc/enroot/enroot.conf").content_string
    assert "ENROOT_CACHE_PATH /opt/cache/disk/tmp/enroot/cache/group-$(id -g)" in conf
    assert f"ENROOT_DATA_PATH {SCRATCH}/scratch/tmp/enroot/data/user-$(id -u)" in conf
    assert f"ENROOT_TEMP_PATH {SCRATCH}/scratch/tmp" in conf
    assert "ENROOT_RUNTIME_PATH /run/enroot/user-$(id -u)" in conf


def test_apptainer_setuidless_tmp_on_local_disk(host):
    conf = host.file("/etc/apptainer/apptainer.conf").content_string
    assert "allow setuid = no" in conf
    assert (
        f'APPTAINER_TMPDIR="{SCRATCH}/scratch/tmp"' in host.file("/etc/profile.d/apptainer-scratch.sh").content_string
    )
    assert (
        host.file("/etc/sysctl.d/90-apptainer.conf").content_string.strip().endswith("user.max_user_namespaces = 15000")
    )


def test_cvmfs_default_local_and_mount_units(host):
    sourced = host.check_output(
        "bash -c '. /etc/cvmfs/default.local; echo $CVMFS_REPOSITORIES $CVMFS_CACHE_BASE $CVMFS_QUOTA_LIMIT $CVMFS_HTTP_PROXY'"
    )
    assert (
        sourced == f"grid-software.example.org,atlas.cern.ch {SCRATCH}/cvmfs-cache 20000 http://squid.example.org:3128"
    )
    assert host.file("/etc/cvmfs/keys/example.org.pub").mode == 0o644
    for repo in ("grid-software.example.org", "atlas.cern.ch"):
        unit = host.check_output(f"systemd-escape --path --suffix=mount /cvmfs/{repo}")
        mount = host.file(f"/etc/systemd/system/{unit}")
        assert mount.exists, unit
        assert f"Where=/cvmfs/{repo}" in mount.content_string
        assert "After=network-online.target provision-local-disk.service" in mount.content_string
        assert host.run(f"systemctl is-enabled '{unit}'").stdout.strip() == "enabled"


def test_postboot_units_enabled_not_run(host):
    assert host.service("provision-postboot.target").is_enabled
    for step in ("storage", "cvmfs", "ldap-ca", "sssd", "helpers"):
        assert host.service(f"provision-postboot-{step}").is_enabled
        assert not host.service(f"provision-postboot-{step}").is_running
    after = host.check_output("systemctl show -P After provision-postboot-cvmfs.service")
    assert "provision-postboot-storage.service" in after
    assert (
        "cvmfs_config probe 'grid-software.example.org' 'atlas.cern.ch'"
        in host.file("/usr/local/libexec/provision/postboot/cvmfs").content_string
    )
    assert f"{SCRATCH}/scratch/tmp" in host.file("/usr/local/libexec/provision/postboot/storage").content_string
    for script in ("storage", "cvmfs", "ldap-ca", "sssd", "helpers"):
        assert host.run(f"sh -n /usr/local/libexec/provision/postboot/{script}").rc == 0


def test_join_agent_installed_enabled_not_run(host):
    for package in ("age", "curl", "openssh-client"):
        assert host.package(package).is_installed
    agent = host.file("/usr/libexec/provision/join-agent")
    assert agent.mode == 0o755
    assert agent.user == "root"
    assert host.run("sh -n /usr/libexec/provision/join-agent").rc == 0
    unit = host.service("provision-join-agent")
    assert unit.is_enabled
    assert not unit.is_running  # image time: enabled for the next boot, never started
    assert host.check_output("systemctl show -P ActiveState provision-join-agent.service") == "inactive"
    after = host.check_output("systemctl show -P After provision-join-agent.service")
    assert "network-online.target" in after and "provision-ssh-keygen.service" in after
    # No join service on the command line or in the image: the agent says so and succeeds.
    quiet = host.run("PROVISION_JOIN_KMSG=/dev/null /usr/libexec/provision/join-agent --once")
    assert quiet.rc == 0, quiet.stderr
    assert "provision: join no join service configured" in quiet.stderr


def test_enroot_built_from_the_pinned_source(host):
    assert host.check_output("enroot version") == "4.1.2"
    assert not host.package("enroot").is_installed and not host.package("enroot-hardened").is_installed
    for build_dep in ("musl-tools", "linux-libc-dev", "makeself"):
        assert host.package(build_dep).is_installed, build_dep
    caps = host.check_output("getcap /usr/bin/enroot-aufs2ovlfs /usr/bin/enroot-mksquashovlfs")
    assert "cap_sys_admin,cap_mknod=ep" in caps and "cap_sys_admin=ep" in caps
    ldd = host.run("ldd /usr/bin/enroot-nsenter")  # static (musl): no interpreter, no libraries
    assert "statically linked" in ldd.stdout or "not a dynamic executable" in ldd.stderr, ldd
    assert not host.file("/var/cache/provision/enroot").exists


def test_pyxis_plugin_and_plugstack_entry(host):
    plugin = "/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pyxis.so"
    assert host.file(plugin).mode == 0o644
    assert host.file("/usr/share/pyxis/VERSION").content_string.split()[0] == "0.24.0"
    assert host.file("/etc/slurm/plugstack.conf.d/pyxis.conf").content_string.splitlines()[-1] == (
        f"required {plugin} runtime_path=/run/pyxis"
    )
    assert "include /etc/slurm/plugstack.conf.d/*.conf" in host.file("/etc/slurm/plugstack.conf").content_string
    # The node's own srun loads the plugin (plugstack.conf beside a minimal slurm.conf).
    conf = "ClusterName=t;SlurmctldHost=localhost;PlugStackConfig=/etc/slurm/plugstack.conf;NodeName=n1 CPUs=1"
    host.run_expect([0], f"echo '{conf}' | tr ';' '\\n' > /tmp/pyxis-slurm.conf")
    assert "--container-image" in host.check_output("SLURM_CONF=/tmp/pyxis-slurm.conf srun --help")

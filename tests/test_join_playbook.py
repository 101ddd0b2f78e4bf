"""playbooks/join.yml: syntax, the admin-side checks, and how host keys are trusted.

The checks run before any connection to a node, so each bad input is one
host of a single run and must fail on its own message. The one good host
connects locally with every service switched off: it proves the checks pass
and shows the ssh options the playbook sets for a node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import requires

ROOT = Path(__file__).resolve().parent.parent
JOIN = ROOT / "playbooks" / "join.yml"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        **extra,
    }


def test_syntax_check_with_the_example_inventory() -> None:
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(ROOT / "inventory" / "example"), str(JOIN)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: " in proc.stdout


def test_join_uses_the_compute_roles_join_entry_points() -> None:
    plays = yaml.safe_load(JOIN.read_text())
    includes = {
        task["ansible.builtin.include_role"]["name"]: task["ansible.builtin.include_role"].get("tasks_from")
        for task in _all_tasks(plays)
        if "ansible.builtin.include_role" in task
    }
    assert includes == {
        "wireguard": "join",
        "munge": "join",
        "sssd": "join",
        "slurm_node": "join",
        "k0s_worker": "join",
    }
    # Every command carries changed_when.
    for task in _all_tasks(plays):
        if "ansible.builtin.command" in task:
            assert "changed_when" in task, task["name"]


def _all_tasks(plays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(tasks: list[dict[str, Any]]) -> None:
        for t in tasks:
            out.append(t)
            walk(t.get("block", []))

    for play in plays:
        walk(play.get("tasks", []))
    return out


GOOD = {
    "slurm_controller_host": "localhost",
    "slurm_conf_server": "10.99.0.1:6817",
    "munge_key_file": "/nonexistent/munge.key",
}
CASES: dict[str, tuple[dict[str, Any], str | None]] = {
    "badpolicy": (
        {**GOOD, "join_host_key_policy": "yolo"},
        "join_host_key_policy must be pinned, accept-new or inventory (got yolo)",
    ),
    "nocontroller": ({**GOOD, "slurm_controller_host": ""}, "set slurm_controller_host"),
    "unknowncontroller": ({**GOOD, "slurm_controller_host": "master99"}, 'got "master99"'),
    "noconfserver": ({**GOOD, "slurm_conf_server": ""}, 'slurm_conf_server ("host:port" of slurmctld'),
    "nomungekey": ({k: v for k, v in GOOD.items() if k != "munge_key_file"}, "set munge_key_file"),
    "nohostkey": (GOOD, "no host key for nohostkey in"),
    "badtimeout": ({**GOOD, "join_slurm_timeout": 0}, "join_slurm_timeout > 0"),
    # Checks pass; no service is joined (all off), connection is local.
    "pinned": ({**GOOD, "join_slurm": False, "join_sssd": False, "join_k0s": False}, None),
    "acceptnew": (
        {**GOOD, "join_slurm": False, "join_sssd": False, "join_k0s": False, "join_host_key_policy": "accept-new"},
        None,
    ),
}


@pytest.mark.integration
def test_admin_side_checks_fail_per_node_with_a_message(tmp_path: Path) -> None:
    inv = tmp_path / "inventory"
    (inv / ".state" / "known_hosts").mkdir(parents=True)
    (inv / ".state" / "known_hosts" / "pinned").write_text("pinned ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n")
    hosts = {
        name: {**vars_, "ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        for name, (vars_, _) in CASES.items()
    }
    (inv / "hosts.yml").write_text(
        yaml.safe_dump({"all": {"vars": {"provision_state_dir": ".state"}, "children": {"compute": {"hosts": hosts}}}})
    )
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), str(JOIN)],
        cwd=ROOT,
        env=_env(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json"),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0  # some hosts fail, by design
    doc = json.loads(proc.stdout)
    per_host: dict[str, list[dict[str, Any]]] = {}
    for play in doc["plays"]:
        for task in play["tasks"]:
            for host, res in task["hosts"].items():
                per_host.setdefault(host, []).append({"task": task["task"]["name"], **res})
    for name, (_, message) in CASES.items():
        failed = [r for r in per_host[name] if r.get("failed")]
        if message is None:
            assert failed == [], f"{name}: {failed}"
        else:
            assert len(failed) == 1, f"{name}: {[r['task'] for r in per_host[name]]}"
            assert message in failed[0]["msg"], f"{name}: {failed[0]['msg']}"
            # Stopped before connecting: no fact gathering, no join task ran for this node.
            assert not any(r["task"] == "Gathering Facts" for r in per_host[name]), name
    assert doc["stats"]["pinned"]["failures"] == 0 and doc["stats"]["acceptnew"]["failures"] == 0

    def ssh_args(host: str) -> str:
        facts = [r["ansible_facts"] for r in per_host[host] if "ansible_ssh_extra_args" in r.get("ansible_facts", {})]
        assert len(facts) == 1, host
        return " ".join(str(facts[0]["ansible_ssh_extra_args"]).split())

    known = inv / ".state" / "known_hosts"
    assert ssh_args("pinned") == (
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known / 'pinned'} -o HostKeyAlias=pinned"
    )
    assert ssh_args("acceptnew") == (
        f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known / 'acceptnew'} -o HostKeyAlias=acceptnew"
    )


# -- vm: the real join, against a booted systemd node ------------------------------------

ROOTFS_PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,munge,slurmd,slurm-client,iproute2,procps"
# The image side of SSSD and slurmd, as an image build applies it (provision_image_build):
# sssd.conf points at the test's control node; the bind password comes only at join.
SSSD_IMAGE_VARS = {
    "provision_image_build": True,
    "sssd_ldap_uri": ["ldap://10.77.0.1:389"],
    "sssd_ldap_search_base": "dc=lab,dc=provision",
    "sssd_ldap_bind_dn": "cn=sssd,ou=services,dc=lab,dc=provision",
    # The control node's CA is made per run, after this tree is cached: plain LDAP here.
    "sssd_ldap_id_use_start_tls": False,
    "sssd_ldap_tls_reqcert": "never",
}
# Makes the host keys at boot (the tree holds none, like a stateless image) and
# prints the public one on the console, where `provision node boot` reads it.
HOSTKEY_UNIT = """[Unit]
Description=Make SSH host keys for this boot and print them on the console
Before=ssh.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'ssh-keygen -A && echo "provision-hostkey $(cut -d" " -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" >/dev/console'
RemainAfterExit=yes
[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="session")
def node_rootfs(request: pytest.FixtureRequest) -> Path:
    """A Debian 12 tree with systemd, sshd, munge and slurmd -- no host keys, no MUNGE key. Cached."""
    cache = Path(request.config.cache.mkdir("join-node-rootfs-v3"))
    rootfs = cache / "rootfs"
    if (cache / "complete").is_file():
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={ROOTFS_PACKAGES}", "bookworm", str(rootfs)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/munge/munge.key").unlink(missing_ok=True)
    (rootfs / "etc/hostname").write_text("node01\n")
    (rootfs / "etc/systemd/system/provision-test-hostkey.service").write_text(HOSTKEY_UNIT)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "provision-test-hostkey.service").symlink_to("/etc/systemd/system/provision-test-hostkey.service")
    # Apply the sssd and slurm_node roles' image-time tasks to the tree through the chroot connection.
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    play = [
        {
            "name": "image side of sssd and slurmd",
            "hosts": "all",
            "gather_facts": True,
            "vars": SSSD_IMAGE_VARS,
            "tasks": [
                {"name": "sssd", "ansible.builtin.include_role": {"name": "sssd"}},
                {"name": "slurm_node", "ansible.builtin.include_role": {"name": "slurm_node"}},
            ],
        }
    ]
    (cache / "image.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    argv = [str(BIN / "ansible-playbook"), "-i", f"{rootfs},", "-c", "community.general.chroot"]
    argv += ["-e", "ansible_python_interpreter=/usr/bin/python3", str(cache / "image.yml")]
    built = subprocess.run(argv, env=_env(), capture_output=True, text=True, check=False, timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-2000:]
    (cache / "complete").write_text("ok\n")
    return rootfs


def _boot_host_key(nspawn_pid: int, console: Path, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children")
        for init in children.read_text().split() if children.exists() else []:
            key = Path(f"/proc/{init}/root/etc/ssh/ssh_host_ed25519_key.pub")
            with contextlib.suppress(OSError):
                fields = key.read_text().split()
                if len(fields) >= 2:
                    return f"{fields[0]} {fields[1]}"
        time.sleep(0.5)
    raise AssertionError(f"no host key after {timeout} s: {console.read_text(errors='replace')[-3000:]}")


def _node_root(nspawn_pid: int) -> Path:
    """The booted container's root as the host sees it (its init's /proc/<pid>/root)."""
    children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    assert len(children) == 1, children
    return Path(f"/proc/{children[0]}/root")


def _stats(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    return dict(json.loads(proc.stdout)["stats"]["node01"])


@pytest.mark.vm
@requires(shutil.which("systemd-nspawn") is not None, "systemd-container is installed by ./run setup")
def test_join_a_booted_node_for_real(tmp_path: Path, node_rootfs: Path) -> None:
    """join.yml over SSH against a systemd node (nspawn, volatile root) in its own netns, slurmctld real."""
    from test_lab_control import CTL_ADDR, NODE, NODE_ADDR, Rack, rack_namespaces

    from provision.lab import ControlPlane, ControlPlaneConfig, LabNode
    from provision.proc import spawn

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    with rack_namespaces() as r:
        assert isinstance(r, Rack)
        config = ControlPlaneConfig(address=CTL_ADDR, netns=r.ctl_ns, nodes=(LabNode(NODE, NODE_ADDR),), ldap_tls=False)
        cp = ControlPlane(tmp_path / "ctl", config)
        console = tmp_path / "console.log"
        node = None
        try:
            cp.start()
            nspawn = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--console=passive"]
            # --volatile=overlay: the tree stays untouched, every boot starts clean (stateless).
            nspawn += ["--volatile=overlay", "-D", str(node_rootfs), "-b", f"--hostname={NODE}"]
            nspawn += [f"--network-namespace-path=/run/netns/{r.node_ns}"]
            nspawn += [f"--bind-ro={tmp_path / 'id.pub'}:/root/.ssh/authorized_keys"]
            node = spawn(
                nspawn,
                log_path=console,
            )
            # The host key made at this boot, read out of band (the container's own view of its
            # root, from the host) -- the lab reads it from the node's console the same way.
            hostkey = _boot_host_key(node.pid, console)
            inv = tmp_path / "inventory"
            (inv / ".state" / "known_hosts").mkdir(parents=True)
            (inv / ".state" / "known_hosts" / NODE).write_text(f"{NODE} {hostkey}\n")
            (inv / "hosts.yml").write_text(
                yaml.safe_dump(
                    {
                        "all": {
                            # What the lab hands to join.yml: paths and lookups, never secret values.
                            "vars": {"provision_state_dir": ".state", **cp.join_vars()},
                            "hosts": {
                                "localhost": {
                                    "ansible_connection": "local",
                                    "ansible_python_interpreter": sys.executable,
                                }
                            },
                            "children": {
                                "compute": {
                                    "hosts": {
                                        NODE: {
                                            "ansible_host": NODE_ADDR,
                                            "ansible_user": "root",
                                            "ansible_ssh_private_key_file": str(tmp_path / "id"),
                                            "ansible_python_interpreter": "/usr/bin/python3",
                                        }
                                    }
                                }
                            },
                        }
                    }
                )
            )

            def join(*args: str) -> subprocess.CompletedProcess[str]:
                # ansible-playbook runs in the control node's namespace: the admin side of the lab.
                argv = [
                    "ip",
                    "netns",
                    "exec",
                    r.ctl_ns,
                    str(BIN / "ansible-playbook"),
                    "-i",
                    str(inv),
                    str(JOIN),
                    *args,
                ]
                env = _env(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json")
                return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)

            first = join()
            assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
            assert _stats(first)["changed"] > 0
            assert cp.node_states([NODE]) == {NODE: "idle"}
            assert cp.run(["srun", "-N1", "-w", NODE, "hostname"], timeout=60).stdout.strip() == NODE
            # The key never shows in the output.
            assert cp.munge_key.read_bytes().hex()[:32] not in first.stdout.encode().hex()

            # SSSD on the node resolves the directory's test user through the bind user.
            ssh = ["ip", "netns", "exec", r.ctl_ns, "ssh", "-i", str(tmp_path / "id"), "-o", "BatchMode=yes"]
            ssh += ["-o", f"UserKnownHostsFile={inv / '.state' / 'known_hosts' / NODE}", "-o", f"HostKeyAlias={NODE}"]
            getent = subprocess.run(
                [*ssh, f"root@{NODE_ADDR}", "getent", "passwd", "labuser"], capture_output=True, text=True, timeout=60
            )
            assert getent.stdout.strip().split(":")[2:4] == ["20001", "20001"], getent.stdout + getent.stderr
            bind_password = cp.ldap.bind_password_file.read_text().strip()
            assert bind_password not in first.stdout + first.stderr

            # One source of truth: the bundle rendered from the same inventory holds the bytes the
            # join wrote on the node, and its manifest the owners and modes (read through the
            # container's root from the host).
            from test_bundle import assert_bundle_matches_node, render, stats

            bundle = render(inv)
            assert stats(bundle, NODE)["failures"] == 0
            assert bind_password not in bundle.stdout + bundle.stderr
            node_root = _node_root(node.pid)
            listed = assert_bundle_matches_node(inv / ".state" / "service" / "bundles" / NODE, node_root)
            assert set(listed) == {
                "/etc/munge/munge.key",
                "/etc/sssd/sssd.conf",
                "/etc/sssd/conf.d/50-provision-bind.conf",
                "/etc/default/slurmd",
            }

            again = join()
            assert again.returncode == 0, again.stdout[-4000:]
            assert _stats(again)["changed"] == 0  # idempotent
            check = join("--check", "--diff")
            assert check.returncode == 0, check.stdout[-4000:]
            assert _stats(check)["changed"] == 0
        finally:
            if node is not None:
                node.terminate()
                try:
                    node.wait(60)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
            cp.stop()
        assert cp.sandbox.processes() == []

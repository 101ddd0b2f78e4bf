"""The lab's control node: real slurmctld, munged and slapd; a real slurmd joins.

The integration tests build two network namespaces joined by a veth pair:
the control node in one, a "compute node" (its own munged and a configless
slurmd in a Sandbox with its own /run and hostname) in the other. The fast
tests check configuration and bad input without starting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires

from provision.lab import ControlPlane, ControlPlaneConfig, ControlPlaneError, LabNode, Sandbox
from provision.lab.control.render import write_slurm_conf
from provision.proc import pid_alive, run

CTL_ADDR = "10.77.0.1"
NODE_ADDR = "10.77.0.11"
NODE = "node01"
MUNGE_SOCKET = "/run/munge/munge.socket.2"

ONE = (LabNode("n9", "10.0.0.9"),)
needs_root = requires(os.geteuid() == 0, "namespaces need root; CI runs the suite as root")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- fast: configuration and bad input ---------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "10.0.0.300", "nodes": ONE}, "address '10.0.0.300' is not an IP address"),
        ({"address": "10.0.0.1", "nodes": ONE, "slurmctld_port": 0}, "slurmctld_port 0 is not a TCP port"),
        ({"address": "10.0.0.1", "nodes": ONE, "base_dn": "o=lab"}, "base_dn 'o=lab' is not a dc= DN"),
        ({"address": "10.0.0.1", "nodes": ONE, "cluster_name": "my lab"}, "cluster_name 'my lab' is not a plain name"),
        ({"address": "10.0.0.1", "nodes": ()}, "slurmctld needs at least one node"),
        (
            {"address": "10.0.0.1", "nodes": (LabNode("n1", "10.0.0.2"), LabNode("n1", "10.0.0.3"))},
            "nodes: duplicate node names n1",
        ),
        ({"address": "10.0.0.1", "hostname": "n1", "nodes": (LabNode("n1", "10.0.0.2"),)}, "also a node name"),
    ],
)
def test_config_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ControlPlaneError, match=message):
        ControlPlaneConfig(**kwargs)  # type: ignore[arg-type]


def test_node_rejects_bad_input() -> None:
    with pytest.raises(ControlPlaneError, match="node name 'Node_1' is not a valid Slurm node name"):
        LabNode("Node_1", "10.0.0.2")
    with pytest.raises(ControlPlaneError, match="node n1 address 'nowhere' is not an IP address"):
        LabNode("n1", "nowhere")
    with pytest.raises(ControlPlaneError, match="real_memory_mb 0 must be at least 1") as err:
        LabNode("n1", "10.0.0.2", real_memory_mb=0)
    assert err.value.hint and "slurmd -C" in err.value.hint


@requires(shutil.which("slapadd") is not None, "slapd is installed by ./run setup")
def test_prepare_writes_config_and_secrets(tmp_path: Path) -> None:
    nodes = (LabNode("r1n01", "10.99.0.11", cpus=2, real_memory_mb=1500), LabNode("r1n02", "10.99.0.12"))
    cp = ControlPlane(tmp_path / "ctl", ControlPlaneConfig(address="10.99.0.1", nodes=nodes, cluster_name="rack1"))
    cp.prepare()
    conf = cp.slurm_conf.read_text()
    assert "SlurmctldHost=lab-control(10.99.0.1)" in conf
    assert "SlurmctldParameters=enable_configless" in conf
    assert "NodeName=r1n01 NodeAddr=10.99.0.11 CPUs=2 RealMemory=1500 State=UNKNOWN" in conf
    assert "PartitionName=lab Nodes=r1n01,r1n02 Default=YES" in conf
    assert "ProctrackType=proctrack/linuxproc" in conf
    assert (cp.paths.etc / "cgroup.conf").is_file()
    assert _mode(cp.munge_key) == 0o400 and cp.munge_key.stat().st_size == 1024
    assert _mode(cp.paths.secrets) == 0o700
    for secret in (cp.ldap.bind_password_file, cp.ldap.user_password_file, cp.paths.secrets / "ldap-admin.password"):
        assert _mode(secret) == 0o600
    assert cp.ldap.ca_cert is not None and cp.ldap.ca_cert.is_file()
    assert _mode(cp.paths.tls / "server.key") == 0o600
    # Passwords reach slapd only hashed.
    bind_password = cp.ldap.bind_password_file.read_text()
    for f in cp.paths.etc.iterdir():
        assert bind_password not in f.read_text()
    # A second prepare keeps the key and the passwords (booted nodes keep working).
    key = cp.munge_key.read_bytes()
    cp.prepare()
    assert cp.munge_key.read_bytes() == key
    assert cp.ldap.bind_password_file.read_text() == bind_password


def test_cgroups_option_switches_plugins(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, ControlPlaneConfig(address="10.99.0.1", nodes=ONE, cgroups=True, config_overrides=True))
    write_slurm_conf(cp.paths, cp.config)
    text = cp.slurm_conf.read_text()
    assert "ProctrackType=proctrack/cgroup" in text
    assert "TaskPlugin=task/cgroup,task/affinity" in text
    assert "SlurmdParameters=config_overrides" in text


def test_start_refuses_a_missing_netns_before_writing_anything(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "ctl", ControlPlaneConfig(address="10.99.0.1", nodes=ONE, netns="no-such-ns-x1"))
    with pytest.raises(ControlPlaneError, match="network namespace 'no-such-ns-x1' does not exist"):
        cp.start()
    assert not (tmp_path / "ctl").exists()


def test_describe_is_json_safe_and_holds_no_secret(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, ControlPlaneConfig(address="10.99.0.1", nodes=ONE))
    info = json.loads(json.dumps(cp.describe()))
    assert info["conf_server"] == "10.99.0.1:6817"
    assert info["munge_key_file"].endswith("secrets/munge.key")
    assert info["ldap"]["uri"] == "ldap://10.99.0.1:389"
    assert info["ldap"]["bind_dn"] == "cn=sssd,ou=services,dc=lab,dc=provision"
    assert "password" not in json.dumps({k: v for k, v in info["ldap"].items() if k != "bind_password_file"})


def test_join_vars_point_at_files_not_secrets(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, ControlPlaneConfig(address="10.99.0.1", nodes=ONE))
    v = cp.join_vars()
    assert v["slurm_conf_server"] == "10.99.0.1:6817"
    assert v["munge_key_file"] == str(cp.munge_key)
    assert v["join_slurm_sinfo"] == [str(cp.bin_dir / "sinfo")]
    assert v["sssd_ldap_uri"] == ["ldap://10.99.0.1:389"] and v["sssd_ldap_id_use_start_tls"] is True
    assert v["sssd_ldap_bind_password"] == f"{{{{ lookup('ansible.builtin.file', '{cp.ldap.bind_password_file}') }}}}"


def test_stop_without_start_is_harmless(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, ControlPlaneConfig(address="127.0.0.1", nodes=ONE))
    assert cp.stop() == []
    assert cp.stop() == []
    assert cp.status() == {"munged": None, "slapd": None, "slurmctld": None}


# -- integration: real daemons ----------------------------------------------------


@dataclass
class Rack:
    ctl_ns: str
    node_ns: str


def _ip(*args: str) -> None:
    run(["ip", *args])


@contextlib.contextmanager
def rack_namespaces() -> Iterator[Rack]:
    """Two namespaces joined by a veth pair: the control node's and one compute node's."""
    tag = uuid.uuid4().hex[:6]
    r = Rack(ctl_ns=f"pt-ctl-{tag}", node_ns=f"pt-node-{tag}")
    veth_ctl, veth_node = f"ptc{tag}", f"ptn{tag}"
    try:
        for ns in (r.ctl_ns, r.node_ns):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", veth_ctl, "netns", r.ctl_ns, "type", "veth", "peer", "name", veth_node, "netns", r.node_ns)
        _ip("-n", r.ctl_ns, "addr", "add", f"{CTL_ADDR}/24", "dev", veth_ctl)
        _ip("-n", r.node_ns, "addr", "add", f"{NODE_ADDR}/24", "dev", veth_node)
        _ip("-n", r.ctl_ns, "link", "set", veth_ctl, "up")
        _ip("-n", r.node_ns, "link", "set", veth_node, "up")
        yield r
    finally:
        for ns in (r.ctl_ns, r.node_ns):
            run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def rack() -> Iterator[Rack]:
    with rack_namespaces() as r:
        yield r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(node_dir: Path, netns: str, key: Path, conf_server: str) -> tuple[Sandbox, float]:
    """A compute node as processes: its own munged (same key) and a configless slurmd."""
    node = Sandbox(
        node_dir / "run",
        hostname=NODE,
        netns=netns,
        private_dirs=("/var/spool", "/var/log"),
        make_dirs=("/run/munge", "/var/log/slurm"),
    )
    node_dir.mkdir(parents=True, exist_ok=True)
    node_key = node_dir / "munge.key"
    shutil.copyfile(key, node_key)
    node_key.chmod(0o400)
    node.start()
    node.spawn(
        "munged",
        ["munged", "--foreground", f"--key-file={node_key}", f"--seed-file={node_dir / 'munged.seed'}"],
    )
    deadline = time.monotonic() + 10
    while not node.path(MUNGE_SOCKET).is_socket():
        assert time.monotonic() < deadline, (node.log_dir / "munged.log").read_text()
        time.sleep(0.05)
    started = time.monotonic()
    node.spawn("slurmd", ["slurmd", "-D", "--conf-server", conf_server, "-N", NODE])
    return node, started


@needs_root
@pytest.mark.integration
def test_control_plane_serves_slurm_and_ldap_and_a_slurmd_joins(tmp_path: Path, rack: Rack) -> None:
    config = ControlPlaneConfig(address=CTL_ADDR, netns=rack.ctl_ns, nodes=(LabNode(NODE, NODE_ADDR),))
    cp = ControlPlane(tmp_path / "ctl", config)
    node: Sandbox | None = None
    try:
        cp.start()
        pids = cp.status()
        assert all(pids.values()), pids

        # slurmctld answers, configless, and knows the node (not yet registered).
        assert "Slurmctld(primary) at lab-control is UP" in cp.run(["scontrol", "ping"]).stdout
        assert cp.run(["scontrol", "show", "config"]).stdout.count("enable_configless") == 1
        assert cp.node_states() == {NODE: "unknown"}
        # The bin/ wrappers work from the host, as an operator would use them.
        assert NODE in run([cp.bin_dir / "sinfo", "-h", "-o", "%N"]).stdout

        # LDAP: the bind user finds labuser (StartTLS with the lab's CA); anonymous sees nothing.
        found = cp.ldapsearch("(uid=labuser)", "uidNumber", "gidNumber")
        assert found.returncode == 0, found.stderr
        assert "dn: uid=labuser,ou=people,dc=lab,dc=provision" in found.stdout
        assert "uidNumber: 20001" in found.stdout
        group = cp.ldapsearch("(cn=labusers)", "gidNumber", "memberUid")
        assert "gidNumber: 20001" in group.stdout and "memberUid: labuser" in group.stdout
        anonymous = cp.ldapsearch("(uid=labuser)", bind=False)
        assert "labuser" not in anonymous.stdout
        wrong = cp.run(
            ["ldapwhoami", "-x", "-H", cp.ldap.uri, "-D", cp.ldap.bind_dn, "-w", "not-the-password"], check=False
        )
        assert wrong.returncode == 49  # invalidCredentials

        # A real slurmd in the second namespace joins configless and goes idle.
        node, started = _start_node(tmp_path / "node", rack.node_ns, cp.munge_key, cp.conf_server)
        waited = cp.wait_for_nodes([NODE], timeout=60, interval=0.05)
        elapsed = time.monotonic() - started
        print(f"\nslurmd start -> idle: {elapsed:.2f} s (sinfo polled every 0.05 s)")
        assert waited[NODE] <= elapsed
        assert cp.node_states([NODE]) == {NODE: "idle"}

        # A job runs on it: hostname comes from the node's own UTS namespace.
        job = cp.run(["srun", "-N1", "-w", NODE, "hostname"], timeout=60)
        assert job.stdout.strip() == NODE

        # The key never reaches a log.
        key_hex = cp.munge_key.read_bytes().hex()
        for log in (*cp.paths.logs.iterdir(), *node.log_dir.iterdir()):
            assert key_hex[:32] not in log.read_bytes().hex()

        with pytest.raises(ControlPlaneError, match="already runs"):
            cp.start()
    finally:
        if node is not None:
            node.stop()
        cp.stop()

    # Everything is gone: no process in either sandbox, no recorded daemon alive.
    assert cp.sandbox.processes() == []
    assert node is not None and node.processes() == []
    for pid in pids.values():
        assert pid is not None and not pid_alive(pid)
    assert cp.status() == {"munged": None, "slapd": None, "slurmctld": None}
    assert cp.stop() == []  # twice is fine


@needs_root
@pytest.mark.integration
def test_control_plane_on_loopback_without_netns(tmp_path: Path) -> None:
    """netns=None: the host's network, for tests; ports chosen free so nothing clashes."""
    config = ControlPlaneConfig(
        address="127.0.0.1",
        nodes=(LabNode("never-started", "127.0.0.2"),),
        slurmctld_port=_free_port(),
        ldap_port=_free_port(),
        ldaps_port=_free_port(),
        ldap_tls=False,
    )
    cp = ControlPlane(tmp_path, config)
    try:
        cp.start()
        assert " is UP" in cp.run(["scontrol", "ping"]).stdout
        assert "uidNumber: 20001" in cp.ldapsearch("(uid=labuser)", "uidNumber").stdout
        # The host's own /run is untouched: munged's socket lives in the sandbox only.
        assert cp.sandbox.path(MUNGE_SOCKET).is_socket()
    finally:
        cp.stop()
    assert cp.sandbox.processes() == []

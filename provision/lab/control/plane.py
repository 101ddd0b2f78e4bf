"""The virtual rack's control node: slurmctld, munged and slapd, for real.

The control node is a :class:`~provision.lab.sandbox.Sandbox` (its own
``/run``, hostname and -- in the lab -- the rack's network namespace) running
Debian's daemons as plain foreground processes (no systemd as PID 1 here):

- ``munged`` with a generated key (``secrets/munge.key``, mode 0400, reused
  across restarts so that booted nodes keep working, never logged);
- ``slapd`` with a throwaway directory (base DN ``dc=lab,dc=provision``), a
  test user ``labuser`` (uid 20001) in group ``labusers`` (gid 20001), a bind
  user for SSSD and, by default, a private CA and a server certificate
  (StartTLS on the LDAP port and ``ldaps``);
- ``slurmctld`` in configless mode (``SlurmctldParameters=enable_configless``):
  nodes run ``slurmd --conf-server ADDR:PORT`` and fetch slurm.conf and
  cgroup.conf from it.

    cp = ControlPlane(state_dir, ControlPlaneConfig(address="10.99.0.1", netns="prov-lab",
                                                    nodes=(LabNode("r1n01", "10.99.0.11"),)))
    cp.start()
    cp.wait_for_nodes(["r1n01"])          # after the node booted and joined
    cp.run(["srun", "-N1", "hostname"])   # any command inside the control node
    cp.stop()                             # safe twice, and from another process

Secrets live in ``state_dir/secrets`` (0700; files 0400/0600) and only their
paths are handed out. ``bin/`` holds wrappers (``lab-exec``, ``sinfo``,
``scontrol``, ``squeue``, ``srun``, ``sbatch``) that enter the control node.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from provision.errors import ProvisionError
from provision.lab.sandbox import ANCHOR, NETNS_DIR, Sandbox
from provision.proc import run

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MUNGE_SOCKET = "/run/munge/munge.socket.2"
DEBIAN_PACKAGES = "slurmctld slurm-client munge slapd ldap-utils"
_REQUIRED_TOOLS = (
    "munged",
    "slurmctld",
    "scontrol",
    "sinfo",
    "slapd",
    "slapadd",
    "ldapsearch",
    "nsenter",
    "unshare",
    "openssl",
)
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_BASE_DN = re.compile(r"^dc=[a-z0-9-]+(,dc=[a-z0-9-]+)*$")
_WRAPPED = ("sinfo", "scontrol", "squeue", "srun", "sbatch", "scancel")


class ControlPlaneError(ProvisionError):
    """The lab control plane is misconfigured or a service failed to start."""


def _check_address(value: str, field_name: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ControlPlaneError(
            f"{field_name} {value!r} is not an IP address", hint=f"give {field_name} as e.g. 10.99.0.1"
        ) from None
    return value


def _check_port(value: int, field_name: str) -> int:
    if not 1 <= value <= 65535:
        raise ControlPlaneError(f"{field_name} {value} is not a TCP port", hint="use 1-65535")
    return value


@dataclass(frozen=True)
class LabNode:
    """A compute node as slurm.conf declares it.

    ``real_memory_mb`` must not exceed what the node reports (else Slurm marks
    it ``inval``): the default suits a 1.5-2 GiB lab VM.
    """

    name: str
    address: str
    cpus: int = 1
    real_memory_mb: int = 512

    def __post_init__(self) -> None:
        if not _NODE_NAME.match(self.name):
            raise ControlPlaneError(
                f"node name {self.name!r} is not a valid Slurm node name", hint="use lower-case letters, digits, '-'"
            )
        _check_address(self.address, f"node {self.name} address")
        if self.cpus < 1:
            raise ControlPlaneError(f"node {self.name}: cpus {self.cpus} must be at least 1")
        if self.real_memory_mb < 1:
            raise ControlPlaneError(
                f"node {self.name}: real_memory_mb {self.real_memory_mb} must be at least 1",
                hint="use a value at or below the node's memory as `slurmd -C` reports it",
            )


@dataclass(frozen=True)
class ControlPlaneConfig:
    """What the control node serves. ``netns=None``: the host's network (tests on loopback)."""

    address: str
    nodes: tuple[LabNode, ...]
    netns: str | None = None
    cluster_name: str = "lab"
    hostname: str = "lab-control"
    partition: str = "lab"
    slurmctld_port: int = 6817
    slurmd_port: int = 6818
    ldap_port: int = 389
    ldaps_port: int = 636
    base_dn: str = "dc=lab,dc=provision"
    ldap_tls: bool = True
    # True: proctrack/cgroup + task/cgroup (nodes whose slurmd has cgroup
    # delegation, e.g. systemd's Delegate=yes). False: no cgroups needed.
    cgroups: bool = False
    # SlurmdParameters=config_overrides: trust slurm.conf over the hardware.
    config_overrides: bool = False
    # Node-side paths written into the served slurm.conf (slurm_node role's).
    slurmd_spool_dir: str = "/var/spool/slurmd"
    slurmd_log_file: str = "/var/log/slurm/slurmd.log"
    ldap_user: str = "labuser"
    ldap_uid: int = 20001
    ldap_group: str = "labusers"
    ldap_gid: int = 20001

    def __post_init__(self) -> None:
        _check_address(self.address, "address")
        for name in ("slurmctld_port", "slurmd_port", "ldap_port", "ldaps_port"):
            _check_port(getattr(self, name), name)
        for name in ("cluster_name", "partition", "ldap_user", "ldap_group"):
            if not _WORD.match(getattr(self, name)):
                raise ControlPlaneError(
                    f"{name} {getattr(self, name)!r} is not a plain name", hint="use letters, digits, '_', '-'"
                )
        if not _NODE_NAME.match(self.hostname):
            raise ControlPlaneError(f"hostname {self.hostname!r} is not a valid host name")
        if not _BASE_DN.match(self.base_dn):
            raise ControlPlaneError(f"base_dn {self.base_dn!r} is not a dc= DN", hint="use e.g. dc=lab,dc=provision")
        if not self.nodes:
            raise ControlPlaneError(
                "nodes: slurmctld needs at least one node in slurm.conf", hint="give the lab's nodes (LabNode)"
            )
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ControlPlaneError(f"nodes: duplicate node names {', '.join(dupes)}")
        if self.hostname in names:
            raise ControlPlaneError(f"hostname {self.hostname!r} is also a node name", hint="rename one of them")
        for path in (self.slurmd_spool_dir, self.slurmd_log_file):
            if not path.startswith("/"):
                raise ControlPlaneError(f"{path!r} must be an absolute path on the nodes")
        if self.ldap_uid < 1000 or self.ldap_gid < 1000:
            raise ControlPlaneError("ldap_uid and ldap_gid must be 1000 or above", hint="e.g. 20001")

    @property
    def conf_server(self) -> str:
        """What nodes give to ``slurmd --conf-server``."""
        return f"{self.address}:{self.slurmctld_port}"


@dataclass(frozen=True)
class LdapInfo:
    """What an SSSD client needs; secrets as file paths only."""

    uri: str
    ldaps_uri: str | None
    base_dn: str
    bind_dn: str
    bind_password_file: Path
    ca_cert: Path | None
    user: str
    uid: int
    group: str
    gid: int
    user_password_file: Path


@dataclass(frozen=True)
class ControlPlanePaths:
    """Where the control plane keeps its files under its state directory."""

    root: Path
    etc: Path = field(init=False)
    secrets: Path = field(init=False)
    tls: Path = field(init=False)
    bin: Path = field(init=False)
    slurm_state: Path = field(init=False)
    ldap_db: Path = field(init=False)
    sandbox: Path = field(init=False)

    def __post_init__(self) -> None:
        for name, sub in (
            ("etc", "etc"),
            ("secrets", "secrets"),
            ("tls", "tls"),
            ("bin", "bin"),
            ("slurm_state", "slurmctld"),
            ("ldap_db", "ldap"),
            ("sandbox", "run"),
        ):
            object.__setattr__(self, name, self.root / sub)

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def munge_key(self) -> Path:
        return self.secrets / "munge.key"

    @property
    def pids(self) -> Path:
        return self.sandbox / "pids"

    @property
    def logs(self) -> Path:
        return self.sandbox / "log"


def _ssha(password: str) -> str:
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _write_secret(path: Path, data: bytes, mode: int) -> None:
    """Create a secret file with its final mode from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ControlPlane:
    """slurmctld + munged + slapd in one sandbox; run state under ``state_dir``."""

    def __init__(self, state_dir: Path, config: ControlPlaneConfig) -> None:
        self.config = config
        self.paths = ControlPlanePaths(Path(state_dir).resolve())
        self.sandbox = Sandbox(
            self.paths.sandbox,
            hostname=config.hostname,
            netns=config.netns,
            make_dirs=("/run/munge", "/run/slapd"),
        )
        self._jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,
        )

    # -- what clients need -------------------------------------------
    @property
    def conf_server(self) -> str:
        return self.config.conf_server

    @property
    def munge_key(self) -> Path:
        """The MUNGE key file (0400). Hand its path to the join, never its bytes."""
        return self.paths.munge_key

    @property
    def slurm_conf(self) -> Path:
        return self.paths.slurm_conf

    @property
    def bin_dir(self) -> Path:
        return self.paths.bin

    @property
    def ldap(self) -> LdapInfo:
        c = self.config
        return LdapInfo(
            uri=f"ldap://{self._host_for_uri()}:{c.ldap_port}",
            ldaps_uri=f"ldaps://{self._host_for_uri()}:{c.ldaps_port}" if c.ldap_tls else None,
            base_dn=c.base_dn,
            bind_dn=self._bind_dn,
            bind_password_file=self.paths.secrets / "ldap-bind.password",
            ca_cert=self.paths.tls / "ca.crt" if c.ldap_tls else None,
            user=c.ldap_user,
            uid=c.ldap_uid,
            group=c.ldap_group,
            gid=c.ldap_gid,
            user_password_file=self.paths.secrets / "labuser.password",
        )

    def _host_for_uri(self) -> str:
        addr = ipaddress.ip_address(self.config.address)
        return f"[{addr}]" if addr.version == 6 else str(addr)

    @property
    def _bind_dn(self) -> str:
        return f"cn=sssd,ou=services,{self.config.base_dn}"

    @property
    def _admin_dn(self) -> str:
        return f"cn=admin,{self.config.base_dn}"

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts for ``lab up --json`` and inventories: paths to secrets, never secrets."""
        ldap = self.ldap
        return {
            "state_dir": str(self.paths.root),
            "netns": self.config.netns,
            "address": self.config.address,
            "hostname": self.config.hostname,
            "cluster_name": self.config.cluster_name,
            "conf_server": self.conf_server,
            "slurm_conf": str(self.paths.slurm_conf),
            "munge_key_file": str(self.munge_key),
            "bin_dir": str(self.bin_dir),
            "nodes": [{"name": n.name, "address": n.address} for n in self.config.nodes],
            "ldap": {
                "uri": ldap.uri,
                "ldaps_uri": ldap.ldaps_uri,
                "base_dn": ldap.base_dn,
                "bind_dn": ldap.bind_dn,
                "bind_password_file": str(ldap.bind_password_file),
                "ca_cert": str(ldap.ca_cert) if ldap.ca_cert else None,
                "user": ldap.user,
                "uid": ldap.uid,
                "group": ldap.group,
                "gid": ldap.gid,
            },
            "pids": self.status(),
        }

    def join_vars(self) -> dict[str, Any]:
        """Inventory variables for playbooks/join.yml against this control node.

        Secrets stay in their files: the bind password and the CA are read by
        ``lookup('file')`` on the admin host at join time, the MUNGE key is
        copied by path. The admin side asks slurmctld through ``bin/`` wrappers,
        so ``slurm_controller_host`` is ``localhost``.
        """
        ldap = self.ldap
        return {
            "slurm_controller_host": "localhost",
            "slurm_conf_server": self.conf_server,
            "munge_key_file": str(self.munge_key),
            "join_slurm_sinfo": [str(self.bin_dir / "sinfo")],
            "join_slurm_scontrol": [str(self.bin_dir / "scontrol")],
            "join_k0s": False,
            "sssd_ldap_uri": [ldap.uri],
            "sssd_ldap_search_base": ldap.base_dn,
            "sssd_ldap_bind_dn": ldap.bind_dn,
            "sssd_ldap_bind_password": f"{{{{ lookup('ansible.builtin.file', '{ldap.bind_password_file}') }}}}",
            "sssd_ldap_id_use_start_tls": ldap.ca_cert is not None,
            "sssd_ldap_tls_cacert_content": f"{{{{ lookup('ansible.builtin.file', '{ldap.ca_cert}') }}}}"
            if ldap.ca_cert is not None
            else "",
        }

    # -- lifecycle -----------------------------------------------------
    def running(self) -> bool:
        return self.sandbox.running()

    def status(self) -> dict[str, int | None]:
        """Pid of each daemon while it runs inside the control node, else None."""
        return {name: self.sandbox.pid(name) for name in ("munged", "slapd", "slurmctld")}

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, then start munged, slapd and slurmctld.

        On any failure everything started so far is stopped again.
        """
        missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise ControlPlaneError(
                f"missing programs for the lab control plane: {', '.join(missing)}",
                hint=f"apt-get install {DEBIAN_PACKAGES} util-linux openssl (./run setup does)",
            )
        if self.config.netns is not None and not (NETNS_DIR / self.config.netns).exists():
            raise ControlPlaneError(
                f"network namespace {self.config.netns!r} does not exist",
                hint="create the lab's namespace first (provision.lab.netns.Netns(...).create())",
            )
        if self.running():
            raise ControlPlaneError(
                f"the lab control plane already runs (state in {self.paths.root})",
                hint="stop it first: provision lab down",
            )
        self.sandbox.stop()  # leftovers of a crashed run, if any
        self.prepare()
        try:
            self.sandbox.start()
            self._start_munged(timeout)
            self._start_slapd(timeout)
            self._start_slurmctld(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[int]:
        """Stop every process of the control node; return the pids signalled. Safe twice."""
        return self.sandbox.stop()

    # -- running commands inside ----------------------------------------
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.paths.slurm_conf)}

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the control node (SLURM_CONF set), e.g. ``["sinfo"]``."""
        return self.sandbox.run(argv, env={**self.env(), **(env or {})}, input=input, check=check, timeout=timeout)

    def ldapsearch(self, filter: str, *attrs: str, bind: bool = True) -> subprocess.CompletedProcess[str]:
        """Search the directory as the SSSD bind user (StartTLS when TLS is on)."""
        info = self.ldap
        argv = ["ldapsearch", "-LLL", "-x", "-H", info.uri, "-b", info.base_dn]
        env = {}
        if info.ca_cert is not None:
            argv.append("-ZZ")
            env["LDAPTLS_CACERT"] = str(info.ca_cert)
        if bind:
            argv += ["-D", info.bind_dn, "-y", str(info.bind_password_file)]
        return self.run([*argv, filter, *attrs], env=env, check=False, timeout=30)

    def node_states(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Slurm's view of the nodes: name -> state as sinfo prints it (``idle``, ``down*``...)."""
        argv = ["sinfo", "-h", "-N", "-o", "%N %T"]
        wanted = list(names) if names is not None else None
        if wanted:
            argv += ["-n", ",".join(wanted)]
        out = self.run(argv, timeout=30).stdout
        states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
        return {k: v.strip() for k, v in states.items()}

    def wait_for_nodes(
        self, names: Sequence[str], state: str = "idle", timeout: float = 300.0, interval: float = 0.25
    ) -> dict[str, float]:
        """Wait until each node shows ``state``; return seconds waited per node.

        Raises ControlPlaneError naming the nodes (and their last states) that
        did not get there within ``timeout``.
        """
        started = time.monotonic()
        reached: dict[str, float] = {}
        last: dict[str, str] = {}
        while True:
            last = self.node_states(names)
            now = time.monotonic() - started
            for name in names:
                if name not in reached and last.get(name) == state:
                    reached[name] = now
            if len(reached) == len(names):
                return reached
            if now > timeout:
                late = ", ".join(f"{n} ({last.get(n, 'unknown')})" for n in names if n not in reached)
                raise ControlPlaneError(
                    f"nodes not {state} after {timeout:.0f} s: {late}",
                    hint=f"see the node's slurmd log and {self.paths.logs / 'slurmctld.log'}",
                )
            time.sleep(interval)

    # -- preparation ---------------------------------------------------
    def prepare(self) -> None:
        """Write configuration, secrets and the directory database; start nothing."""
        p = self.paths
        for d, mode in ((p.root, 0o755), (p.etc, 0o755), (p.secrets, 0o700), (p.bin, 0o755), (p.slurm_state, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        self._ensure_munge_key()
        passwords = {name: self._ensure_password(name) for name in ("ldap-admin", "ldap-bind", "labuser")}
        if self.config.ldap_tls:
            self._ensure_tls()
        self._render("slurm.conf.j2", p.slurm_conf, self._slurm_vars(), 0o644)
        self._render("cgroup.conf.j2", p.etc / "cgroup.conf", {"cgroups": self.config.cgroups}, 0o644)
        self._render("slapd.conf.j2", p.etc / "slapd.conf", self._slapd_vars(passwords["ldap-admin"]), 0o600)
        self._load_directory(passwords)
        self._write_wrappers()

    def _ensure_munge_key(self) -> None:
        key = self.paths.munge_key
        if key.is_file() and key.stat().st_size >= 32:
            key.chmod(0o400)
            return
        _write_secret(key, secrets.token_bytes(1024), 0o400)

    def _ensure_password(self, name: str) -> str:
        path = self.paths.secrets / f"{name}.password"
        if path.is_file():
            value = path.read_text().strip()
            if value:
                path.chmod(0o600)
                return value
        value = secrets.token_urlsafe(24)
        _write_secret(path, value.encode(), 0o600)
        return value

    def _ensure_tls(self) -> None:
        tls = self.paths.tls
        tls.mkdir(mode=0o755, exist_ok=True)
        ca_key, ca_crt = tls / "ca.key", tls / "ca.crt"
        key, crt = tls / "server.key", tls / "server.crt"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        if not (ca_key.is_file() and ca_crt.is_file()):
            subject = f"/CN=provision lab CA ({self.config.cluster_name})"
            ca_ext = [
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]
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
        san = f"subjectAltName=IP:{self.config.address},DNS:{self.config.hostname}"
        ext = tls / "server.ext"
        ext.write_text(f"{san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        # The server certificate follows the address: re-issue it on every start.
        run(
            [
                "openssl",
                "req",
                "-new",
                *ec,
                "-keyout",
                key,
                "-out",
                tls / "server.csr",
                "-subj",
                f"/CN={self.config.hostname}",
            ]
        )
        sign: list[str | os.PathLike[str]] = [
            "-CA",
            ca_crt,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            ext,
        ]
        run(["openssl", "x509", "-req", "-in", tls / "server.csr", *sign, "-out", crt])
        for f, mode in ((ca_key, 0o600), (key, 0o600), (ca_crt, 0o644), (crt, 0o644)):
            f.chmod(mode)

    def _render(self, template: str, dest: Path, variables: Mapping[str, Any], mode: int) -> None:
        text = self._jinja.get_template(template).render(**variables)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(dest)

    def _slurm_vars(self) -> dict[str, Any]:
        c = self.config
        return {
            "cluster_name": c.cluster_name,
            "hostname": c.hostname,
            "address": c.address,
            "slurmctld_port": c.slurmctld_port,
            "slurmd_port": c.slurmd_port,
            "slurm_user": pwd.getpwuid(os.geteuid()).pw_name,
            "state_save": self.paths.slurm_state,
            "slurmctld_pid_file": self.paths.pids / "slurmctld.daemon.pid",
            "slurmctld_log_file": self.paths.logs / "slurmctld.log",
            "slurmd_spool_dir": c.slurmd_spool_dir,
            "slurmd_log_file": c.slurmd_log_file,
            "cgroups": c.cgroups,
            "config_overrides": c.config_overrides,
            "nodes": c.nodes,
            "partition": c.partition,
        }

    def _slapd_vars(self, admin_password: str) -> dict[str, Any]:
        tls = self.paths.tls
        return {
            "pid_file": self.paths.pids / "slapd.daemon.pid",
            "args_file": self.paths.pids / "slapd.args",
            "tls": {"ca_cert": tls / "ca.crt", "cert": tls / "server.crt", "key": tls / "server.key"}
            if self.config.ldap_tls
            else None,
            "base_dn": self.config.base_dn,
            "admin_dn": self._admin_dn,
            "admin_password_hash": _ssha(admin_password),
            "db_dir": self.paths.ldap_db,
        }

    def _load_directory(self, passwords: Mapping[str, str]) -> None:
        """Rebuild the throwaway directory from scratch (slapadd, offline)."""
        c = self.config
        db = self.paths.ldap_db
        if db.exists():
            shutil.rmtree(db)
        db.mkdir(mode=0o700)
        ldif = self.paths.etc / "lab.ldif"
        self._render(
            "lab.ldif.j2",
            ldif,
            {
                "base_dn": c.base_dn,
                "dc": c.base_dn.split(",")[0].removeprefix("dc="),
                "bind_dn": self._bind_dn,
                "bind_cn": "sssd",
                "bind_password_hash": _ssha(passwords["ldap-bind"]),
                "user": c.ldap_user,
                "uid": c.ldap_uid,
                "group": c.ldap_group,
                "gid": c.ldap_gid,
                "user_password_hash": _ssha(passwords["labuser"]),
            },
            0o600,
        )
        run(
            ["slapadd", "-q", "-f", self.paths.etc / "slapd.conf", "-l", ldif],
            hint=f"check {self.paths.etc / 'slapd.conf'}",
        )

    def _write_wrappers(self) -> None:
        exec_path = self.paths.bin / "lab-exec"
        self._render(
            "lab-exec.j2",
            exec_path,
            {"anchor_pid_file": self.paths.pids / f"{ANCHOR}.pid", "slurm_conf": self.paths.slurm_conf},
            0o755,
        )
        for tool in _WRAPPED:
            path = self.paths.bin / tool
            path.unlink(missing_ok=True)
            path.write_text(f'#!/bin/sh\nexec "{exec_path}" {tool} "$@"\n')
            path.chmod(0o755)

    # -- daemons -----------------------------------------------------------
    def _wait(self, what: str, ready: Any, timeout: float, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sandbox.pid(what) is None:
                raise ControlPlaneError(
                    f"{what} exited while starting: {self._log_tail(log)}", hint=f"see {self.paths.logs / log}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise ControlPlaneError(f"{what} not ready after {timeout:.0f} s", hint=f"see {self.paths.logs / log}")

    def _log_tail(self, log: str) -> str:
        try:
            lines = (self.paths.logs / log).read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no log"
        return " | ".join(lines[-3:]) or "no output"

    def _start_munged(self, timeout: float) -> None:
        logs, pids = self.paths.logs, self.paths.pids
        self.sandbox.spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={MUNGE_SOCKET}",
                f"--key-file={self.paths.munge_key}",
                f"--pid-file={pids / 'munged.daemon.pid'}",
                f"--log-file={logs / 'munged.daemon.log'}",
                f"--seed-file={self.paths.sandbox / 'munged.seed'}",
                f"--origin={self.config.address}",
            ],
        )
        self._wait("munged", lambda: self.sandbox.path(MUNGE_SOCKET).is_socket(), timeout, "munged.log")

    def _start_slapd(self, timeout: float) -> None:
        c = self.config
        urls = [f"ldap://{self._host_for_uri()}:{c.ldap_port}/"]
        if c.ldap_tls:
            urls.append(f"ldaps://{self._host_for_uri()}:{c.ldaps_port}/")
        # -d: stay in the foreground (logs on stderr, into the log file).
        self.sandbox.spawn("slapd", ["slapd", "-d", "stats", "-f", self.paths.etc / "slapd.conf", "-h", " ".join(urls)])
        self._wait(
            "slapd", lambda: self.ldapsearch("(objectClass=dcObject)", "dc").returncode == 0, timeout, "slapd.log"
        )

    def _start_slurmctld(self, timeout: float) -> None:
        self.sandbox.spawn("slurmctld", ["slurmctld", "-D", "-f", self.paths.slurm_conf], env=self.env())

        def up() -> bool:
            out = self.run(["scontrol", "ping"], check=False, timeout=15).stdout
            return " is UP" in out

        self._wait("slurmctld", up, timeout, "slurmctld.log")

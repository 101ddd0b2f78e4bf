"""The control node: slurmctld, munged and slapd in one sandbox."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

from provision.lab.control import daemons, directory, render
from provision.lab.control import secrets as lab_secrets
from provision.lab.control.config import ControlPlaneConfig, ControlPlaneError, ControlPlanePaths, LdapInfo
from provision.lab.sandbox import Argv, RunOptions, Sandbox
from provision.proc import netns_exists

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
        return directory.ldap_info(self.paths, self.config)

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
            "provision_slurm_bin_dir": str(self.bin_dir),  # rollouts: scontrol reboot, srun checks
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
        return {name: self.sandbox.pid(name) for name in daemons.DAEMONS}

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
        if self.config.netns is not None and not netns_exists(self.config.netns):
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
            daemons.start_munged(self.sandbox, self.paths, self.config, timeout)
            daemons.start_slapd(self.sandbox, self.paths, self.config, timeout, self._directory_answers)
            daemons.start_slurmctld(self.sandbox, self.paths, self.env(), timeout, self._slurmctld_up)
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
        self, argv: Argv, *, env: Mapping[str, str] | None = None, **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the control node (SLURM_CONF set), e.g. ``["sinfo"]``."""
        return self.sandbox.run(argv, env={**self.env(), **(env or {})}, **options)

    def ldapsearch(self, filter: str, *attrs: str, bind: bool = True) -> subprocess.CompletedProcess[str]:
        """Search the directory as the SSSD bind user (StartTLS when TLS is on)."""
        argv, env = directory.ldapsearch_argv(self.ldap, filter, attrs, bind=bind)
        return self.run(argv, env=env, check=False, timeout=30)

    def _directory_answers(self) -> bool:
        return self.ldapsearch("(objectClass=dcObject)", "dc").returncode == 0

    def _slurmctld_up(self) -> bool:
        return " is UP" in self.run(["scontrol", "ping"], check=False, timeout=15).stdout

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
        lab_secrets.ensure_munge_key(p)
        passwords = {name: lab_secrets.ensure_password(p, name) for name in ("ldap-admin", "ldap-bind", "labuser")}
        if self.config.ldap_tls:
            lab_secrets.ensure_tls(p, self.config)
        render.write_slurm_conf(p, self.config)
        directory.write_slapd_conf(p, self.config, passwords["ldap-admin"])
        directory.load_directory(p, self.config, passwords)
        render.write_wrappers(p)

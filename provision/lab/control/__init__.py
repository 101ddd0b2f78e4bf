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

Modules: ``config`` (what it serves, where its files are), ``secrets``
(MUNGE key, passwords, TLS CA), ``render`` (slurm.conf and wrappers from the
templates), ``directory`` (slapd.conf and the LDAP database), ``daemons``
(starting munged, slapd, slurmctld), ``plane`` (:class:`ControlPlane`).
"""

from provision.lab.control.config import ControlPlaneConfig, ControlPlaneError, ControlPlanePaths, LabNode, LdapInfo
from provision.lab.control.daemons import MUNGE_SOCKET
from provision.lab.control.plane import DEBIAN_PACKAGES, ControlPlane

__all__ = [
    "DEBIAN_PACKAGES",
    "MUNGE_SOCKET",
    "ControlPlane",
    "ControlPlaneConfig",
    "ControlPlaneError",
    "ControlPlanePaths",
    "LabNode",
    "LdapInfo",
]

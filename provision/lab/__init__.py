"""The virtual rack: a control node (slurmctld, munged, slapd) in namespaces.

``provision lab up/down`` puts these parts together with the boot backend,
the virtual BMCs and the QEMU machines.
"""

from provision.lab.control import ControlPlane, ControlPlaneConfig, ControlPlaneError, LabNode, LdapInfo
from provision.lab.sandbox import Sandbox, SandboxError

__all__ = [
    "ControlPlane",
    "ControlPlaneConfig",
    "ControlPlaneError",
    "LabNode",
    "LdapInfo",
    "Sandbox",
    "SandboxError",
]

"""The virtual rack's control node (see provision.lab.control.plane)."""

from provision.lab.control.plane import ControlPlane, ControlPlaneConfig, ControlPlaneError, LabNode, LdapInfo

__all__ = ["ControlPlane", "ControlPlaneConfig", "ControlPlaneError", "LabNode", "LdapInfo"]

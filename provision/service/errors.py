"""Errors of the join service (settings, bundles)."""

from __future__ import annotations

from provision.errors import ProvisionError


class JoinServiceError(ProvisionError):
    """The join service cannot start, or a node's bundle cannot be served."""


class BundleError(JoinServiceError):
    """A node's rendered bundle is missing or malformed."""

"""Boot backends: the interface (``base``) and one module per backend.

``get_backend(name, config)`` builds a backend; ``backend_for_site(site)``
builds the one the inventory chooses with ``provision_boot_backend``.
"""

from __future__ import annotations

from provision.boot.base import (
    BackendName,
    BootBackend,
    BootHost,
    BootImage,
    Change,
    HostChange,
    SyncPlan,
    address_of,
    backend_config,
    backend_for_site,
    check_host_name,
    check_image_name,
    get_backend,
    normalize_cidr,
    normalize_mac,
    plan_sync,
    sync_hosts,
)

__all__ = [
    "BackendName",
    "BootBackend",
    "BootHost",
    "BootImage",
    "Change",
    "HostChange",
    "SyncPlan",
    "address_of",
    "backend_config",
    "backend_for_site",
    "check_host_name",
    "check_image_name",
    "get_backend",
    "normalize_cidr",
    "normalize_mac",
    "plan_sync",
    "sync_hosts",
]

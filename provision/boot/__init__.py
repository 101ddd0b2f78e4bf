"""Boot backends: the interface (``base``) and one module or package per backend.

``backend_for(site)`` builds the backend the site chose
(``provision_boot_backend``); callers use only ``BootBackend``'s methods.
"""

from __future__ import annotations

from provision.boot.base import (
    BackendName,
    BootBackend,
    BootHost,
    BootImage,
    Change,
    HostChange,
    Prepared,
    Published,
    ServiceStatus,
    SyncPlan,
    address_of,
    backend_for,
    check_host_name,
    check_image_name,
    get_backend,
    normalize_cidr,
    normalize_mac,
    plan_sync,
    site_hosts,
    sync_hosts,
)

__all__ = [
    "BackendName",
    "BootBackend",
    "BootHost",
    "BootImage",
    "Change",
    "HostChange",
    "Prepared",
    "Published",
    "ServiceStatus",
    "SyncPlan",
    "address_of",
    "backend_for",
    "check_host_name",
    "check_image_name",
    "get_backend",
    "normalize_cidr",
    "normalize_mac",
    "plan_sync",
    "site_hosts",
    "sync_hosts",
]

"""Where the built-in backend keeps its state: one directory, ``<state_dir>/boot``.

::

    registry.json            hosts, images (every servable version) and the active version per image
    tokens.json              one-time boot tokens per host (mode 0600, never logged)
    conf/dnsmasq.conf        rendered from provision/boot/templates/ with jinja2
    conf/dnsmasq.hosts       static leases (MAC,IP,name); re-read on SIGHUP
    conf/nginx.conf
    run/<service>.pid        pids of the running services (found again by `stop` from any process)
    dnsmasq.leases
    logs/dnsmasq.log         DHCP/TFTP log (log-dhcp): evidence of boot phases
    logs/http-access.log     nginx access log: evidence of boot phases
    tftp/                    iPXE binaries for firmware PXE clients
    www/boot.ipxe            generic script: chains www/boot/<mac>.ipxe
    www/boot/<mac>.ipxe      per-node script (root, group of nginx's workers, 0640: carries the boot token)
    www/ssh/authorized_keys  public keys the booted nodes fetch for root
    www/images/<name>/<version>/  hard links into the image store (symlinks only across filesystems)

Run as root, the services bind as root and then serve as unprivileged users
(dnsmasq: ``dnsmasq`` or ``nobody``; nginx's workers: ``www-data`` or
``nobody``). This directory is 0711 so they reach ``www/``, ``tftp/`` and
``conf/dnsmasq.hosts`` by name but list nothing; ``run/`` and ``logs/`` are
0700 and ``tokens.json`` 0600. Directories above it get the search bit
(o+x) when they lack it, never read.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class Service(StrEnum):
    DNSMASQ = "dnsmasq"
    NGINX = "nginx"


class Layout:
    """The paths under the backend's state directory ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    @property
    def tokens_path(self) -> Path:
        return self.root / "tokens.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def hosts_file(self) -> Path:
        return self.conf_dir / "dnsmasq.hosts"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def docroot(self) -> Path:
        return self.root / "www"

    @property
    def tftp_root(self) -> Path:
        return self.root / "tftp"

    @property
    def nginx_temp(self) -> Path:
        return self.root / "nginx-tmp"

    @property
    def dnsmasq_log(self) -> Path:
        return self.log_dir / "dnsmasq.log"

    @property
    def http_access_log(self) -> Path:
        return self.log_dir / "http-access.log"

    @property
    def nginx_error_log(self) -> Path:
        return self.log_dir / "nginx-error.log"

    @property
    def lease_file(self) -> Path:
        return self.root / "dnsmasq.leases"

    def pid_file(self, service: Service) -> Path:
        """Written by provision when it starts ``service``."""
        return self.run_dir / f"{service}.pid"

    def own_pid_file(self, service: Service) -> Path:
        """Written by the service itself once it is ready."""
        return self.run_dir / f"{service}.own.pid"

    def conf_hash_file(self, service: Service) -> Path:
        """The hash of the config the running service read."""
        return self.run_dir / f"{service}.confhash"

    def conf_file(self, service: Service) -> Path:
        return self.conf_dir / f"{service}.conf"

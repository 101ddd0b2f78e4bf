"""Everything the built-in backend's services read, rendered from the registry.

dnsmasq's config and static leases, nginx's config, the generic and the
per-node iPXE scripts, the public keys the nodes fetch, the iPXE binaries
for TFTP, and the image links under ``www/images/<name>/<version>/``. The
templates are ``provision/boot/templates/*.j2``. Writing never touches a
running service; it reports what changed so the caller can reload.
"""

from __future__ import annotations

import getpass
import grp
import os
import pwd
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import netaddr

from provision.boot.base import BootHost, normalize_mac
from provision.boot.builtin.config import BuiltinConfig, DhcpMode
from provision.boot.builtin.layout import Layout, Service
from provision.boot.builtin.registry import ImageVersionRecord, Registry
from provision.errors import BootError
from provision.files import write_atomic

#: The kernel command line every node gets (dracut livenet, see the README); the image adds its own extras.
BASE_CMDLINE = (
    "root=live:{squashfs_url} rd.live.overlay.overlayfs=1 rd.neednet=1 ip=dhcp BOOTIF=01-{mac_hyp} "
    "console=ttyS0,115200 rd.shell=0 rd.emergency=reboot panic=10"
)


def mac_file_name(mac: str) -> str:
    """``52:54:00:ab:cd:ef`` → ``52-54-00-ab-cd-ef`` (iPXE's ``${net0/mac:hexhyp}``)."""
    return normalize_mac(mac).replace(":", "-")


def served_names(record: ImageVersionRecord) -> tuple[str, list[str]]:
    """File names under /images/<name>/<version>/ for the kernel and each initrd."""
    kernel = Path(record.kernel).name
    names: list[str] = []
    for index, initrd in enumerate(record.initrds):
        base = Path(initrd).name
        names.append(base if base not in names and base != kernel else f"{index}-{base}")
    return kernel, names


@dataclass(frozen=True)
class ServiceUser:
    """The account a service's network-facing processes run as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def pick(cls, *candidates: str) -> ServiceUser:
        """As root: the first unprivileged account that exists (nobody last). Otherwise: ourselves."""
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return cls(getpass.getuser(), me.pw_uid, me.pw_gid)
        for name in (*candidates, "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            if entry.pw_uid != 0:
                return cls(name, entry.pw_uid, entry.pw_gid)
        raise BootError("no unprivileged account for the boot services", hint="create the user nobody")

    @property
    def group(self) -> str:
        return grp.getgrgid(self.gid).gr_name


def nginx_quote(value: object) -> str:
    """A value in nginx.conf: double-quoted, backslash and quote escaped (paths with spaces)."""
    text = str(value)
    if any(c in text for c in "$\n\r\0"):  # nginx expands $variables in paths
        raise BootError(
            f"{text!r}: nginx cannot read a path with $ or a line break", hint="use a provision_state_dir without them"
        )
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dnsmasq_quote(value: object) -> str:
    """A value in dnsmasq.conf: double-quoted (dnsmasq strips the quotes; a comma or quote cannot be written)."""
    text = str(value)
    if any(c in text for c in '",\\\n\r\0'):
        raise BootError(
            f"{text!r}: dnsmasq cannot read a path with a comma, quote, backslash or line break",
            hint="use a provision_state_dir without them",
        )
    return f'"{text}"'


#: A client with no script of its own (boot.ipxe): tries, seconds between them, then the next boot device.
UNKNOWN_ATTEMPTS = 3
UNKNOWN_WAIT = 10

#: Worker accounts, most specific first (Debian's packages create dnsmasq and www-data).
DNSMASQ_USERS = ("dnsmasq",)
NGINX_USERS = ("www-data", "nginx")


@dataclass(frozen=True)
class Written:
    """What a render changed that running services must be told about."""

    hosts_changed: bool  # dnsmasq re-reads its hosts file on SIGHUP
    nginx_changed: bool  # nginx reloads its config on SIGHUP


class Renderer:
    def __init__(self, config: BuiltinConfig, layout: Layout) -> None:
        self.config = config
        self.layout = layout
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("provision.boot", "templates"),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )
        self._env.filters["nq"] = nginx_quote
        self._env.filters["dq"] = dnsmasq_quote
        self.dnsmasq_user = ServiceUser.pick(*DNSMASQ_USERS)
        self.nginx_user = ServiceUser.pick(*NGINX_USERS)

    def _template(self, template: str, **values: Any) -> str:
        return self._env.get_template(template).render(**values)

    def dnsmasq(self, hosts: Sequence[BootHost]) -> tuple[str, str]:
        """(dnsmasq.conf, dnsmasq.hosts) for ``hosts``."""
        cfg, paths = self.config, self.layout
        net = netaddr.IPNetwork(cfg.network)
        leases = []
        for host in sorted(hosts, key=lambda h: h.name):
            for index, mac in enumerate(host.macs):
                ip = host.addresses[index] if index < len(host.addresses) else None
                # Static mode leases each MAC its address; proxy mode lists every MAC as known
                # (dhcp-ignore=tag:!known), with or without an address in the inventory.
                if ip is not None or cfg.dhcp_mode is DhcpMode.PROXY:
                    leases.append({"mac": mac, "ip": ip, "name": host.name})
        conf = self._template(
            "dnsmasq.conf.j2",
            mode=str(cfg.dhcp_mode),
            interface=cfg.interface,
            server=cfg.server_address,
            user=self.dnsmasq_user.name,
            group=self.dnsmasq_user.group,
            pid_file=paths.own_pid_file(Service.DNSMASQ),
            log_file=paths.dnsmasq_log,
            lease_file=paths.lease_file,
            network_address=str(net.network),
            netmask=str(net.netmask),
            lease_time=cfg.lease_time,
            hosts_file=paths.hosts_file,
            gateway=cfg.gateway,
            dns_servers=list(cfg.dns_servers),
            router_advertisements=cfg.router_advertisements,
            tftp_root=paths.tftp_root,
            uefi_loader=str(cfg.uefi_loader),
            boot_url=f"{cfg.base_url}/boot.ipxe",
            proxy_any=cfg.proxy_any,
        )
        return conf, self._template("dnsmasq.hosts.j2", leases=leases, mode=str(cfg.dhcp_mode))

    def nginx(self, hosts: Sequence[BootHost] = ()) -> str:
        """nginx.conf. With static leases each node's script (it carries the token) is served to its address only."""
        cfg, paths = self.config, self.layout
        pinned = []
        if cfg.dhcp_mode is DhcpMode.STATIC:
            for host in sorted(hosts, key=lambda h: h.name):
                for mac, ip in zip(host.macs, host.addresses, strict=False):
                    pinned.append({"file": f"{mac_file_name(mac)}.ipxe", "ip": ip})
        return self._template(
            "nginx.conf.j2",
            pinned=pinned,
            workers=cfg.http_workers,
            user=self.nginx_user.name if os.geteuid() == 0 else None,
            group=self.nginx_user.group,
            pid_file=paths.own_pid_file(Service.NGINX),
            error_log=paths.nginx_error_log,
            access_log=paths.http_access_log,
            temp_dir=paths.nginx_temp,
            listen=f"{cfg.server_address}:{cfg.http_port}",
            docroot=paths.docroot,
            images_symlinked=self._images_symlinked,
        )

    def node_script(self, host: BootHost, mac: str, reg: Registry, token: str | None) -> str:
        cfg = self.config
        image_name = host.image or cfg.default_image
        version = reg.pinned.get(host.name) or (reg.active.get(image_name) if image_name else None)
        ip = host.addresses[host.macs.index(mac)] if host.macs.index(mac) < len(host.addresses) else None
        values: dict[str, Any] = {"name": host.name, "mac": mac, "ip": ip, "image": None, "reason": ""}
        if not host.provision:
            values["reason"] = "not set to network-boot (provision off)"
        elif not image_name:
            values["reason"] = "no image (set provision_image or provision_default_image)"
        elif version is None or image_name is None:
            values["reason"] = f"image {image_name} has no active version (publish and activate it)"
        elif version not in reg.versions.get(image_name, {}):
            values["reason"] = f"image {image_name} version {version} (pinned) is not registered (publish it)"
        else:
            record = reg.versions[image_name][version]
            base = f"{cfg.base_url}/images/{image_name}/{version}"
            initrds = [{"name": n, "url": f"{base}/{n}"} for n in served_names(record)[1]]
            squashfs_url = f"{base}/{Path(record.squashfs).name}" if record.squashfs else ""
            args = (
                [BASE_CMDLINE.format(squashfs_url=squashfs_url, mac_hyp=mac.replace(":", "-"))]
                if record.squashfs
                else []
            )
            args += [f"initrd={i['name']}" for i in initrds]
            args += [f"systemd.hostname={host.name}", f"provision.node={host.name}"]
            if ip:
                args.append(f"provision.ip={ip}")
            args.append(f"provision.server={cfg.base_url}")
            if cfg.join_url:
                args.append(f"provision.join={cfg.join_url}")
            if token:
                args.append(f"provision.token={token}")
            present = {word for arg in args for word in arg.split()}
            # The image's extras, without repeating what is already there (images often list the same dracut options).
            args += [word for word in record.cmdline.split() if word not in present]
            values["image"] = {
                "name": image_name,
                "version": version,
                "kernel_url": f"{base}/{served_names(record)[0]}",
                "initrd_urls": initrds,
            }
            values["cmdline"] = " ".join(a for a in args if a)
        return self._template("node.ipxe.j2", **values)

    def write(self, reg: Registry, tokens: Mapping[str, str]) -> Written:
        """Write every config, script and image link for ``reg``; only what differs is rewritten."""
        paths = self.layout
        for directory in (
            paths.conf_dir,
            paths.run_dir,
            paths.log_dir,
            paths.docroot / "boot",
            paths.docroot / "images",
            paths.docroot / "ssh",
            paths.tftp_root,
            paths.nginx_temp,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self._grant_access()
        self._sync_images(reg)
        hosts = list(reg.hosts.values())
        conf, hosts_text = self.dnsmasq(hosts)
        write_atomic(paths.conf_file(Service.DNSMASQ), conf)
        hosts_changed = write_atomic(paths.hosts_file, hosts_text)
        nginx_changed = write_atomic(paths.conf_file(Service.NGINX), self.nginx(hosts))
        write_atomic(
            paths.docroot / "boot.ipxe",
            self._template("boot.ipxe.j2", base_url=self.config.base_url, attempts=UNKNOWN_ATTEMPTS, wait=UNKNOWN_WAIT),
        )
        keys = "".join(f"{key}\n" for key in self.config.authorized_keys)
        write_atomic(paths.docroot / "ssh" / "authorized_keys", keys, mode=0o644)
        self._sync_tftp()
        wanted: set[str] = set()
        for host in hosts:
            for mac in host.macs:
                file_name = f"{mac_file_name(mac)}.ipxe"
                wanted.add(file_name)
                script = self.node_script(host, mac, reg, tokens.get(host.name) if host.provision else None)
                script_path = paths.docroot / "boot" / file_name
                write_atomic(script_path, script, mode=0o600)
                # Carries the token: readable by nginx's workers (their group) and nobody else.
                os.chown(script_path, -1, self.nginx_user.gid)
                script_path.chmod(0o640)
        for stale in (paths.docroot / "boot").glob("*.ipxe"):
            if stale.name not in wanted:
                stale.unlink()
        return Written(hosts_changed=hosts_changed, nginx_changed=nginx_changed)

    def _grant_access(self) -> None:
        """The workers (unprivileged) can reach www/, tftp/ and conf/dnsmasq.hosts; nothing else of the state dir.

        The boot directory is 0711 (no listing: tokens.json and registry.json stay unreadable to them); each
        directory above it gets the search bit (o+x) if it lacks it, never read.
        """
        paths = self.layout
        if os.geteuid() != 0:
            return
        for ancestor in reversed(paths.root.resolve().parents):
            mode = ancestor.stat().st_mode
            if not mode & stat.S_IXOTH:
                ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        paths.root.chmod(0o711)
        for directory in (paths.conf_dir, paths.docroot, paths.docroot / "boot", paths.docroot / "images",
                          paths.docroot / "ssh", paths.tftp_root):  # fmt: skip
            directory.chmod(0o755)
        for private in (paths.run_dir, paths.log_dir):
            private.chmod(0o700)

    @property
    def _images_symlinked(self) -> bool:
        """True when some image file is served through a symlink (its store is on another filesystem)."""
        images = self.layout.docroot / "images"
        return images.is_dir() and any(p.is_symlink() for p in images.glob("*/*/*"))

    def _sync_tftp(self) -> None:
        for binary in ("undionly.kpxe", "ipxe.efi", "snponly.efi"):
            source = self.config.ipxe_dir / binary
            target = self.layout.tftp_root / binary
            if not source.is_file():
                raise BootError(f"{source} is missing", hint="install the Debian package ipxe")
            if (
                not target.exists()
                or target.stat().st_size != source.stat().st_size
                or target.read_bytes() != source.read_bytes()
            ):
                shutil.copyfile(source, target)

    def _sync_images(self, reg: Registry) -> None:
        images = self.layout.docroot / "images"
        wanted: set[Path] = set()
        for name, versions in reg.versions.items():
            for version, record in versions.items():
                vdir = images / name / version
                vdir.mkdir(parents=True, exist_ok=True)
                wanted.add(vdir)
                kernel_name, initrd_names = served_names(record)
                links = {kernel_name: record.kernel, **dict(zip(initrd_names, record.initrds, strict=True))}
                if record.squashfs:
                    links[Path(record.squashfs).name] = record.squashfs
                for link_name, target in links.items():
                    _link_into_docroot(vdir / link_name, Path(target))
                for extra in vdir.iterdir():
                    if extra.name not in links:
                        extra.unlink()
        for name_dir in list(images.iterdir()):
            for vdir in list(name_dir.iterdir()) if name_dir.is_dir() else []:
                if vdir not in wanted:
                    shutil.rmtree(vdir)
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()


def _link_into_docroot(link: Path, target: Path) -> None:
    """A hard link to target (no copy, and nginx follows no symlink); a symlink when target is on another filesystem.

    A 400 MB squashfs costs one directory entry either way. The store replaces files by rename, never in place,
    so a hard link keeps serving the bytes it was made for until the next render.
    """
    if link.exists() and not link.is_symlink() and os.path.samefile(link, target):
        return
    if link.is_symlink() and os.readlink(link) == str(target) and link.stat().st_dev != target.parent.stat().st_dev:
        return
    link.unlink(missing_ok=True)
    try:
        os.link(target, link)
    except OSError:  # another filesystem (EXDEV), or hard links refused: nginx follows it only if owners match
        link.symlink_to(target)

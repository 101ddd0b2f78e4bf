"""dnsmasq and nginx of the built-in backend: start, reload, stop, status.

Both run in the foreground as children started with ``provision.proc.spawn``
in their own session (inside ``provision_boot_netns`` when set); their pids
are written under ``run/`` and checked against ``/proc/<pid>/cmdline``, so
``stop`` finds them after the CLI that started them has exited.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from provision.boot.base import ServiceStatus
from provision.boot.builtin.config import BuiltinConfig
from provision.boot.builtin.layout import Layout, Service
from provision.boot.builtin.render import Written
from provision.errors import BootError
from provision.proc import netns_argv, netns_exists, pid_alive, spawn

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_NGINX_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(emerg|alert|crit|error)\] \d+#\d+: ")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _first_error(logs: Sequence[Path], offsets: Sequence[int]) -> str:
    """The first error line a service wrote since ``offsets`` (nginx's prefix removed)."""
    lines: list[str] = []
    for path, offset in zip(logs, offsets, strict=True):
        with contextlib.suppress(OSError):
            lines += [
                line.strip()
                for line in path.read_bytes()[offset:].decode(errors="replace").splitlines()
                if line.strip()
            ]
    for line in lines:
        if _NGINX_PREFIX.match(line):
            return _NGINX_PREFIX.sub("", line)
    for line in lines:
        if "dnsmasq:" in line or "failed" in line.lower():
            return line
    return lines[-1] if lines else "no output"


class Services:
    def __init__(self, config: BuiltinConfig, layout: Layout) -> None:
        self.config = config
        self.layout = layout

    def _argv(self, service: Service) -> list[str]:
        paths = self.layout
        if service is Service.DNSMASQ:
            argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={paths.conf_file(service)}"]
        else:
            argv = ["nginx", "-p", str(paths.nginx_temp), "-c", str(paths.conf_file(service)),
                    "-e", str(paths.nginx_error_log)]  # fmt: skip
        return netns_argv(self.config.netns, argv)

    def running_pid(self, service: Service) -> int | None:
        """The pid of our running service, or None (a stale pid file is removed)."""
        path = self.layout.pid_file(service)
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        conf = str(self.layout.conf_file(service))
        if pid_alive(pid) and any(conf in arg for arg in _cmdline(pid)):
            return pid
        path.unlink(missing_ok=True)
        return None

    def _signal(self, service: Service, sig: signal.Signals) -> None:
        pid = self.running_pid(service)
        if pid is not None:
            os.kill(pid, sig)

    def _conf_hash(self, service: Service) -> str:
        return hashlib.sha256(self.layout.conf_file(service).read_bytes()).hexdigest()

    def reload(self, written: Written) -> None:
        """Tell running services about a new render (nothing starts)."""
        if written.hosts_changed:
            self._signal(Service.DNSMASQ, signal.SIGHUP)  # dnsmasq re-reads its hosts file
        if written.nginx_changed and self.running_pid(Service.NGINX) is not None:
            self._signal(Service.NGINX, signal.SIGHUP)  # graceful reload: downloads in flight go on
            self.layout.conf_hash_file(Service.NGINX).write_text(self._conf_hash(Service.NGINX))

    def check_prerequisites(self) -> None:
        for binary in ("dnsmasq", "nginx"):
            if shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
                raise BootError(
                    f"{binary}: command not found", hint="install the Debian packages dnsmasq and nginx-light"
                )
        if self.config.netns and not netns_exists(self.config.netns):
            raise BootError(
                f"provision_boot_netns: network namespace {self.config.netns} does not exist",
                hint="create it first (provision lab)",
            )

    def start(self) -> None:
        """Start what is not running, restart what runs an older config (configs already rendered)."""
        started: list[Service] = []
        try:
            for service in (Service.NGINX, Service.DNSMASQ):
                pid = self.running_pid(service)
                digest = self._conf_hash(service)
                stamp = self.layout.conf_hash_file(service)
                if pid is not None:
                    if stamp.exists() and stamp.read_text() == digest:
                        continue
                    if service is Service.NGINX:
                        os.kill(pid, signal.SIGHUP)  # nginx reloads its config without dropping downloads
                        stamp.write_text(digest)
                        continue
                    self._stop_one(service)
                self._start_one(service)
                started.append(service)
                stamp.write_text(digest)
        except BaseException:
            for service in started:  # no half-started server: stop what this call started
                self._stop_one(service)
            raise

    def _start_one(self, service: Service) -> None:
        paths = self.layout
        own_pid = paths.own_pid_file(service)
        own_pid.unlink(missing_ok=True)
        logs = [paths.log_dir / f"{service}.out"]
        if service is Service.NGINX:
            logs.append(paths.nginx_error_log)
        offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
        proc = spawn(self._argv(service), log_path=logs[0])
        paths.pid_file(service).write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                paths.pid_file(service).unlink(missing_ok=True)
                reason = _first_error(logs, offsets)
                raise BootError(f"{service} did not start: {reason}", hint=self._start_hint(service))
            if own_pid.exists() and own_pid.stat().st_size > 0:
                return
            time.sleep(0.05)
        self._stop_one(service)
        raise BootError(f"{service} did not become ready within {_START_TIMEOUT:.0f} s", hint=f"see {logs[-1]}")

    def _start_hint(self, service: Service) -> str:
        if service is Service.DNSMASQ:
            return f"is another DHCP server running on this network or port 67 in use? see {self.layout.dnsmasq_log}"
        return (
            f"is port {self.config.http_port} on {self.config.server_address} in use, or the address not on this node?"
        )

    def _stop_one(self, service: Service) -> bool:
        pid = self.running_pid(service)
        if pid is None:
            self.layout.pid_file(service).unlink(missing_ok=True)
            return False
        # The service leads its own session (spawn): its process group holds nginx's workers too.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        while pid_alive(pid) and time.monotonic() < deadline + 2:
            time.sleep(0.05)
        self.layout.pid_file(service).unlink(missing_ok=True)
        self.layout.conf_hash_file(service).unlink(missing_ok=True)
        return True

    def stop(self) -> list[str]:
        """Stop dnsmasq and nginx; returns what was running. Safe to run twice."""
        return [str(s) for s in (Service.DNSMASQ, Service.NGINX) if self._stop_one(s)]

    def status(self) -> list[ServiceStatus]:
        cfg, paths = self.config, self.layout
        out = []
        for service in (Service.DNSMASQ, Service.NGINX):
            pid = self.running_pid(service)
            if service is Service.DNSMASQ:
                detail = (
                    f"{cfg.dhcp_mode} DHCP on {cfg.interface or cfg.server_address} + TFTP; log {paths.dnsmasq_log}"
                )
            else:
                detail = f"HTTP {cfg.base_url}/; log {paths.http_access_log}"
            out.append(ServiceStatus(service, pid is not None, pid, detail))
        return out

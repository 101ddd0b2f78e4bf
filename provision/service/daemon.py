"""The join service as a background process beside the built-in boot server.

``provision boot serve`` and ``provision node boot`` start it (inside
``provision_boot_netns`` when set) unless the site runs it from its own
systemd unit (``provision_join_service_managed: false``). It is restarted
when what it loaded changes (nodes, addresses, console logs, its address).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from provision.files import write_atomic
from provision.inventory import Site
from provision.probe import tcp_answers
from provision.proc import netns_argv, pid_alive, spawn
from provision.service.errors import JoinServiceError
from provision.service.settings import JoinSettings


class JoinDaemon:
    def __init__(self, site: Site, *, netns: str | None = None, vault_password_file: str | None = None) -> None:
        self.site = site
        self.settings = JoinSettings.from_site(site)
        self.netns = netns
        self.vault_password_file = vault_password_file
        self.pid_file = self.settings.state_dir / "join.pid"
        self.log_file = self.settings.state_dir / "join.log"

    def _fingerprint(self) -> str:
        """What the running service loaded: a change means a restart."""
        nodes = sorted((n.name, n.ip, n.console_log or "") for n in self.site.nodes)
        data = json.dumps([nodes, self.settings.address, self.settings.port, str(self.site.path)])
        return hashlib.sha256(data.encode()).hexdigest()

    def _record(self) -> dict[str, object]:
        try:
            data = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def running_pid(self) -> int | None:
        pid = self._record().get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if b"service" in cmdline and b"run" in cmdline else None

    def ensure(self, timeout: float = 20.0) -> int:
        """Start the service, or restart it when its inputs changed; its pid once it answers."""
        pid = self.running_pid()
        if pid is not None and self._record().get("fingerprint") == self._fingerprint():
            return pid
        if pid is not None:
            self.stop()
        return self._start(timeout)

    def _start(self, timeout: float) -> int:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.settings.state_dir, 0o700)
        argv = [sys.executable, "-m", "provision", "-i", str(self.site.path)]
        if self.vault_password_file:
            argv += ["--vault-password-file", str(Path(self.vault_password_file).resolve())]
        argv += ["service", "run", "--json"]
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        proc = spawn(netns_argv(self.netns, argv), log_path=self.log_file)
        write_atomic(self.pid_file, json.dumps({"pid": proc.pid, "fingerprint": self._fingerprint()}), mode=0o600)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if tcp_answers(self.settings.address, self.settings.port, netns=self.netns, timeout=0.5):
                return proc.pid
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.pid_file.unlink(missing_ok=True)
        tail = self._log_tail(offset)
        raise JoinServiceError(
            f"the join service did not start on {self.settings.url}" + (f": {tail}" if tail else ""),
            hint=f"see {self.log_file}; check provision_join_address/provision_join_port",
        )

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(offset)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the service; False when it was not running. Safe twice."""
        pid = self.running_pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True

"""The lab's ``--bmc redfish`` kind: sushy-tools' sushy-emulator in front of the QEMU machines.

One ``sushy-emulator`` (PyPI sushy-tools; it shares no code with provision's
Redfish client) serves the whole rack on 127.0.0.1 over HTTPS: its fake
systems driver holds one system per machine, named after the node
(``/redfish/v1/Systems/r1n01``). Its certificate is signed by a CA made here
with ``openssl`` (the CA's key is deleted once it has signed); clients trust
``ca.pem`` (``provision_bmc_ca_file``). HTTP basic auth checks an htpasswd
file (bcrypt, the only digest it takes; 0600); the emulator has no
SessionService, so the inventory says ``provision_bmc_redfish_auth: basic``.
The password is in no argv and no config: only its bcrypt digest is on disk.

The fake driver changes nothing but its own records. Its systems have
``external_notifier`` set, so on every change it ``PUT``s the system's JSON
(``power_state``, ``pending_power``, ``boot_device``...) to
``EXTERNAL_NOTIFICATION_URL``: the **receiver** (``python -m
provision.lab.redfishsim receive STATE``, its own session, 127.0.0.1 on a port
it picks, a random token in the URL path) turns each notification into the
machine's power with ``provision.lab.chassis``, the code ipmi_sim's chassis
control uses: the power the system is in or heads to (a pending change
counts at once: the emulator applies it 1 to 11 s later, on a read) On
starts QEMU, Off kills it, a pending ``*Restart`` restarts it once. The boot
device the system holds (``Pxe``, ``Hdd``) picks ``-boot n`` or ``-boot c``
at the next start; sushy-emulator keeps every override as Continuous.

Everything lives in the rack's BMC state directory (0700): the emulator's
config and state, ``ca.pem``, ``bmc.pem``/``bmc.key``, ``htpasswd``,
``receiver.json`` (the token; 0600) and each machine's chassis files.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError
from provision.files import write_atomic
from provision.lab import chassis
from provision.lab.vbmc import free_ports

log = logging.getLogger(__name__)

EMULATOR_HINT = "install sushy-tools (PyPI; in provision's test extras: pip install 'provision[test]')"
RECEIVER_CONFIG = "receiver.json"
# The emulator's boot targets QEMU can follow; anything else boots the machine's default (network).
BOOT_TARGETS = {"Pxe": "network", "Hdd": "disk"}


class RedfishSimError(ProvisionError):
    """The lab's Redfish BMC (sushy-emulator and its notification receiver) could not start."""


def find_emulator() -> str | None:
    """``sushy-emulator`` beside this Python (a virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name("sushy-emulator")
    return str(beside) if beside.exists() else shutil.which("sushy-emulator")


def free_tcp_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    return free_ports(count, address, socket.SOCK_STREAM)


# -- PKI and credentials ----------------------------------------------------------


def _openssl(*args: str) -> None:
    try:
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise RedfishSimError("openssl: command not found", hint="apt-get install openssl") from exc
    if result.returncode != 0:
        raise RedfishSimError(f"openssl {args[0]} failed: {result.stderr.strip()[-300:]}", hint="see openssl's message")


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the BMC's certificate (CN and SAN 127.0.0.1)
    key: Path  # its key (0600)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the BMC certificate (DER), lower-case hex (``provision_bmc_tls_fingerprint``)."""
        import ssl

        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert.read_text())).hexdigest()


def make_pki(base: Path, *, days: int = 30) -> Pki:
    """A CA and a certificate for 127.0.0.1 it signs, in ``base``; the CA's key is deleted once it has signed."""
    base.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (base / n for n in ("ca.key", "ca.pem", "bmc.key", "bmc.csr", "bmc.pem"))
    ext = base / "bmc.ext"
    try:
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(ca_key), "-out", str(ca), "-days", str(days), "-subj", "/CN=provision lab BMC CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        )  # fmt: skip
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1",
        )  # fmt: skip
        ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", str(days), "-extfile", str(ext),
        )  # fmt: skip
    finally:
        for leftover in (ca_key, csr, ext, base / "ca.srl"):
            leftover.unlink(missing_ok=True)
    key.chmod(0o600)
    return Pki(ca, cert, key)


def write_htpasswd(path: Path, user: str, password: str) -> None:
    """An htpasswd file (bcrypt, the only digest sushy-emulator takes), 0600.

    The emulator checks the digest on every request: the cheapest cost keeps it fast, and the lab's
    passwords are random (90 bits and more).
    """
    try:
        import bcrypt
    except ImportError as exc:
        raise RedfishSimError("bcrypt is not installed", hint=EMULATOR_HINT) from exc
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    write_atomic(path, f"{user}:{digest}\n", mode=0o600)


# -- the emulator ---------------------------------------------------------------------


def fake_system(
    name: str, mac: str, ip: str, *, uuid: str, power: str = "Off", boot: str | None = None, notify: bool = False
) -> dict[str, Any]:
    """One system of the fake driver (``SUSHY_EMULATOR_FAKE_SYSTEMS``)."""
    system: dict[str, Any] = {"uuid": uuid, "name": name, "power_state": power, "nics": [{"mac": mac, "ip": ip}]}
    if boot:
        system["boot_device"] = boot
    if notify:
        system["external_notifier"] = True
    return system


def write_emulator_config(
    path: Path,
    *,
    systems: list[dict[str, Any]],
    auth_file: Path,
    state_dir: Path,
    notification_url: str | None = None,
) -> None:
    """The emulator's config file (Python, read by Flask's ``from_pyfile``), 0600."""
    lines = [
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
        f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}",
        f"SUSHY_EMULATOR_STATE_DIR = {str(state_dir)!r}",
    ]
    if notification_url:
        lines.append(f"EXTERNAL_NOTIFICATION_URL = {notification_url!r}")
    write_atomic(path, "\n".join(lines) + "\n", mode=0o600)


def emulator_argv(emulator: str, config: Path, port: int, pki: Pki) -> list[str]:
    """``sushy-emulator`` with the fake driver, HTTPS on 127.0.0.1:``port`` (no secret in it)."""
    return [
        emulator, "--config", str(config), "--fake", "-i", "127.0.0.1", "-p", str(port),
        "--ssl-certificate", str(pki.cert), "--ssl-key", str(pki.key),
    ]  # fmt: skip


def wait_answering(url: str, ca: Path, process: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """Whether ``url`` (the emulator's service root; no auth needed) answers over verified TLS in time."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            requests.get(url, verify=str(ca), timeout=1)
            return True
        except requests.RequestException:
            time.sleep(0.2)
    return False


# -- the notification receiver ----------------------------------------------------------


def plan(system: dict[str, Any]) -> str:
    """What the machine should do for a notified system: ``on``, ``off`` or ``restart``.

    The state it heads to counts (a pending change is applied by the emulator
    only when read after its apply time); during a restart the emulator
    records ``power_state: Off`` and a pending ``*Restart``.
    """
    pending = system.get("pending_power") or {}
    target = str(pending.get("power_state") or system.get("power_state") or "Off")
    if "Restart" in target:
        return "restart"
    return "on" if target == "On" else "off"


def apply(state: Path, system: dict[str, Any]) -> list[str]:
    """Make the machine of ``system`` follow it; what was done (also appended to its chassis history)."""
    from provision.lab.vm import BootFrom

    name = str(system["name"])
    data = chassis.load(state, name)
    done: list[str] = []
    device = str(system.get("boot_device") or "none")
    if device != data.get("boot"):
        data["boot"] = device
        done.append(f"boot {device}")
    boot = BootFrom(BOOT_TARGETS[device]) if device in BOOT_TARGETS else None
    action = plan(system)
    if action == "restart":
        pending = system.get("pending_power") or {}
        key = f"{pending.get('power_state')}@{pending.get('apply_time')}"
        if data.get("restart") != key:  # later notifications repeat the same pending restart
            data["restart"] = key
            chassis.power_off(data)
            chassis.power_on(state, name, data, boot)
            done.append("restart")
    elif action == "on":
        if chassis.power_on(state, name, data, boot):
            done.append("on")
    elif chassis.power_off(data):
        done.append("off")
    data["history"] = [*data.get("history", []), *done]
    chassis.save(state, name, data)
    return done


def _handler(state: Path, token: str, nodes: frozenset[str]) -> type[http.server.BaseHTTPRequestHandler]:
    class Notification(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            if self.path.rstrip("/") != f"/{token}":
                self._answer(403, "not the lab's notification path")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                system = json.loads(self.rfile.read(length))
                name = system["name"]
            except (ValueError, KeyError, TypeError):
                self._answer(400, "expected a system as JSON")
                return
            if name not in nodes:
                self._answer(404, f"no lab machine {name!r}")
                return
            try:
                done = apply(state, system)
            except Exception as exc:
                log.exception("%s: notification not applied", name)
                self._answer(500, f"{name}: {exc}")
                return
            if done:
                log.info("%s: %s", name, ", ".join(done))
            self._answer(200, ", ".join(done) or "nothing to do")

        def _answer(self, code: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the path holds the token: not logged
            pass

    return Notification


def receive(state: Path) -> int:
    """The receiver's process: bind 127.0.0.1 on a free port, print ``ready PORT``, serve until killed.

    Notifications are applied one at a time (one thread), in the order they come.
    """
    logging.basicConfig(level=logging.INFO, format="redfish receiver: %(message)s")
    try:
        config = json.loads((state / RECEIVER_CONFIG).read_text())
        handler = _handler(state, str(config["token"]), frozenset(config["nodes"]))
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"ready {server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()
    return 0


# -- the lab's Redfish BMC, both processes ----------------------------------------------


@dataclass(frozen=True)
class LabNode:
    name: str
    mac: str
    ip: str
    machine: dict[str, Any]  # its MachineSpec as JSON (vbmc.machine_spec_to_json)


@dataclass(frozen=True)
class Started:
    port: int  # the emulator's HTTPS port
    emulator_pid: int
    receiver_pid: int
    pki: Pki


def start(
    state: Path, nodes: list[LabNode], *, user: str, password: str, log_path: Path, on_pid: Any = None
) -> Started:
    """The receiver, then the emulator, for ``nodes``; ``on_pid(pid)`` records each process as it starts.

    On failure the caller removes what ``on_pid`` recorded.
    """
    from provision.lab.vbmc import ready_line
    from provision.proc import spawn

    emulator = find_emulator()
    if emulator is None:
        raise RedfishSimError("--bmc redfish: sushy-emulator is not installed", hint=EMULATOR_HINT)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    record = on_pid or (lambda pid: None)
    for node in nodes:
        chassis.write_spec(state, node.name, node.machine)
    token = secrets.token_urlsafe(24)
    write_atomic(
        state / RECEIVER_CONFIG, json.dumps({"token": token, "nodes": [n.name for n in nodes]}) + "\n", mode=0o600
    )
    if not log_path.exists():
        write_atomic(log_path, "", mode=0o600)  # the emulator logs the notification URL (the token)
    argv = [sys.executable, "-m", "provision.lab.redfishsim", "receive", str(state)]
    from provision.catalog import IMPORT_ROOT

    receiver = spawn(argv, log_path=log_path, env={"PYTHONPATH": str(IMPORT_ROOT)}, pipe=True)
    record(receiver.pid)
    assert receiver.stdin is not None and receiver.stdout is not None
    receiver.stdin.close()
    line = ready_line(receiver, time.monotonic() + 20)
    receiver.stdout.close()
    if not line.startswith("ready "):
        raise RedfishSimError(
            f"the Redfish notification receiver did not start: {line or 'no answer within 20 s'}",
            hint=f"see {log_path}",
        )
    receiver_port = int(line.split()[1])

    pki = make_pki(state)
    write_htpasswd(state / "htpasswd", user, password)
    systems = [
        fake_system(
            n.name, n.mac, n.ip, uuid=_system_uuid(n.name), power="Off", boot="Pxe", notify=True
        )  # the lab's machines boot from the network until told otherwise
        for n in nodes
    ]
    config = state / "emulator.conf"
    write_emulator_config(
        config,
        systems=systems,
        auth_file=state / "htpasswd",
        state_dir=state / "emulator-state",
        notification_url=f"http://127.0.0.1:{receiver_port}/{token}",
    )
    (port,) = free_tcp_ports(1)
    process = spawn(emulator_argv(emulator, config, port, pki), log_path=log_path)
    record(process.pid)
    if not wait_answering(f"https://127.0.0.1:{port}/redfish/v1/", pki.ca, process):
        raise RedfishSimError(f"sushy-emulator did not answer on 127.0.0.1:{port}", hint=f"see {log_path}")
    return Started(port=port, emulator_pid=process.pid, receiver_pid=receiver.pid, pki=pki)


def _system_uuid(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"provision-lab:{name}"))


def is_ours(argv: list[str]) -> bool:
    """Whether a process's argv is one of this module's processes (the emulator or the receiver)."""
    head = argv[:3]
    return any(Path(a).name == "sushy-emulator" for a in head) or "provision.lab.redfishsim" in head


__all__ = [
    "Pki",
    "RedfishSimError",
    "apply",
    "emulator_argv",
    "fake_system",
    "find_emulator",
    "free_tcp_ports",
    "is_ours",
    "make_pki",
    "plan",
    "start",
    "write_emulator_config",
    "write_htpasswd",
]

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "receive":
        sys.exit(receive(Path(sys.argv[2])))
    print("usage: python -m provision.lab.redfishsim receive STATE", file=sys.stderr)
    sys.exit(2)

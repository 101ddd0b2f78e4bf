"""The virtual rack: a namespace, QEMU machines behind virtual BMCs, a control node.

``Rack(state_dir).up(RackConfig(nodes=3, rack="r1"))`` builds, in order:

1. a network namespace with a bridge holding the provisioning server's
   address (``10.99.0.1/24`` and ``fd99::1/64``, inside the namespace only)
   and one tap per machine (``provision.lab.netns.Netns``);
2. per machine a small blank raw disk and a ``MachineSpec`` (virtio NIC on
   its tap, whose iPXE ROM network-boots; serial console logged to a file;
   KVM when a probe shows it usable, TCG otherwise). Machines are *not*
   started: they are off until their BMC is told to power on;
3. the BMCs, on 127.0.0.1, one port per machine, of the kind ``--bmc`` names
   (``BmcKind``): ``pyghmi`` (default), one process of virtual BMCs
   (``python -m provision.lab.vbmc --serve-stdin``, its own session so it
   outlives the command); the machine specs travel with the BMC specs on
   stdin, so that process owns the QEMU machines (power on starts QEMU
   inside the namespace, off kills it, reset resets it, the boot device is
   honoured). ``openipmi``: one OpenIPMI ``ipmi_sim`` per machine whose
   chassis-control program (``provision.lab.ipmisim``) does the same by pid.
   The generated inventory's ``provision_bmc_protocol`` follows the kind;
4. the control node (``ControlPlane``: munged, slapd, configless slurmctld)
   in the same namespace;
5. a generated inventory (``inventory/hosts.yml`` + ``group_vars/all.yml``)
   the normal commands use unchanged. The BMC password is random, stored
   vault-encrypted in ``group_vars/all.yml`` (``provision_bmc_password``);
   the vault password is ``secrets/vault-password`` (0600). Neither is ever
   printed: commands get ``--vault-password-file`` (or
   ``ANSIBLE_VAULT_PASSWORD_FILE``) pointing at the file.

The boot backend (dnsmasq + iPXE + nginx in the namespace) is started by the
CLI on that inventory with the same code as ``provision boot serve``.

Everything created is recorded in ``rack.json`` as it is created;
``down()`` removes it (boot services, control node, BMC process, QEMU
processes by pid, anything else left in the namespace, taps, bridge,
namespace, files) and is safe to run twice. The image store
(``<state>/site/images``) is kept when it holds anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import netaddr
import yaml

from provision.errors import ProvisionError
from provision.files import write_atomic
from provision.lab import ipmisim, redfishsim
from provision.lab.control import ControlPlane, ControlPlaneConfig, LabNode
from provision.lab.netns import Netns
from provision.lab.vbmc import VbmcSpec, free_udp_ports, machine_spec_to_json, read_state, ready_line, serve_process
from provision.lab.vm import Accel, BootFrom, MachineSpec, Nic, detect_accel
from provision.names import IMAGE_RULE, is_exact_image_name
from provision.proc import netns_exists, pid_alive, run

DEFAULT_STATE_DIR = Path(".state/lab")
BMC_USER = "admin"
DEFAULT_IMAGE = "compute-debian12"
_RACK = re.compile(r"^[a-z0-9]{1,8}$")
_NS = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_CREATED = {
    "rack.json",
    "netns.json",
    "inventory",
    "secrets",
    "machines",
    "vbmc",
    "vbmc.log",
    "control",
    "site",
}


class RackError(ProvisionError):
    """The virtual rack could not be built, inspected or removed."""


class BmcKind(StrEnum):
    """Which BMC implementation fronts the lab's machines (``provision lab up --bmc``)."""

    PYGHMI = "pyghmi"  # provision.lab.vbmc: pyghmi's server classes, one process for all
    OPENIPMI = "openipmi"  # OpenIPMI's ipmi_sim, one per machine (provision.lab.ipmisim)
    REDFISH = "redfish"  # sushy-tools' sushy-emulator for the rack + its notification receiver (redfishsim)

    @property
    def protocol(self) -> str:
        return "redfish" if self is BmcKind.REDFISH else "ipmi"

    @property
    def chassis_by_pid(self) -> bool:
        """Whether the machines' power is kept by ``provision.lab.chassis`` (not by provision's BMC process)."""
        return self is not BmcKind.PYGHMI


@dataclass(frozen=True)
class RackConfig:
    nodes: int = 3
    rack: str = "r1"
    network: str = "10.99.0.0/24"
    netns: str = "provision-lab"
    bridge: str = "labbr0"
    memory_mib: int = 1536
    disk_mib: int = 1024
    image: str = DEFAULT_IMAGE
    image_store: str | None = None  # provision_image_store (default: STATE/site/images)
    bmc: BmcKind = BmcKind.PYGHMI

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise RackError(f"--nodes: {self.nodes} is out of range", hint="use 1 to 64 machines")
        if not _RACK.match(self.rack):
            raise RackError(f"--rack: {self.rack!r} is not a rack name", hint="use 1-8 lower-case letters/digits")
        if not _NS.match(self.netns):
            raise RackError(f"--netns: {self.netns!r} is not a namespace name", hint="use [A-Za-z0-9_.-], 1-32")
        if not is_exact_image_name(self.image):
            raise RackError(f"--image: {self.image!r} is not an image name", hint=IMAGE_RULE)
        try:
            net = netaddr.IPNetwork(self.network)
        except (netaddr.AddrFormatError, ValueError) as exc:
            raise RackError(f"network: {self.network!r} is not a CIDR", hint="e.g. 10.99.0.0/24") from exc
        if net.version != 4 or net.size < self.nodes + 16:
            raise RackError(f"network: {self.network} is too small or not IPv4", hint="e.g. 10.99.0.0/24")

    @property
    def server_address(self) -> str:
        return str(netaddr.IPNetwork(self.network).network + 1)

    @property
    def prefixlen(self) -> int:
        return int(netaddr.IPNetwork(self.network).prefixlen)

    def node_name(self, index: int) -> str:
        return f"{self.rack}n{index + 1:02d}"

    def node_ip(self, index: int) -> str:
        return str(netaddr.IPNetwork(self.network).network + 11 + index)

    def node_mac(self, index: int) -> str:
        return f"52:54:00:99:{(index + 1) // 256:02x}:{(index + 1) % 256:02x}"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kill(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is still alive after ``grace``; returns the pids signalled."""
    signalled = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in signalled):
        time.sleep(0.1)
    for pid in signalled:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in signalled:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return signalled


class Rack:
    """One virtual rack, recorded under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).resolve()

    # -- paths -------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.root / "rack.json"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory"

    @property
    def vault_password_file(self) -> Path:
        return self.root / "secrets" / "vault-password"

    @property
    def machines_dir(self) -> Path:
        return self.root / "machines"

    @property
    def vbmc_dir(self) -> Path:
        return self.root / "vbmc"

    @property
    def site_state(self) -> Path:
        """``provision_state_dir`` of the generated inventory (boot server state, image store)."""
        return self.root / "site"

    def _record(self) -> dict[str, Any]:
        if not self.record_path.exists():
            return {}
        data: dict[str, Any] = json.loads(self.record_path.read_text())
        return data

    def _save(self, data: dict[str, Any]) -> None:
        write_atomic(self.record_path, json.dumps(data, indent=2) + "\n")

    def _netns(self, name: str) -> Netns:
        return Netns(name, record=self.root / "netns.json")

    def control_plane(self, data: dict[str, Any] | None = None) -> ControlPlane | None:
        data = data if data is not None else self._record()
        if not data.get("nodes"):
            return None
        nodes = tuple(LabNode(n["name"], n["ip"]) for n in data["nodes"])
        config = ControlPlaneConfig(address=data["server_address"], nodes=nodes, netns=data["netns"])
        return ControlPlane(self.root / "control", config)

    # -- up ------------------------------------------------------------------
    def up(self, config: RackConfig) -> dict[str, Any]:
        """Build the rack (machines stay off); on failure remove what was built and raise."""
        if os.geteuid() != 0:
            raise RackError("provision lab up needs root", hint="network namespaces and taps need CAP_NET_ADMIN")
        if config.bmc is BmcKind.REDFISH and redfishsim.find_emulator() is None:
            raise RackError("--bmc redfish: sushy-emulator is not installed", hint=redfishsim.EMULATOR_HINT)
        if self._record():
            raise RackError(f"a virtual rack is already recorded in {self.root}", hint="run `provision lab down` first")
        if netns_exists(config.netns):
            raise RackError(
                f"network namespace {config.netns} already exists",
                hint="run `provision lab down`, or choose another --netns",
            )
        data: dict[str, Any] = {"config": asdict(config), "netns": config.netns, "created": time.time()}
        data["server_address"] = config.server_address
        self._save(data)
        try:
            self._up(config, data)
        except BaseException:
            self.down()
            raise
        return self.status()

    def _up(self, config: RackConfig, data: dict[str, Any]) -> None:
        ns = self._netns(config.netns)
        ns.create()
        ns.add_bridge(config.bridge, addresses=(f"{config.server_address}/{config.prefixlen}", "fd99::1/64"))
        accel = detect_accel()
        data["accel"] = str(accel)
        self.machines_dir.mkdir(parents=True, exist_ok=True)
        ports = free_udp_ports(config.nodes)
        nodes = []
        specs: list[MachineSpec] = []
        for i in range(config.nodes):
            name = config.node_name(i)
            tap = f"lt{config.rack}{i + 1:02d}"
            ns.add_tap(tap, bridge=config.bridge)
            disk = self.machines_dir / f"{name}.disk.raw"
            with open(disk, "wb") as fh:
                fh.truncate(config.disk_mib * 1024 * 1024)
            spec = MachineSpec(
                name=name,
                workdir=self.machines_dir,
                memory_mib=config.memory_mib,
                nics=(Nic(mac=config.node_mac(i), tap=tap),),
                boot=BootFrom.NETWORK,
                disk=disk,
                netns=config.netns,
                accel=Accel(accel),
            )
            specs.append(spec)
            nodes.append(
                {
                    "name": name,
                    "ip": config.node_ip(i),
                    "mac": config.node_mac(i),
                    "tap": tap,
                    "bmc_port": ports[i],
                    "disk": str(disk),
                    "console": str(spec.serial_log),
                }
            )
        data["nodes"] = nodes
        self._save(data)
        # 20 characters: the IPMI v2.0 limit; ipmi_sim keeps 16 (IPMI v1.5 user passwords).
        password = secrets.token_urlsafe(12 if config.bmc is BmcKind.OPENIPMI else 15)
        self._write_vault_password()
        self._write_ssh_key()
        if config.bmc is BmcKind.OPENIPMI:
            data["bmc_pids"] = self._start_ipmi_sims(specs, nodes, password)
        elif config.bmc is BmcKind.REDFISH:
            data["redfish"] = self._start_redfish(specs, nodes, password)
            data["bmc_pids"] = self._record().get("bmc_pids", [])
        else:
            data["vbmc_pid"] = self._start_vbmc(specs, nodes, password)
        self._save(data)
        control = self.control_plane(data)
        assert control is not None
        control.start()
        data["control"] = True
        self._save(data)
        self._write_inventory(config, nodes, password, control.join_vars())
        data["inventory"] = str(self.inventory)
        self._save(data)

    def _write_vault_password(self) -> None:
        secret_dir = self.vault_password_file.parent
        secret_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(secret_dir, 0o700)
        write_atomic(self.vault_password_file, secrets.token_urlsafe(32) + "\n", mode=0o600)

    @property
    def ssh_key(self) -> Path:
        """The admin side's SSH key for root on the booted machines (its .pub is served at boot)."""
        return self.root / "secrets" / "ssh" / "id_ed25519"

    def _write_ssh_key(self) -> None:
        self.ssh_key.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_key.parent, 0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provision-lab", "-f", str(self.ssh_key)])

    def _start_vbmc(self, specs: list[MachineSpec], nodes: list[dict[str, Any]], password: str) -> int:
        self.vbmc_dir.mkdir(parents=True, exist_ok=True)
        items = []
        for spec, node in zip(specs, nodes, strict=True):
            bmc = VbmcSpec(name=node["name"], port=node["bmc_port"], user=BMC_USER, password=password)
            items.append({**asdict(bmc), "suites": list(bmc.suites), "machine": machine_spec_to_json(spec)})
        proc = serve_process(items, self.vbmc_dir, self.root / "vbmc.log")
        self._save({**self._record(), "vbmc_pid": proc.pid})
        line = ready_line(proc, time.monotonic() + 30.0)
        assert proc.stdout is not None
        proc.stdout.close()
        if not line.startswith("ready"):
            raise RackError(
                f"virtual BMCs did not start: {line or 'no answer within 30 s'}",
                hint=f"see {self.root / 'vbmc.log'}",
            )
        return proc.pid

    def _start_ipmi_sims(self, specs: list[MachineSpec], nodes: list[dict[str, Any]], password: str) -> list[int]:
        self.vbmc_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.vbmc_dir, 0o700)  # lan.conf files hold the password
        pids: list[int] = []
        for spec, node in zip(specs, nodes, strict=True):
            proc = ipmisim.start(
                self.vbmc_dir,
                node["name"],
                port=node["bmc_port"],
                user=BMC_USER,
                password=password,
                machine=machine_spec_to_json(spec),
                log_path=self.root / "vbmc.log",
            )
            pids.append(proc.pid)
            self._save({**self._record(), "bmc_pids": pids})
        deadline = time.monotonic() + 15
        for node in nodes:
            while not _udp_answers(node["bmc_port"]):
                if time.monotonic() > deadline:
                    raise RackError(f"ipmi_sim for {node['name']} did not answer", hint=f"see {self.root / 'vbmc.log'}")
                time.sleep(0.1)
        return pids

    def _start_redfish(self, specs: list[MachineSpec], nodes: list[dict[str, Any]], password: str) -> dict[str, Any]:
        pids: list[int] = []

        def record(pid: int) -> None:
            pids.append(pid)
            self._save({**self._record(), "bmc_pids": pids})

        lab_nodes = [
            redfishsim.LabNode(n["name"], n["mac"], n["ip"], machine_spec_to_json(spec))
            for spec, n in zip(specs, nodes, strict=True)
        ]
        try:
            started = redfishsim.start(
                self.vbmc_dir,
                lab_nodes,
                user=BMC_USER,
                password=password,
                log_path=self.root / "vbmc.log",
                on_pid=record,
            )
        except redfishsim.RedfishSimError as exc:
            raise RackError(exc.message, hint=exc.hint) from exc
        for node in nodes:
            node["bmc_port"] = started.port
        return {
            "url": f"https://127.0.0.1:{started.port}",
            "port": started.port,
            "emulator_pid": started.emulator_pid,
            "receiver_pid": started.receiver_pid,
            "ca_file": str(started.pki.ca),
            "fingerprint": started.pki.fingerprint,
        }

    def _write_inventory(
        self, config: RackConfig, nodes: list[dict[str, Any]], password: str, join_vars: dict[str, Any]
    ) -> None:
        from ansible.parsing.vault import VaultLib, VaultSecret

        vault_password = self.vault_password_file.read_text().strip().encode()
        vault = VaultLib([("default", VaultSecret(vault_password))])
        ciphertext = vault.encrypt(password).decode()
        group = f"rack_{config.rack}"
        redfish = config.bmc is BmcKind.REDFISH
        hosts = {
            "all": {
                "children": {
                    "compute": {
                        "children": {
                            group: {
                                "hosts": {
                                    n["name"]: {
                                        "provision_mac": n["mac"],
                                        "provision_ip": n["ip"],
                                        "provision_bmc_address": "127.0.0.1",
                                        "provision_bmc_port": n["bmc_port"],
                                        **({"provision_bmc_system_id": n["name"]} if redfish else {}),
                                        "provision_console_log": n["console"],
                                        "ansible_host": n["ip"],
                                    }
                                    for n in nodes
                                }
                            }
                        }
                    }
                }
            }
        }
        # How the admin side reaches the machines: root with the lab's key, into the namespace.
        compute_vars = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.ssh_key),
            "ansible_ssh_common_args": f"-o ProxyCommand='ip netns exec {config.netns} socat STDIO TCP:%h:%p'",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_pipelining": True,
        }
        variables = {
            "provision_network": config.network,
            "provision_default_image": config.image,
            "provision_state_dir": str(self.site_state),
            "provision_bmc_user": BMC_USER,
            "provision_bmc_protocol": config.bmc.protocol,
            **(
                {"provision_bmc_redfish_auth": "basic", "provision_bmc_ca_file": str(self.vbmc_dir / "ca.pem")}
                if redfish
                else {}
            ),
            "provision_boot_netns": config.netns,
            "provision_boot_address": config.server_address,
            "provision_boot_interface": config.bridge,
            **({"provision_image_store": str(Path(config.image_store).resolve())} if config.image_store else {}),
            "provision_ssh_authorized_keys": [self.ssh_key.with_suffix(".pub").read_text().strip()],
            **join_vars,
        }
        group_vars = self.inventory / "group_vars"
        group_vars.mkdir(parents=True, exist_ok=True)
        header = "# Generated by `provision lab up`; removed by `provision lab down`.\n"
        (self.inventory / "hosts.yml").write_text(header + yaml.safe_dump(hosts, sort_keys=False))
        (group_vars / "compute.yml").write_text(header + yaml.safe_dump(compute_vars, sort_keys=False))
        vaulted = "provision_bmc_password: !vault |\n" + "".join(f"  {line}\n" for line in ciphertext.splitlines())
        (group_vars / "all.yml").write_text(
            header
            + "# provision_bmc_password is vault-encrypted: pass --vault-password-file "
            + f"{self.vault_password_file}\n"
            + yaml.safe_dump(variables, sort_keys=False)
            + vaulted
        )

    # -- status ----------------------------------------------------------------
    def qemu_pids(self) -> list[int]:
        """QEMU processes of this rack's machines (found by their console log path under the state dir)."""
        marker = f"file:{self.machines_dir}/"
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                argv = _cmdline(int(entry.name))
                if argv and Path(argv[0]).name.startswith("qemu-system") and any(marker in a for a in argv):
                    pids.append(int(entry.name))
        return pids

    def status(self) -> dict[str, Any]:
        """JSON-safe facts (no secret): nodes with BMC port and power, services, paths."""
        data = self._record()
        if not data:
            return {"up": False, "state_dir": str(self.root)}
        qemu = {}
        for pid in self.qemu_pids():
            argv = _cmdline(pid)
            if "-name" in argv:
                qemu[argv[argv.index("-name") + 1]] = pid
        nodes = []
        kind = BmcKind(data.get("config", {}).get("bmc", BmcKind.PYGHMI))
        for node in data.get("nodes", []):
            try:
                if kind.chassis_by_pid:
                    power = "on" if qemu.get(node["name"]) else "off"
                else:
                    power = read_state(self.vbmc_dir, node["name"])["power"]
            except (OSError, ValueError, KeyError):
                power = "unknown"
            nodes.append({**node, "power": power, "qemu_pid": qemu.get(node["name"])})
        vbmc_pid = data.get("vbmc_pid")
        control = self.control_plane(data)
        return {
            "up": True,
            "state_dir": str(self.root),
            "rack": data["config"]["rack"],
            "netns": data["netns"],
            "netns_exists": netns_exists(data["netns"]),
            "server_address": data["server_address"],
            "accel": data.get("accel"),
            "inventory": data.get("inventory"),
            "vault_password_file": str(self.vault_password_file),
            "bmc": str(kind),
            "vbmc_pid": vbmc_pid if vbmc_pid and pid_alive(vbmc_pid) else None,
            "bmc_pids": [p for p in data.get("bmc_pids", []) if pid_alive(p)],
            **({"redfish": _redfish_status(data["redfish"])} if data.get("redfish") else {}),
            "control": control.status() if control and data.get("control") else {},
            "nodes": nodes,
        }

    # -- down --------------------------------------------------------------------
    def down(self, stop_boot: Callable[[], list[str]] | None = None) -> list[str]:
        """Remove everything recorded; returns what was removed. Safe twice.

        ``stop_boot`` stops the boot services (the CLI passes the built-in
        backend's ``stop``); its failure does not stop the rest.
        """
        data = self._record()
        removed: list[str] = []
        # A service that cannot be stopped cleanly is still killed below: it runs in the namespace.
        if stop_boot is not None:
            try:
                removed += [f"boot:{s}" for s in stop_boot()]
            except ProvisionError as exc:
                removed.append(f"boot:not stopped cleanly ({exc.message})")
        control = self.control_plane(data) if data else None
        if control is not None:
            try:
                removed += [f"control:{pid}" for pid in control.stop()]
            except ProvisionError as exc:
                removed.append(f"control:not stopped cleanly ({exc.message})")
        vbmc_pid = data.get("vbmc_pid")
        if vbmc_pid and pid_alive(vbmc_pid) and "provision.lab.vbmc" in _cmdline(vbmc_pid):
            removed += [f"vbmc:{pid}" for pid in _kill([vbmc_pid])]
        bmcs = [p for p in data.get("bmc_pids", []) if pid_alive(p) and _is_bmc_process(_cmdline(p))]
        removed += [f"bmc:{pid}" for pid in _kill(bmcs)]
        removed += [f"qemu:{pid}" for pid in _kill(self.qemu_pids(), grace=2.0)]
        netns_name = data.get("netns")
        if netns_name:
            ns = self._netns(netns_name)
            leftovers = ns.pids()
            removed += [f"process:{pid}" for pid in _kill(leftovers)]
            removed += ns.teardown()
        removed += self._remove_files()
        return removed

    def _remove_files(self) -> list[str]:
        if not self.root.exists():
            return []
        images = self.site_state / "images"
        keep = images.exists() and any(images.iterdir())
        removed: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name not in _CREATED:
                continue  # not ours: a --state-dir that held other files keeps them
            if entry == self.site_state and keep:
                for sub in entry.iterdir():
                    if sub != images:
                        _remove(sub)
                removed.append(f"files:{entry} (kept the image store {images})")
                continue
            _remove(entry)
            removed.append(f"files:{entry}")
        if removed and not any(self.root.iterdir()):
            self.root.rmdir()
        return removed


def _is_bmc_process(argv: list[str]) -> bool:
    """An ipmi_sim, or the Redfish kind's emulator or receiver: the processes ``bmc_pids`` records."""
    return bool(argv) and (Path(argv[0]).name == "ipmi_sim" or redfishsim.is_ours(argv))


def _redfish_status(info: dict[str, Any]) -> dict[str, Any]:
    return {
        **info,
        "emulator_pid": info["emulator_pid"] if pid_alive(info["emulator_pid"]) else None,
        "receiver_pid": info["receiver_pid"] if pid_alive(info["receiver_pid"]) else None,
    }


def _udp_answers(port: int) -> bool:
    """Whether an IPMI LAN endpoint on 127.0.0.1:port answers Get Channel Authentication Capabilities."""
    import socket

    from provision.ipmi import wire

    request = wire.build_v15_packet(wire.channel_auth_capabilities_request(1, wire.PRIV_OPERATOR))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            return wire.session_less_message(sock.recv(4096)) is not None
        except (TimeoutError, ConnectionRefusedError):
            return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


__all__ = ["DEFAULT_STATE_DIR", "BmcKind", "Rack", "RackConfig", "RackError"]

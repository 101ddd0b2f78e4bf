"""The virtual rack for end-to-end tests: ``provision lab up`` through the real CLI, and what tests do on it.

``Lab`` wraps one rack (``down()`` always runs); ``shared_rack`` (conftest) is
the one 3-node rack the node-boot and rollout scenarios share in a run, booted
and joined once (``SharedRack.boot()``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import requires

needs_root = requires(os.geteuid() == 0, "namespaces, taps and QEMU need root; CI runs the suite as root")

PROVISION = str(Path(sys.executable).with_name("provision"))


def provision(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run(
        [PROVISION, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-4000:]}"
    return result


class Lab:
    """A virtual rack for one test; ``down()`` always runs."""

    def __init__(
        self,
        tmp_path: Path,
        nodes: int,
        store: Path,
        env: dict[str, str] | None = None,
        bmc: str = "pyghmi",
        image: str | None = None,
    ) -> None:
        self.state = tmp_path / "lab"
        self.env = env or {}
        self.netns = f"provtest-{uuid.uuid4().hex[:6]}"
        up = ["lab", "up", "--nodes", str(nodes), "--netns", self.netns, "--state-dir", str(self.state)]
        up += ["--bmc", bmc]  # provision lab up --bmc: pyghmi, openipmi
        up += ["--image", image] if image else []  # the nodes' image (default: compute-debian12)
        self.status = json.loads(ok(provision(*up, "--image-store", str(store), "--json", env=self.env)).stdout)
        self.inventory = Path(self.status["inventory"])
        self.vault = self.status["vault_password_file"]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return provision(
            "-i", str(self.inventory), "--vault-password-file", self.vault, *args, timeout=timeout, env=self.env
        )  # fmt: skip

    def control(self, tool: str, *args: str) -> str:
        binary = self.state / "control" / "bin" / tool
        return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, check=True).stdout

    def _ssh(self, node: dict[str, Any], known_hosts: Path | None, command: str) -> list[str]:
        """ssh argv: the pinned host key (known_hosts None), else a fresh file accepting the first key (test only)."""
        pinned = known_hosts is None
        hosts = self.state / "site" / "known_hosts" / node["name"] if pinned else known_hosts
        argv = [
            "ip", "netns", "exec", self.netns, "ssh", "-i", str(self.state / "secrets" / "ssh" / "id_ed25519"),
            "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={'yes' if pinned else 'accept-new'}",
            "-o", f"UserKnownHostsFile={hosts}",
        ]  # fmt: skip
        return [*argv, *(["-o", f"HostKeyAlias={node['name']}"] if pinned else []), f"root@{node['ip']}", command]

    def _run(self, node: dict[str, Any], argv: list[str], stdin: str | None) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin)
        assert result.returncode == 0, f"{node['name']}: {argv[-1]}: {result.stderr}"
        return result.stdout

    def ssh(self, node: dict[str, Any], command: str, stdin: str | None = None) -> str:
        """Run on a node with the pinned host key (StrictHostKeyChecking=yes)."""
        return self._run(node, self._ssh(node, None, command), stdin)

    def ssh_new(self, node: dict[str, Any], command: str, known_hosts: Path, stdin: str | None = None) -> str:
        """Run on a node after a reboot nobody pinned (a fresh known_hosts file: test only)."""
        return self._run(node, self._ssh(node, known_hosts, command), stdin)

    def copy(self, node: dict[str, Any], source: Path, dest: str) -> None:
        """Stream a file to the node over the pinned-key SSH connection."""
        with source.open("rb") as stdin:
            result = subprocess.run(
                self._ssh(node, None, f"cat > {dest}"), stdin=stdin, capture_output=True, timeout=120
            )
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    def join_status(self) -> dict[str, Any]:
        """The join service's view of each node (provision boot status --json)."""
        status: dict[str, Any] = json.loads(ok(self.cli("boot", "status", "--json")).stdout)["join"]["nodes"]
        return status

    def states(self) -> dict[str, str]:
        return dict(line.split() for line in self.control("sinfo", "-h", "-N", "-o", "%N %T").splitlines())

    def down(self) -> list[str]:
        result = ok(provision("lab", "down", "--state-dir", str(self.state), "--json", env=self.env))
        removed: list[str] = json.loads(result.stdout)["removed"]
        return removed


def wait(what: str, check: Callable[[], bool], timeout: float, every: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def rejoined(lab: Lab, name: str, old_boot: str | None) -> bool:
    record = lab.join_status().get(name) or {}
    report = record.get("last_report") or {}
    return (
        record.get("boot_id") not in (None, old_boot)
        and report.get("boot_id") == record.get("boot_id")
        and report.get("status") == "joined"
        and lab.states().get(name) == "idle"
    )


def timeline(report: dict[str, Any], accel: str) -> str:
    lines = [f"timeline ({accel}), seconds since power-on:"]
    for node in report["nodes"]:
        stages = " ".join(f"{k}={v}" for k, v in node["stages"].items())
        lines.append(f"  {node['node']}: {'ok' if node['ok'] else 'FAILED'} {stages}")
    return "\n".join(lines)


class SharedRack:
    """A rack the scenarios of a run (or a module) share; booted and joined by the first that needs it.

    The run's 3-node rack on compute-debian12 (conftest ``shared_rack``) and the GPU module's one node behind
    Redfish (tests/test_gpu_node.py) are both one.
    """

    def __init__(self, root: Path, store: Path, nodes: int = 3, bmc: str = "pyghmi", image: str | None = None) -> None:
        self.store = store
        self.lab = Lab(root, nodes, store, bmc=bmc, image=image)
        self.report: dict[str, Any] | None = None
        self.boot_result: subprocess.CompletedProcess[str] | None = None

    def boot(self) -> dict[str, Any]:
        """``node boot --rack r1 --join`` once (every node idle through its agent); its --json report."""
        if self.boot_result is None:
            self.boot_result = self.lab.cli(
                "node", "boot", "--rack", "r1", "--join", "--yes", "--json", "--timeout", "900", timeout=1800
            )  # fmt: skip
        assert self.boot_result.returncode == 0, self.boot_result.stderr[-5000:]
        if self.report is None:
            self.report = json.loads(self.boot_result.stdout)
        return self.report

    def down(self) -> None:
        """``lab down``: nothing of the rack is left (namespace, state, processes)."""
        lab = self.lab
        removed = lab.down()
        assert f"netns:{lab.netns}" in removed
        assert not Path(f"/run/netns/{lab.netns}").exists()
        assert not lab.state.exists()
        leftovers = subprocess.run(["pgrep", "-f", str(lab.state)], capture_output=True, text=True).stdout.split()
        assert leftovers == []

#!/usr/bin/env python3
"""Benchmark: `power status` over N virtual BMCs (real IPMI over UDP on loopback).

Not a test. Runs, in the same process and against the same virtual BMCs
(100 per process, in other processes):

* provision   provision.bmc.power_nodes(), the code behind
              `provision node power status` (provision.ipmi: every session
              in one event loop, cipher suite 17)
* ipmitool    `ipmitool -I lanplus ... chassis power status`, one node after
              the other (a shell loop); above --ipmitool-sample nodes, timed on
              a sample and extrapolated (said so in the output)
* ipmipower   FreeIPMI `ipmipower -D LAN_2_0 -h host:port,... --stat`, one run
              over all nodes (its own event loop; cipher suite 3)

and prints the times and the ratios. Usage:

    .venv/bin/python bench/bmc_fanout.py [--sizes 100,1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provision.bmc import PowerAction, fanout_options, power_nodes
from provision.inventory import Bmc, Node, Secret
from provision.lab.vbmc import VbmcFleet, free_udp_ports, make_specs

PASSWORD = "bench-pw-" + os.urandom(4).hex()
USER = "admin"


def base_port(count: int) -> int:
    """A run of ``count`` consecutive UDP ports that are free now."""
    import socket

    for _ in range(100):
        start = free_udp_ports(1)[0]
        if start + count >= 65535:
            continue
        probes = []
        try:
            for port in range(start, start + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(sock)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
    raise SystemExit(f"no {count} consecutive free UDP ports")


def time_provision(nodes: list[Node], processes: int | None, fanout: int) -> tuple[float, int]:
    settings: dict[str, object] = {"fanout": fanout, "retries": 0}
    if processes:
        settings["processes"] = processes
    started = time.perf_counter()
    outcomes = power_nodes(nodes, PowerAction.STATUS, fanout_options(len(nodes), **settings))
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for o in outcomes if not o.ok)


def time_ipmitool(ports: list[int]) -> tuple[float, int]:
    env = {"PATH": os.environ["PATH"], "IPMI_PASSWORD": PASSWORD}
    failed = 0
    started = time.perf_counter()
    for port in ports:
        argv = ["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port), "-U", USER, "-E"]
        result = subprocess.run([*argv, "chassis", "power", "status"], env=env, capture_output=True, text=True)
        failed += result.returncode != 0 or "Chassis Power is" not in result.stdout
    return time.perf_counter() - started, failed


def time_ipmipower(ports: list[int]) -> tuple[float, int]:
    # The password goes in a 0600 config file, not argv.
    with tempfile.NamedTemporaryFile("w", prefix="ipmipower-", suffix=".conf", delete=False) as conf:
        conf.write(f"username {USER}\npassword {PASSWORD}\n")
    try:
        os.chmod(conf.name, 0o600)
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        argv = ["ipmipower", "--config-file", conf.name, "-D", "LAN_2_0", "-h", hosts, "--stat"]
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        elapsed = time.perf_counter() - started
    finally:
        os.unlink(conf.name)
    answered = sum(1 for line in result.stdout.splitlines() if line.rstrip().endswith((": on", ": off")))
    return elapsed, len(ports) - answered


def run_size(count: int, args: argparse.Namespace, state_root: Path) -> dict[str, float]:
    start = base_port(count)
    specs = make_specs(count, base_port=start, user=USER, password=PASSWORD, prefix="b")
    ports = [s.port for s in specs]
    secret = Secret("bench", lambda: PASSWORD)
    nodes = [Node(s.name, "bench", "", "", None, Bmc("127.0.0.1", USER, secret, port=s.port)) for s in specs]
    row: dict[str, float] = {}
    with VbmcFleet(specs, state_root / f"n{count}", per_process=100):
        time_provision(nodes[: min(count, 20)], None, args.fanout)  # warm up imports
        prov, ipmip = [], []
        for _ in range(args.repeat):
            seconds, failed = time_provision(nodes, args.processes, args.fanout)
            prov.append(seconds)
            row["provision_failed"] = max(row.get("provision_failed", 0), failed)
            seconds, failed = time_ipmipower(ports)
            ipmip.append(seconds)
            row["ipmipower_failed"] = max(row.get("ipmipower_failed", 0), failed)
        sample = ports[: min(count, args.ipmitool_sample)]
        seconds, failed = time_ipmitool(sample)
        row["ipmitool_failed"] = failed
        row["ipmitool_sampled"] = len(sample)
        row["ipmitool"] = seconds * count / len(sample)
        row["provision"] = statistics.median(prov)
        row["provision_best"] = min(prov)
        row["ipmipower"] = statistics.median(ipmip)
        row["ipmipower_best"] = min(ipmip)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="BMC counts (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of provision and ipmipower per size (median)")
    parser.add_argument("--ipmitool-sample", type=int, default=100, help="nodes timed for the ipmitool loop")
    parser.add_argument("--processes", type=int, help="worker processes for provision (default: its own choice, 1)")
    parser.add_argument("--fanout", type=int, default=64)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bmc-bench-") as tmp:
        for count in sizes:
            print(f"running {count} BMCs ...", flush=True)
            rows[count] = run_size(count, args, Path(tmp))
    print()
    header = f"{'BMCs':>6} {'provision':>10} {'ipmipower':>10} {'ipmitool loop':>14}  {'vs ipmitool':>11} {'vs ipmipower':>12}"
    print(header)
    print("-" * len(header))
    for count, row in rows.items():
        loop = f"{row['ipmitool']:.2f}s" + ("*" if row["ipmitool_sampled"] < count else " ")
        print(
            f"{count:>6} {row['provision']:>9.2f}s {row['ipmipower']:>9.2f}s {loop:>14}  "
            f"{row['ipmitool'] / row['provision']:>10.1f}x {row['ipmipower'] / row['provision']:>11.2f}x"
        )
    print()
    print(
        "times: median of --repeat runs (best: "
        + ", ".join(
            f"{c}: provision {r['provision_best']:.2f}s, ipmipower {r['ipmipower_best']:.2f}s" for c, r in rows.items()
        )
        + ")"
    )
    print("ratios: the other tool's time / provision's time (higher is better for provision)")
    for count, row in rows.items():
        if row["ipmitool_sampled"] < count:
            print(f"* {count}: ipmitool loop extrapolated from {int(row['ipmitool_sampled'])} sequential calls")
        for tool in ("provision", "ipmipower", "ipmitool"):
            if row[f"{tool}_failed"]:
                print(f"! {count}: {tool}: {int(row[f'{tool}_failed'])} nodes without an answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HTTP serving benchmark: the built-in backend's nginx vs. ``python -m http.server``.

32 clients (curl) fetch the same squashfs-sized file (~200 MB, random bytes)
at once, inside a network namespace created for the run (server and clients
both in it, over its loopback-speed local path). Prints the aggregate
throughput of each server and the ratio, both measured in this run.

    sudo .venv/bin/python bench/http_serving.py [--size-mib 200] [--clients 32] [--rounds 3]
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

from provision.boot.builtin import BuiltinBackend
from provision.lab.netns import Netns
from provision.proc import netns_argv, run, spawn

SERVER = "10.99.0.1"
PY_PORT = 8000


def make_file(path: Path, size_mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(size_mib):
            fh.write(chunk)


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its children (nginx's workers; http.server's threads are in its own)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(proc.name), int(fields[1])
        if pid == root or ppid == root:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def fetch_all(ns: str, url: str, clients: int, expected: int) -> float:
    """Seconds for ``clients`` concurrent full downloads of ``url``; checks every size."""
    script = f'for i in $(seq {clients}); do curl -s -o /dev/null -w "%{{size_download}}\\n" {url} & done; wait'
    start = time.perf_counter()
    out = run(netns_argv(ns, ["sh", "-c", script]))
    elapsed = time.perf_counter() - start
    sizes = [int(s) for s in out.stdout.split()]
    if len(sizes) != clients or any(s != expected for s in sizes):
        raise SystemExit(f"incomplete downloads from {url}: {sizes}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates a network namespace")

    with tempfile.TemporaryDirectory(prefix="provision-bench-http-") as tmp_name:
        tmp = Path(tmp_name)
        vdir = tmp / "store" / "bench" / "v1"
        vdir.mkdir(parents=True)
        for small in ("vmlinuz", "initrd.img"):
            (vdir / small).write_bytes(b"x" * 1024)
        squashfs = vdir / "rootfs.squashfs"
        make_file(squashfs, args.size_mib)
        size = squashfs.stat().st_size

        ns_name = f"prov-bench{os.getpid()}"
        ns = Netns(ns_name, record=tmp / "netns.json")
        backend = BuiltinBackend.from_config(
            {
                "provision_state_dir": str(tmp / "state"),
                "provision_network": "10.99.0.0/24",
                "provision_boot_netns": ns_name,
                "provision_boot_interface": "br0",
                "provision_boot_router_advertisements": False,
            }
        )
        py_server: subprocess.Popen[bytes] | None = None
        try:
            ns.create()
            ns.add_bridge("br0", addresses=(f"{SERVER}/24",))
            backend.add_store_version(tmp / "store", "bench", "v1")
            backend.serve()
            py_argv = [sys.executable, "-m", "http.server", str(PY_PORT), "--bind", SERVER, "--directory", vdir]
            py_server = spawn(netns_argv(ns_name, py_argv), log_path=tmp / "http.server.log")
            nginx_url = f"http://{SERVER}/images/bench/v1/rootfs.squashfs"
            py_url = f"http://{SERVER}:{PY_PORT}/rootfs.squashfs"
            for _ in range(100):  # wait for http.server to listen
                probe = run(netns_argv(ns_name, ["curl", "-s", "-o", "/dev/null", "-r", "0-0", py_url]), check=False)
                if probe.returncode == 0:
                    break
                time.sleep(0.1)

            total_mib = args.clients * size / (1 << 20)
            nginx_pid = next(s.pid for s in backend.status() if s.service == "nginx" and s.pid)
            servers = {
                "nginx (built-in backend)": (nginx_url, nginx_pid),
                "python -m http.server": (py_url, py_server.pid),
            }
            results: dict[str, list[float]] = {name: [] for name in servers}
            cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
            load = os.getloadavg()[0]
            for _ in range(args.rounds):  # interleaved, so that load from elsewhere hits both alike
                for name, (url, pid) in servers.items():
                    before = tree_cpu_seconds(pid)
                    results[name].append(fetch_all(ns_name, url, args.clients, size))
                    cpu[name] += tree_cpu_seconds(pid) - before

            print(f"{args.clients} concurrent clients x {size / (1 << 20):.0f} MiB = {total_mib:.0f} MiB per round, "
                  f"{args.rounds} rounds, {os.cpu_count()} CPUs")  # fmt: skip
            print(f"  load average at start: {load:.1f} (other work on this machine skews wall times)")
            medians = {}
            gib = args.rounds * total_mib / 1024
            for name, times in results.items():
                medians[name] = statistics.median(times)
                rates = ", ".join(f"{total_mib / t:.0f}" for t in times)
                print(
                    f"  {name:26s} median {medians[name]:6.2f} s  {total_mib / medians[name]:6.0f} MiB/s "
                    f"(rounds: {rates})  server CPU {cpu[name] / gib:.2f} s/GiB"
                )
            base = medians["python -m http.server"]
            ours = medians["nginx (built-in backend)"]
            print(f"  throughput ratio nginx / http.server: {base / ours:.2f}x")
            nginx_cpu = cpu["nginx (built-in backend)"]
            ratio = cpu["python -m http.server"] / nginx_cpu if nginx_cpu else float("inf")
            print(f"  server CPU per byte, http.server / nginx: {ratio:.2f}x")
            codes = {}
            for name, (url, _) in servers.items():
                argv = netns_argv(ns_name, ["curl", "-s", "-o", "/dev/null", "-r", "0-99", "-w", "%{http_code}", url])
                codes[name] = run(argv, check=False).stdout
            print("  range request (bytes 0-99): " + ", ".join(f"{n}: HTTP {c}" for n, c in codes.items()))
        finally:
            if py_server is not None:
                py_server.kill()
                py_server.wait()
            backend.stop()
            ns.teardown()


if __name__ == "__main__":
    main()

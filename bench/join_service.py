"""Join service benchmark: N simulated nodes ask for their bundles at once.

Each node has an ed25519 host key (made with ``cryptography``), a console log
holding its boot marker and key, a rendered bundle (three small files) and a
loopback source address of its own (127.0.x.y). The service runs in a child
process on 127.0.0.1; the nodes (aiohttp client in --client-processes
processes, at most --concurrency requests in flight) each fetch a challenge, sign it (SSHSIG made here with
``cryptography``, the same bytes ``ssh-keygen -Y sign`` makes) and fetch their
bundle. Prints bundles/s, latency percentiles and the service's CPU time.
A sample of bundles is decrypted with age identities made from the node keys.

    .venv/bin/python bench/join_service.py [--nodes 1000] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import pyrage  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provision.inventory import Node
from provision.service import NAMESPACE, JoinService, join_message
from provision.service.settings import JoinSettings


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass
class SimNode:
    name: str
    ip: str
    boot_id: str
    key: Ed25519PrivateKey

    @property
    def blob(self) -> bytes:
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return _string(b"ssh-ed25519") + _string(raw)

    def sign(self, message: bytes) -> str:
        """An armored SSHSIG, as ``ssh-keygen -Y sign -n provision-join@v1`` writes it."""
        ns, algo = NAMESPACE.encode(), b"sha512"
        signed = b"SSHSIG" + _string(ns) + _string(b"") + _string(algo) + _string(hashlib.sha512(message).digest())
        sig = _string(b"ssh-ed25519") + _string(self.key.sign(signed))
        blob = b"SSHSIG" + struct.pack(">I", 1) + _string(self.blob) + _string(ns) + _string(b"") + _string(algo)
        text = base64.b64encode(blob + _string(sig)).decode()
        lines = [text[i : i + 70] for i in range(0, len(text), 70)]
        return "\n".join(["-----BEGIN SSH SIGNATURE-----", *lines, "-----END SSH SIGNATURE-----"]) + "\n"


def make_site(root: Path, count: int) -> tuple[list[SimNode], list[Node], JoinSettings]:
    sims, nodes = [], []
    settings = JoinSettings(address="127.0.0.1", port=0, state_dir=root / "state" / "service")
    for i in range(count):
        name = f"cn{i:04d}"
        sim = SimNode(name, f"127.0.{1 + i // 250}.{1 + i % 250}", str(uuid.uuid4()), Ed25519PrivateKey.generate())
        console = root / f"{name}.console.log"
        key_b64 = base64.b64encode(sim.blob).decode()
        console.write_text(
            f"[    4.1] provision: boot {sim.boot_id}\r\n[    4.2] provision: ssh-host-key ssh-ed25519 {key_b64}\r\n"
        )
        bundle = settings.bundles_dir / name
        for rel, size in (("etc/munge/munge.key", 1024), ("etc/sssd/sssd.conf", 600), ("etc/slurm/slurm.conf", 3000)):
            (bundle / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            (bundle / "files" / rel).write_bytes(os.urandom(size // 2).hex().encode())
        manifest = {
            "files": [
                {"path": "/etc/munge/munge.key", "owner": "munge", "group": "munge", "mode": "0400"},
                {"path": "/etc/sssd/sssd.conf", "owner": "root", "group": "root", "mode": "0600"},
                {"path": "/etc/slurm/slurm.conf", "owner": "root", "group": "root", "mode": "0644"},
            ],
            "services": ["munge", "sssd", "slurmd"],
        }
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        nodes.append(Node(name, "r1", f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}", sim.ip, None, None, (), str(console)))
        sims.append(sim)
    return sims, nodes, settings


def serve(nodes: list[Node], settings: JoinSettings, conn: Connection) -> None:
    """The service's process: start, say the port, serve until told to stop, say its CPU time."""

    async def main() -> None:
        service = JoinService(nodes, settings)
        _, port = await service.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        conn.send(port)
        await loop.run_in_executor(None, conn.recv)  # "go": CPU counted from here
        before = os.times()
        conn.send("ready")
        await loop.run_in_executor(None, conn.recv)  # "stop"
        after = os.times()
        conn.send((after.user - before.user) + (after.system - before.system))
        await service.stop()

    asyncio.run(main())


async def fetch(base: str, sim: SimNode, limit: asyncio.Semaphore) -> tuple[float, bytes]:
    async with limit:
        connector = aiohttp.TCPConnector(local_addr=(sim.ip, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.perf_counter()
            async with session.get(f"{base}/v1/challenge", params={"node": sim.name}) as r:
                nonce = (await r.json())["nonce"]
            body = {
                "node": sim.name,
                "boot_id": sim.boot_id,
                "nonce": nonce,
                "signature": sim.sign(join_message(sim.name, sim.boot_id, nonce)),
            }
            async with session.post(f"{base}/v1/bundle", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"{sim.name}: {r.status} {await r.text()}")
                data = await r.read()
            return time.perf_counter() - start, data


async def clients(base: str, sims: list[SimNode], concurrency: int) -> list[tuple[float, bytes]]:
    limit = asyncio.Semaphore(concurrency)
    return await asyncio.gather(*(fetch(base, sim, limit) for sim in sims))


def client_process(base: str, sims: list[SimNode], concurrency: int, conn: Connection) -> None:
    """One client process: wait for "go", fetch every bundle, send back times, bundles and its CPU time."""
    conn.recv()
    start, cpu0 = time.time(), os.times()
    results = asyncio.run(clients(base, sims, concurrency))
    end, cpu1 = time.time(), os.times()
    conn.send((start, end, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight, over all client processes")
    parser.add_argument(
        "--client-processes", type=int, default=2, help="the aiohttp client costs more CPU than the service"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="join-bench-") as tmp:
        sims, nodes, settings = make_site(Path(tmp), args.nodes)
        fork = mp.get_context("fork")
        here, there = mp.Pipe()
        child = fork.Process(target=serve, args=(nodes, settings, there))
        child.start()
        base = f"http://127.0.0.1:{here.recv()}"
        workers = []
        for k in range(args.client_processes):
            mine, theirs = mp.Pipe()
            share = sims[k :: args.client_processes]
            proc = fork.Process(
                target=client_process, args=(base, share, args.concurrency // args.client_processes, theirs)
            )
            proc.start()
            workers.append((proc, mine, share))
        here.send("go")
        here.recv()
        for _, conn, _ in workers:
            conn.send("go")
        outcomes = [conn.recv() for _, conn, _ in workers]
        here.send("stop")
        cpu = here.recv()
        child.join(30)
        for proc, _, _ in workers:
            proc.join(30)
        elapsed = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
        client_cpu = sum(o[2] for o in outcomes)
        sims = [sim for _, _, share in workers for sim in share]
        results = [r for o in outcomes for r in o[3]]
        latencies = sorted(r[0] for r in results)
        for sim, (_, data) in list(zip(sims, results, strict=True))[:20]:
            pem = sim.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
            assert pyrage.decrypt(data, [pyrage.ssh.Identity.from_buffer(pem)]).startswith(b"etc/munge/munge.key")

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        print(f"nodes {args.nodes}, concurrency {args.concurrency}, cpus {os.cpu_count()}")
        print(f"all bundles in {elapsed:.2f} s: {args.nodes / elapsed:.0f} bundles/s")
        print(
            f"latency (challenge + bundle) p50 {pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )
        print(
            f"service CPU time {cpu:.2f} s ({cpu / args.nodes * 1000:.2f} ms per bundle), mean {statistics.mean(latencies) * 1000:.0f} ms"
        )
        print(f"client CPU time {client_cpu:.2f} s in {args.client_processes} processes (same machine)")
        print(
            f"bundle size {statistics.mean(len(r[1]) for r in results):.0f} bytes (age-encrypted tar); 20 decrypted and checked"
        )


if __name__ == "__main__":
    main()

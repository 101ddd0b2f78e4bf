#!/usr/bin/env python3
"""Benchmark: Redfish `power status` over N emulated BMCs (sushy-emulator, HTTPS on loopback).

Not a test. Starts --emulators sushy-emulator processes (fake driver, TLS
with a CA made here, basic auth) holding N systems between them; each node
is one system (``provision_bmc_system_id``). Then, in the same run:

* provision   provision.bmc.power_nodes() (the code behind `provision node
              power status`): a thread pool, --fanout in flight, one sushy
              client per node (TLS handshake, service root, system)
* curl loop   `curl --cacert CA -K cfg https://.../Systems/ID` one node after
              the other (the password in a 0600 config file, not argv)

Usage: .venv/bin/python bench/redfish_fanout.py [--nodes 100] [--emulators 4] [--repeat 3]
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_redfish import PASSWORD, USER, make_pki, start_emulator

from provision.bmc import PowerAction, fanout_options, power_nodes
from provision.inventory import Bmc, BmcProtocol, BmcTls, Node, RedfishAuth, Secret


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--emulators", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fanout", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pki = make_pki(base)
        per = -(-args.nodes // args.emulators)
        emulators = []
        placement: list[tuple[int, str]] = []
        try:
            for e in range(args.emulators):
                names = [f"s{e:02d}x{i:03d}" for i in range(per) if e * per + i < args.nodes]
                emulators.append(start_emulator(base, f"emu{e}", pki, dict.fromkeys(names, "On")))
                placement += [(emulators[-1].port, n) for n in names]
            secret = Secret("bench", lambda: PASSWORD)
            tls = BmcTls(ca_file=str(pki.ca))
            nodes = [
                Node(
                    name,
                    "r1",
                    "",
                    "",
                    None,
                    Bmc("127.0.0.1", USER, secret, port, BmcProtocol.REDFISH, RedfishAuth.BASIC, tls, name),
                )
                for port, name in placement
            ]
            cfg = base / "curl.cfg"
            fd = os.open(cfg, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f'user = "{USER}:{PASSWORD}"\nsilent\nfail\noutput = /dev/null\n')

            def provision_run() -> float:
                t0 = time.monotonic()
                outcomes = power_nodes(nodes, PowerAction.STATUS, fanout_options(len(nodes), fanout=args.fanout))
                took = time.monotonic() - t0
                bad = [o for o in outcomes if not o.ok]
                assert not bad, bad[:3]
                return took

            def curl_run() -> float:
                t0 = time.monotonic()
                for port, name in placement:
                    url = f"https://127.0.0.1:{port}/redfish/v1/Systems/{name}"
                    subprocess.run(["curl", "--cacert", str(pki.ca), "-K", str(cfg), url], check=True)
                return time.monotonic() - t0

            prov = [provision_run() for _ in range(args.repeat)]
            curl = [curl_run() for _ in range(args.repeat)]
        finally:
            for emulator in emulators:
                emulator.process.terminate()
                emulator.process.wait()
    p, c = statistics.median(prov), statistics.median(curl)
    print(f"{args.nodes} Redfish BMCs ({args.emulators} sushy-emulator processes), median of {args.repeat}:")
    print(f"  provision (fanout {args.fanout}) {p:7.2f} s   runs {', '.join(f'{x:.2f}' for x in prov)}")
    print(f"  curl loop                  {c:7.2f} s   runs {', '.join(f'{x:.2f}' for x in curl)}")
    print(f"  provision vs curl loop: {c / p:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

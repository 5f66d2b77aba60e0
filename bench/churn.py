"""Connection churn against one real `meshnode start` process on 127.0.0.1.

A client process opens fresh libp2p hosts (a new key each), each of which connects to the peer, pings
it over a new stream and leaves. Measured side by side in one run:

- connect latency p50/p99 (Noise + yamux handshake), one at a time and in bursts of 50 at once
- inbound connections per second sustained (connect + ping; leaving overlaps with the next visits)
- the peer's trio task count, RSS and open descriptors before, and after every 1,000 connections

    .venv/bin/python bench/churn.py [--rounds 3] [--burst 50]

The client runs on the same 2 cores as the peer, so rates are a floor for the peer, not a ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mesh.app.localmesh import LocalMesh, PeerProcess, wait_for
from mesh.churn import run_process

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local-3.toml")


def runtime(peer: PeerProcess) -> dict:
    return wait_for(lambda: (r := peer.get("/api/runtime"))["connections"] == 0 and r, timeout=60,
                    what="visitor connections to close")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 1,000 connections (half in bursts)")
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalMesh(Path(tmp), CONFIG,
                                                           extra_args=("--benchmark-seconds", "0.05")) as mesh:
        peer = mesh.start_peer("target")
        addr = peer.addrs[0]
        run_process(addr, 50, 10)  # warm up: first-use allocations are not a leak
        time.sleep(1.5)
        rows = [("start", 0, runtime(peer), None, None)]
        total = 0
        for r in range(args.rounds):
            seq = run_process(addr, 500, 1)
            bur = run_process(addr, 500, args.burst)
            total += 1000
            time.sleep(1.5)
            failures = len(seq["failures"]) + len(bur["failures"])
            rows.append((f"round {r + 1}", total, runtime(peer), (seq, bur), failures))

    print(f"{'after':<9} {'conns':>6} {'fail':>5} {'tasks':>6} {'rss MiB':>8} {'fds':>4} "
          f"{'seq p50 ms':>10} {'seq p99 ms':>10} {'seq /s':>7} {'burst p50 ms':>12} {'burst p99 ms':>12} "
          f"{'burst /s':>8}")
    for name, conns, rt, runs, failures in rows:
        line = f"{name:<9} {conns:>6} {failures if failures is not None else '':>5} {rt['tasks']:>6} " \
               f"{rt['rss_bytes'] / 2**20:>8.1f} {rt['open_fds']:>4}"
        if runs:
            seq, bur = runs
            line += f" {pct(seq['connect_s'], 0.5):>10.1f} {pct(seq['connect_s'], 0.99):>10.1f} " \
                    f"{500 / seq['wall_s']:>7.1f} {pct(bur['connect_s'], 0.5):>12.1f} " \
                    f"{pct(bur['connect_s'], 0.99):>12.1f} {500 / bur['wall_s']:>8.1f}"
        print(line)
    all_seq = [x for *_, runs, _ in rows[1:] for x in runs[0]["connect_s"]]
    print(f"\nsequential connect over all rounds: p50 {statistics.median(all_seq) * 1000:.1f} ms, "
          f"p99 {pct(all_seq, 0.99):.1f} ms (libp2p 0.8.1 defaults: ~250 ms each)")


if __name__ == "__main__":
    main()

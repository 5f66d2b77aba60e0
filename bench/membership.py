"""Membership and election at scale: N in-process peers (the real PeerCore, real signed CBOR, real
ed25519 verification; the network simulated with 20-40 ms latency and virtual time).

Prints, for N = 10, 50, 100: time for all peers to converge (every peer lists every peer as ready and
all follow one coordinator) after joining in random order within one second, and time to agree on a
new coordinator after the old one dies; in heartbeat rounds and seconds of mesh time, plus the wall
time the simulation took on this machine (the cost of the real signing and verification).

    .venv/bin/python bench/membership.py [--sizes 10 50 100] [--seed 1]
"""

from __future__ import annotations

import argparse
import time

from mesh.sim import SimMesh


def measure(n: int, seed: int) -> dict[str, float]:
    mesh = SimMesh(n, seed=seed)
    interval = mesh.config.heartbeat_interval
    wall0 = time.perf_counter()
    order = list(range(n))
    mesh.rng.shuffle(order)
    for i in order:  # everyone joins within ~1 s, in random order
        mesh.start(i)
        mesh.run_for(1.0 / n)
    join_done = mesh.now
    took = mesh.run_until(lambda m: m.converged(), timeout=60)
    if took is None:
        raise SystemExit(f"N={n}: no convergence within 60 s of mesh time")
    converge = mesh.now  # from the first start
    (coordinator,) = mesh.coordinators()
    mesh.kill(next(p.index for p in mesh.peers if p.node_id == coordinator))
    reelect = mesh.run_until(lambda m: m.converged(), timeout=60)
    if reelect is None:
        raise SystemExit(f"N={n}: no new coordinator within 60 s of mesh time")
    wall = time.perf_counter() - wall0
    return {
        "n": n,
        "join_s": join_done,
        "converge_s": converge,
        "converge_rounds": converge / interval,
        "reelect_s": reelect,
        "reelect_rounds": reelect / interval,
        "messages": mesh.delivered,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [measure(n, args.seed) for n in args.sizes]
    print("membership convergence and re-election (heartbeat 1 s, offline after 2.6 s, registering 2 s)")
    print(f"{'peers':>5}  {'converge s':>10}  {'rounds':>6}  {'re-elect s':>10}  {'rounds':>6}  "
          f"{'msgs verified':>13}  {'wall s':>6}  {'verify/s':>8}")
    for r in rows:
        print(f"{r['n']:>5}  {r['converge_s']:>10.2f}  {r['converge_rounds']:>6.1f}  {r['reelect_s']:>10.2f}  "
              f"{r['reelect_rounds']:>6.1f}  {r['messages']:>13}  {r['wall_s']:>6.1f}  "
              f"{r['messages'] / r['wall_s']:>8.0f}")
    print("re-election includes failure detection (offline_after); converge counts from the first start and "
          "includes the 2 s registering period.")


if __name__ == "__main__":
    main()

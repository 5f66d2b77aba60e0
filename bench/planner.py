"""The layer planner: plan time, and bottleneck against the greedy compute-proportional split (the seeds')
and memory-proportional splitting (as exo does), on random heterogeneous meshes; then the coordinator's
search (``coordinator.search``): the exact method's time by mesh size, the heuristic's gap to it and its time.

    .venv/bin/python bench/planner.py [--meshes 50] [--seed 1]

Peers mix laptops, desktops and GPU boxes (1–50 GFLOP/s measured, 1–16 GiB offered, 0–10 ms links, 5–50
GB/s memory bandwidth in the search table); layers are Llama-like (uneven FLOPs, 50–150 MiB each). Times
are the median of 5 plans. "4 orders" is ``coordinator.control.best_split``: the bisection plan over 4
pipeline orders (as given, fastest first, most memory first, holders first), what a reassignment patches
along; its gain is the bottleneck of the given order over the searched one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from coordinator import search
from coordinator.control import best_split
from coordinator.planner import Layer, Peer, PlanInfeasible, greedy_by_compute, plan_split, split_by_memory


def mesh(rng: random.Random, peers: int, layers: int) -> tuple[list[Layer], list[Peer]]:
    ls = [Layer(i, rng.uniform(1, 3) * 1e9, rng.randint(50, 150) * 2**20) for i in range(layers)]
    ps = [Peer(f"p{i}", rng.choice([1, 2, 5, 10, 20, 50]) * 1e9, rng.choice([1, 2, 4, 8, 16]) * 2**30,
               rng.choice([0.0, 0.001, 0.005, 0.01])) for i in range(peers)]
    return ls, ps


def with_speed(rng: random.Random, ps: list[Peer]) -> list[Peer]:
    """The peers with a memory bandwidth (5-50 GB/s) and links as given."""
    return [Peer(q.node_id, q.flops, q.memory_bytes, q.link_s, bandwidth=rng.choice([5, 10, 20, 50]) * 1e9)
            for q in ps]


def search_table(rng: random.Random, meshes: int) -> None:
    """``coordinator.search``: exact time by size, the heuristic's gap to the exact plan and its time."""
    print("\n| peers | layers | objective | exact ms (median) | heuristic ms (median) "
          "| heuristic / exact (mean, max) |")
    print("| ---: | ---: | --- | ---: | ---: | --- |")
    for peers, layers in ((4, 32), (6, 32), (8, 32), (9, 16), (10, 16), (11, 8), (12, 8)):
        for objective in search.OBJECTIVES:
            exact_t, heur_t, gaps = [], [], []
            for _ in range(max(1, meshes // 10)):
                ls, ps = mesh(rng, peers, layers)
                ps = with_speed(rng, ps)
                try:
                    start = time.perf_counter()
                    ex = search.search(ls, ps, objective=objective, exact_peers=peers)[0]
                    exact_t.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    he = search.search(ls, ps, objective=objective, exact_peers=0)[0]
                    heur_t.append(time.perf_counter() - start)
                except PlanInfeasible:
                    continue
                gaps.append(search.cost(he, objective) / search.cost(ex, objective))
            if gaps:
                print(f"| {peers} | {layers} | {objective} | {statistics.median(exact_t) * 1000:.0f} "
                      f"| {statistics.median(heur_t) * 1000:.1f} | {statistics.mean(gaps):.3f}, {max(gaps):.3f} |")
    for peers in (100, 1000):
        for objective in search.OBJECTIVES:
            ls, ps = mesh(rng, peers, 128)
            ps = with_speed(rng, ps)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                search.search(ls, ps, objective=objective)
                times.append(time.perf_counter() - start)
            print(f"| {peers} | 128 | {objective} | - | {statistics.median(times) * 1000:.1f} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", type=int, default=50, help="random meshes per size for the ratios")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("| peers | layers | plan ms (median) | 4 orders ms | order search gain (mean, max) "
          "| stages | greedy / optimal bottleneck (mean, max) | memory-prop. / optimal (mean, max) "
          "| infeasible for baselines |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |")
    for peers in (10, 100, 1000):
        for layers in (32, 128):
            times, coord_times, gain, stages, greedy, memory, failed = [], [], [], [], [], [], 0
            for k in range(args.meshes):
                ls, ps = mesh(rng, peers, layers)
                if k < 5:
                    start = time.perf_counter()
                    best = plan_split(ls, ps)
                    times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    searched = best_split(ls, ps)
                    coord_times.append(time.perf_counter() - start)
                    gain.append(best.bottleneck_s / searched.bottleneck_s)
                else:
                    best = plan_split(ls, ps)
                stages.append(len(best.stages))
                for baseline, out in ((greedy_by_compute, greedy), (split_by_memory, memory)):
                    try:
                        out.append(baseline(ls, ps).bottleneck_s / best.bottleneck_s)
                    except PlanInfeasible:
                        failed += 1

            def fmt(xs: list[float]) -> str:
                return f"{statistics.mean(xs):.2f}, {max(xs):.2f}" if xs else "-"

            print(f"| {peers} | {layers} | {statistics.median(times) * 1000:.1f} "
                  f"| {statistics.median(coord_times) * 1000:.1f} | {fmt(gain)} | {statistics.median(stages):.0f} "
                  f"| {fmt(greedy)} | {fmt(memory)} | {failed} |")
    search_table(rng, args.meshes)


if __name__ == "__main__":
    main()

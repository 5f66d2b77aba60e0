"""Which pipeline a driver sends a new session to (``least_loaded``), deterministically: from what each stage's
peer gossips (its sessions and decode step) and the sessions the driver itself runs on each pipeline."""

from __future__ import annotations

import random

from inference.driver import least_loaded
from inference.protocol import Route
from mesh.ids import NodeId, Span


def routes(k: int, stages: int = 2) -> list[Route]:
    return [Route("m", "r", (1, 1), tuple(Span(NodeId(f"p{i}-{j}"), j, j + 1) for j in range(stages)), "float32")
            for i in range(k)]


def test_a_pipeline_busy_with_another_drivers_sessions_is_avoided() -> None:
    r = routes(2)
    # The first pipeline's stages serve 3 sessions (some other driver's, gossiped); this driver runs none.
    assert least_loaded(r, [[(3, 20.0), (3, 20.0)], [(0, 20.0), (0, 20.0)]], [0, 0]) is r[1]
    # Idle and equal: the plan's order.
    assert least_loaded(r, [[(0, 20.0), (0, 20.0)], [(0, 20.0), (0, 20.0)]], [0, 0]) is r[0]


def test_this_drivers_own_sessions_count_before_any_heartbeat_says_so() -> None:
    r = routes(2)
    assert least_loaded(r, [[(0, 20.0), (0, 20.0)], [(0, 20.0), (0, 20.0)]], [1, 0]) is r[1]
    # Gossip and this driver's count are the same sessions seen twice: the larger counts, never the sum.
    assert least_loaded(r, [[(2, 20.0), (2, 20.0)], [(3, 20.0), (3, 20.0)]], [2, 0]) is r[0]


def test_a_slow_pipeline_gets_fewer_sessions_than_a_fast_one() -> None:
    """Sessions placed one at a time, each where it waits least, split in inverse proportion to step time."""
    r = routes(2)
    steps = [10.0, 30.0]
    on = [0, 0]
    for _ in range(40):
        chosen = least_loaded(r, [[(on[i], steps[i])] * 2 for i in range(2)], on)
        on[r.index(chosen)] += 1
    assert on == [30, 10]


def test_an_unmeasured_stage_counts_as_the_mean_measured_one() -> None:
    r = routes(2)
    # The second pipeline has not stepped yet: its stages count as 20 ms, so its 1 session beats the first's 2.
    assert least_loaded(r, [[(2, 20.0), (2, 20.0)], [(1, None), (1, None)]], [0, 0]) is r[1]
    # Nothing measured anywhere: sessions alone decide.
    assert least_loaded(r, [[(2, None)] * 2, [(1, None)] * 2], [0, 0]) is r[1]


def test_the_choice_minimises_the_wait_over_many_random_meshes() -> None:
    rng = random.Random(7)
    for _ in range(500):
        k, n = rng.randint(2, 5), rng.randint(1, 4)
        r = routes(k, n)
        loads = [[(rng.randint(0, 6), rng.choice([None, rng.uniform(1, 50)])) for _ in range(n)] for _ in range(k)]
        mine = [rng.randint(0, 6) for _ in range(k)]
        known = [ms for route in loads for _, ms in route if ms]
        default = sum(known) / len(known) if known else 1.0
        waits = [sum((max(c, mine[i]) + 1) * (ms or default) for c, ms in loads[i]) for i in range(k)]
        chosen = r.index(least_loaded(r, loads, mine))
        assert waits[chosen] == min(waits) and chosen == waits.index(min(waits))

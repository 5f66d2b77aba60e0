"""The layer planner: contiguous layer ranges over peers in pipeline order that minimise the slowest stage.

Pure: numbers in, a plan out. A stage's time per token is ``sum(flops of its layers) / peer flops`` plus
the peer's hop to the next stage (``link_s``); a peer may hold at most ``memory_bytes`` of layers
(weights and KV cache, as the caller counts them in ``Layer.bytes``).

Exactness. Peers are given in pipeline order (the order of the list: ``link_s`` is the hop to the next
one). Over that order the planner is exact: it finds the minimum possible bottleneck over every choice
of which peers to use (any subsequence; slow peers are left out when they would not help) and of their
ranges. For a fixed bottleneck T, filling each peer in order with as many layers as fit under T and its
memory is optimal (a peer's reach only grows when it starts later), so feasibility is a greedy walk
with prefix sums and bisection; T* is found by bisection on T and then snapped to the exact stage time
of the plan it yields. Among plans with the bottleneck T*, the one with the most layers already held by
their peer (less transfer), then the fewest stages, is chosen by a dynamic program when that is cheap,
otherwise the greedy plan (fewest stages) is returned.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh.errors import PeerError

#: Above this many (peer × layer × range length) steps the tie-breaking dynamic program is skipped.
TIE_BREAK_BUDGET = 300_000


class PlanInfeasible(PeerError):
    """The model does not fit the mesh: the message names the shortfall."""

    code = "PLAN_INFEASIBLE"
    http_status = 409


@dataclass(frozen=True, slots=True)
class Layer:
    index: int
    flops_per_token: float
    bytes: int


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    flops: float  # measured FLOP/s
    memory_bytes: int  # free memory it offers for layers
    link_s: float = 0.0  # hop to the next stage, seconds per token
    holds: frozenset[int] = frozenset()  # layer indices it already has on disk


@dataclass(frozen=True, slots=True)
class Stage:
    node_id: str
    start: int  # position in the layer list, half-open [start, end)
    end: int
    flops: float
    bytes: int
    time_s: float  # compute + hop, per token


@dataclass(frozen=True, slots=True)
class Split:
    stages: tuple[Stage, ...]
    bottleneck_s: float

    @property
    def latency_s(self) -> float:
        return sum(s.time_s for s in self.stages)


@dataclass
class _Prefix:
    flops: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, layers: Sequence[Layer]) -> _Prefix:
        return cls([0.0, *itertools.accumulate(layer.flops_per_token for layer in layers)],
                   [0, *itertools.accumulate(layer.bytes for layer in layers)])


def stage_time(layers_flops: float, peer: Peer) -> float:
    return layers_flops / peer.flops + peer.link_s


def _reach(p: _Prefix, start: int, peer: Peer, limit: float) -> int:
    """The furthest ``end`` such that layers [start, end) fit on ``peer`` in time ``limit`` and memory."""
    if peer.flops <= 0 or peer.link_s > limit:
        return start
    by_time = bisect.bisect_right(p.flops, p.flops[start] + (limit - peer.link_s) * peer.flops * (1 + 1e-12)) - 1
    by_memory = bisect.bisect_right(p.bytes, p.bytes[start] + peer.memory_bytes) - 1
    return max(start, min(by_time, by_memory))


def _greedy(p: _Prefix, n: int, peers: Sequence[Peer], limit: float) -> list[tuple[int, int, int]] | None:
    """(peer index, start, end) filling peers in order up to ``limit``; None if the layers do not fit."""
    pos, out = 0, []
    for i, peer in enumerate(peers):
        if pos == n:
            break
        end = _reach(p, pos, peer, limit)
        if end > pos:
            out.append((i, pos, end))
            pos = end
    return out if pos == n else None


def _stages(layers: Sequence[Layer], p: _Prefix, peers: Sequence[Peer],
            parts: Iterable[tuple[int, int, int]]) -> Split:
    stages = tuple(
        Stage(peers[i].node_id, s, e, p.flops[e] - p.flops[s], p.bytes[e] - p.bytes[s],
              stage_time(p.flops[e] - p.flops[s], peers[i]))
        for i, s, e in parts)
    return Split(stages, max(s.time_s for s in stages))


def check_fits(layers: Sequence[Layer], peers: Sequence[Peer]) -> None:
    """PlanInfeasible naming the shortfall when no plan can exist (memory, or a layer no peer can hold)."""
    if not layers:
        raise PlanInfeasible("the model has no layers")
    usable = [q for q in peers if q.flops > 0 and q.memory_bytes > 0]
    if not usable:
        raise PlanInfeasible(f"no peer can take layers ({len(peers)} offered, none with compute and memory)")
    need, have = sum(x.bytes for x in layers), sum(q.memory_bytes for q in usable)
    if need > have:
        raise PlanInfeasible(f"the model needs {need / 2**20:.1f} MiB, the peers offer {have / 2**20:.1f} MiB: "
                             f"{(need - have) / 2**20:.1f} MiB short")
    biggest = max(layers, key=lambda x: x.bytes)
    if biggest.bytes > max(q.memory_bytes for q in usable):
        raise PlanInfeasible(f"layer {biggest.index} needs {biggest.bytes / 2**20:.1f} MiB; the largest peer "
                             f"offers {max(q.memory_bytes for q in usable) / 2**20:.1f} MiB")


def plan_split(layers: Sequence[Layer], peers: Sequence[Peer]) -> Split:
    """The split of minimum bottleneck over ``peers`` in this pipeline order (see the module docstring)."""
    check_fits(layers, peers)
    n, p = len(layers), _Prefix.of(layers)
    # Bounds: one peer doing everything is an upper bound when it fits; otherwise grow until feasible.
    hi = max(stage_time(p.flops[n], q) for q in peers if q.flops > 0)
    while _greedy(p, n, peers, hi) is None:
        hi *= 2
        if hi > 1e18:
            raise PlanInfeasible("the layers do not fit on these peers in pipeline order (memory per peer)")
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if _greedy(p, n, peers, mid) is None:
            lo = mid
        else:
            hi = mid
    parts = _greedy(p, n, peers, hi)
    assert parts is not None
    best = _stages(layers, p, peers, parts)
    # Snap: the greedy plan at its own exact bottleneck (a real stage time, not a bisection bound).
    parts = _greedy(p, n, peers, best.bottleneck_s)
    if parts is not None:
        best = _stages(layers, p, peers, parts)
    if any(q.holds for q in peers):
        tied = _prefer_held(layers, p, peers, best.bottleneck_s)
        if tied is not None:
            best = tied
    return best


def _prefer_held(layers: Sequence[Layer], p: _Prefix, peers: Sequence[Peer], limit: float) -> Split | None:
    """Among splits with bottleneck ≤ ``limit``: most layers already held by their peer, then fewest
    stages. A dynamic program over (peers so far, layers covered); None when it would cost too much."""
    n = len(layers)
    reaches = [[_reach(p, s, q, limit) for s in range(n + 1)] for q in peers]
    if sum(r - s for row in reaches for s, r in enumerate(row)) > TIE_BREAK_BUDGET:
        return None
    index = {layer.index: i for i, layer in enumerate(layers)}
    held_prefix = []
    for q in peers:
        marks = [0] * n
        for idx in q.holds:
            if idx in index:
                marks[index[idx]] = 1
        held_prefix.append([0, *itertools.accumulate(marks)])
    # best[pos] = (held, -stages, parts) reachable after the peers considered so far
    best: list[tuple[int, int, tuple[tuple[int, int, int], ...]] | None] = [None] * (n + 1)
    best[0] = (0, 0, ())
    for i in range(len(peers)):
        nxt = list(best)
        for s in range(n):
            cur = best[s]
            if cur is None:
                continue
            for e in range(s + 1, reaches[i][s] + 1):
                cand = (cur[0] + held_prefix[i][e] - held_prefix[i][s], cur[1] - 1, (*cur[2], (i, s, e)))
                old = nxt[e]
                if old is None or cand[:2] > old[:2]:
                    nxt[e] = cand
        best = nxt
    final = best[n]
    return _stages(layers, p, peers, final[2]) if final is not None else None


# ---- baselines (what other systems do) -----------------------------------------------------------


def _proportional(layers: Sequence[Layer], peers: Sequence[Peer], weight: Sequence[float]) -> Split:
    """Layers handed out in order, each peer's share proportional to ``weight``, clamped to its memory
    (the excess carried to the next peer); PlanInfeasible if layers are left over."""
    check_fits(layers, peers)
    n, p = len(layers), _Prefix.of(layers)
    total = sum(weight)
    parts, pos, carry = [], 0, 0.0
    for i, (q, w) in enumerate(zip(peers, weight, strict=True)):
        if pos == n:
            break
        want = n * w / total + carry
        take = n - pos if i == len(peers) - 1 else min(n - pos, round(want))
        take = min(take, _reach(p, pos, q, float("inf")) - pos)
        carry = want - take
        if take > 0:
            parts.append((i, pos, pos + take))
            pos += take
    if pos < n:
        raise PlanInfeasible(f"the proportional split leaves {n - pos} layers without memory")
    return _stages(layers, p, peers, parts)


def greedy_by_compute(layers: Sequence[Layer], peers: Sequence[Peer]) -> Split:
    """The seeds' greedy split: layers in proportion to each peer's FLOP/s, in the given order."""
    return _proportional(layers, peers, [q.flops for q in peers])


def split_by_memory(layers: Sequence[Layer], peers: Sequence[Peer]) -> Split:
    """Memory-weighted splitting (exo's default): layers in proportion to each peer's memory."""
    return _proportional(layers, peers, [float(q.memory_bytes) for q in peers])


def brute_force(layers: Sequence[Layer], peers: Sequence[Peer]) -> float:
    """The optimum by enumeration over every subsequence of peers and every composition of the layers
    (small cases only: the oracle of the property tests)."""
    n, p = len(layers), _Prefix.of(layers)
    best = float("inf")
    for k in range(1, min(n, len(peers)) + 1):
        for chosen in itertools.combinations(range(len(peers)), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                worst = 0.0
                for i, s, e in zip(chosen, bounds, bounds[1:], strict=False):
                    q = peers[i]
                    if p.bytes[e] - p.bytes[s] > q.memory_bytes or q.flops <= 0:
                        worst = float("inf")
                        break
                    worst = max(worst, stage_time(p.flops[e] - p.flops[s], q))
                best = min(best, worst)
    return best

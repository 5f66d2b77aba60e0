"""The best plan over any peers in any order, for one of two objectives. Pure: numbers in, a plan out.

A stage on peer q over layers [s, e) computes for ``max(flops / q.flops, read_bytes / q.bandwidth)
+ calls * q.overhead_s`` seconds per token (decode on CPUs is bound by memory bandwidth, plus a fixed
dispatch cost per layer that dominates small models: ``calls`` counts blocks, ``overhead_s`` is a tiny
block's measured decode step; a peer with no measured bandwidth is FLOP-bound), times ``q.scale``
(measured step time over the estimate, 1 until the peer serves), then hands its activations to the next
stage over the link between them; the last stage hands the token back to the first (the driver).
``Links`` gives a hop's time for a pair: the measured one, else the sender's ``link_s``.

- ``latency`` (the default) minimises one token's time: every stage's compute plus every hop, around the
  cycle. What one user's chat waits for.
- ``throughput`` minimises the slowest stage (its compute plus its hop out): what a full pipeline of
  concurrent sessions is bound by.

Exact up to ``EXACT_PEERS`` usable peers: a dynamic program over (first peer, set of peers used, last peer,
where the last one's range starts), one numpy min-plus (or min-max) product per transition, so it is equal
to a brute force over every subset, every order and every composition of the layers (``brute_force``, the
oracle of the property tests). Beyond that a heuristic: the same program over a fixed order of a pool of
the fastest peers (nearest-neighbour by links from the fastest, and fastest-first), and for
``throughput`` (or when nothing fits the pool) the bisection walk of ``planner.plan_split`` fastest-first
over the 64 fastest peers, else over all; the best of these wins. Ties go to fewer stages,
then to peers that already hold the layers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.planner import Layer, Peer, PlanInfeasible, Split, Stage, check_fits, plan_split
from mesh.errors import PeerError

OBJECTIVES = ("latency", "throughput")
#: Up to this many usable peers the plan is exact over every subset and order.
EXACT_PEERS = 8
#: The heuristic's pool: the fastest peers it orders and searches exactly along that order.
POOL = 12
#: ... grown up to this many while the pool offers less than 1.5x the model's memory.
MAX_POOL = 16
#: The bisection walk (throughput, or when the pool holds nothing) runs over this many fastest peers first.
WALK = 64
INF = math.inf
#: Plans within this relative cost of the best count as ties (sums in another order differ in the last bits).
TIE = 1e-9


@dataclass(frozen=True)
class Links:
    """One-way hop times in seconds: ``pairs[(a, b)]`` when measured (either direction), else the
    sender's ``link_s``; 0 from a peer to itself (a one-stage plan has no hop)."""

    pairs: Mapping[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def from_ms(cls, matrix: Mapping[str, Mapping[str, float]]) -> Links:
        return cls({(a, b): ms / 1000 for a, row in matrix.items() for b, ms in row.items()})

    def between(self, a: Peer, b: Peer) -> float:
        if a.node_id == b.node_id:
            return 0.0
        hop = self.pairs.get((a.node_id, b.node_id))
        if hop is None:
            hop = self.pairs.get((b.node_id, a.node_id))
        return a.link_s if hop is None else hop


def read_s(peer: Peer, read_bytes: float, reads: Mapping[str, float] | None = None) -> float:
    """Seconds to stream a stage's weights: each kernel's bytes over that kernel's measured speed on ``peer``
    (else its memory bandwidth); 0 when the peer measured neither (FLOP-bound)."""
    if not reads:
        return read_bytes / peer.bandwidth if peer.bandwidth > 0 else 0.0
    speed = dict(peer.kernels)
    t = 0.0
    for kernel, size in reads.items():
        bw = speed.get(kernel, peer.bandwidth)
        t += size / bw if bw > 0 else 0.0
    return t


def compute_s(peer: Peer, flops: float, read_bytes: float, calls: float = 0.0,
              reads: Mapping[str, float] | None = None) -> float:
    """Seconds per token of a stage doing ``flops``, reading ``read_bytes`` (``reads``: by kernel) and
    dispatching ``calls`` blocks' worth of kernels on ``peer``."""
    if peer.flops <= 0:
        return INF
    t = max(flops / peer.flops, read_s(peer, read_bytes, reads))
    return (t + calls * peer.overhead_s) * peer.scale


def reads_by_kernel(layers: Sequence[Layer]) -> dict[str, float] | None:
    """The layers' bytes by kernel, None when no layer says (then ``read`` at the memory bandwidth)."""
    if not any(x.reads for x in layers):
        return None
    out: dict[str, float] = {}
    for x in layers:
        for kernel, size in x.reads or (("", x.read),):
            out[kernel] = out.get(kernel, 0.0) + size
    return out


def cost(split: Split, objective: str) -> float:
    return split.latency_s if objective == "latency" else split.bottleneck_s


def build(layers: Sequence[Layer], order: Sequence[tuple[Peer, int, int]], links: Links) -> Split:
    """The Split of ``(peer, start, end)`` stages in pipeline order, costed with ``links``."""
    fl = [0.0, *itertools.accumulate(x.flops_per_token for x in layers)]
    by = [0, *itertools.accumulate(x.bytes for x in layers)]
    rd = [0, *itertools.accumulate(x.read for x in layers)]
    ca = [0.0, *itertools.accumulate(x.calls for x in layers)]
    stages = []
    for i, (q, s, e) in enumerate(order):
        nxt = order[(i + 1) % len(order)][0]
        c = compute_s(q, fl[e] - fl[s], rd[e] - rd[s], ca[e] - ca[s], reads_by_kernel(layers[s:e]))
        hop = links.between(q, nxt)
        stages.append(Stage(q.node_id, s, e, fl[e] - fl[s], by[e] - by[s], c + hop, c, hop))
    return Split(tuple(stages), max(s.time_s for s in stages))


def _costs(layers: Sequence[Layer], peers: Sequence[Peer]) -> np.ndarray:
    """[peer, s, e]: compute seconds of layers [s, e) on the peer; inf when empty or over its memory."""
    n = len(layers)
    fl = np.concatenate([[0.0], np.cumsum([x.flops_per_token for x in layers])])
    by = np.concatenate([[0.0], np.cumsum([float(x.bytes) for x in layers])])
    rd = np.concatenate([[0.0], np.cumsum([float(x.read) for x in layers])])
    ca = np.concatenate([[0.0], np.cumsum([x.calls for x in layers])])
    dfl, dby, drd, dca = (a[None, :] - a[:, None] for a in (fl, by, rd, ca))
    kinds = sorted({k for x in layers for k, _ in x.reads})
    by_kernel = {}  # kernel -> [s, e] bytes through it (a layer without ``reads`` counts under "")
    if kinds:
        for kernel in {*kinds, ""}:
            col = [float(sum(b for k, b in (x.reads or (("", x.read),)) if k == kernel)) for x in layers]
            pre = np.concatenate([[0.0], np.cumsum(col)])
            by_kernel[kernel] = pre[None, :] - pre[:, None]
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    out = np.full((len(peers), n + 1, n + 1), INF)
    for i, q in enumerate(peers):
        if q.flops <= 0:
            continue
        t = dfl / q.flops
        if by_kernel:
            speed = dict(q.kernels)
            rt = np.zeros_like(t)
            for kernel, d in by_kernel.items():
                bw = speed.get(kernel, q.bandwidth)
                if bw > 0:
                    rt = rt + d / bw
            t = np.maximum(t, rt)
        elif q.bandwidth > 0:
            t = np.maximum(t, drd / q.bandwidth)
        out[i] = np.where(valid & (dby <= q.memory_bytes), (t + dca * q.overhead_s) * q.scale, INF)
    return out


@dataclass
class _Found:
    value: float
    stages: int
    parts: list[tuple[int, int, int]]  # (peer position, start, end)


def _exact(layers: Sequence[Layer], peers: Sequence[Peer], links: Links, objective: str) -> list[_Found]:
    """Every complete plan's best value per (first, set, last), best first."""
    n, k = len(layers), len(peers)
    C = _costs(layers, peers)
    L = np.array([[links.between(a, b) for b in peers] for a in peers])
    join = np.add if objective == "latency" else np.maximum
    # states[(mask, last)] = (values [first, pos], back-pointer last [first, pos], back-pointer pos)
    # frontier: the states with one more peer each round, (mask, last) -> values [first, pos]: the best
    # objective so far with ``last``'s range starting at pos; back: how each was reached
    frontier: dict[tuple[int, int], np.ndarray] = {}
    back: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for f in range(k):
        v = np.full((k, n + 1), INF)
        v[f, 0] = 0.0
        frontier[(1 << f, f)] = v
    finals: list[_Found] = []
    while frontier:
        nxt: dict[tuple[int, int], np.ndarray] = {}
        for (mask, last), v in frontier.items():
            rows = [f for f in range(k) if mask >> f & 1 and np.isfinite(v[f]).any()]
            if not rows:
                continue
            sub = v[rows]
            # close: last takes [pos, n) and hands the token back to the first
            for r, f in enumerate(rows):
                total = join(sub[r], C[last, :, n] + L[last, f]).min()
                if math.isfinite(total):
                    finals.append(_Found(float(total), mask.bit_count(), _trace(back, mask, last, f, n, sub[r],
                                                                                C[last, :, n] + L[last, f], join)))
            for j in range(k):
                if mask >> j & 1:
                    continue
                step = C[last] + L[last, j]  # [pos, e]: last takes [pos, e), then hops to j
                cand = join(sub[:, :, None], step[None, :, :])  # [row, pos, e]
                arg = cand.argmin(axis=1)
                best = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :]
                key = (mask | 1 << j, j)
                cur = nxt.get(key)
                if cur is None:
                    cur = nxt[key] = np.full((k, n + 1), INF)
                    back[key] = (np.full((k, n + 1), -1, dtype=np.int16), np.zeros((k, n + 1), dtype=np.int16))
                bl, bp = back[key]
                better = best < cur[rows]
                for r, f in enumerate(rows):
                    sel = better[r]
                    cur[f, sel] = best[r, sel]
                    bl[f, sel] = last
                    bp[f, sel] = arg[r, sel]
        frontier = nxt
    finals.sort(key=lambda x: (x.value, x.stages))
    return finals


def _trace(back: dict, mask: int, last: int, f: int, n: int, row: np.ndarray, close: np.ndarray,
           join: np.ufunc) -> list[tuple[int, int, int]]:
    """The stages of the best plan ending with ``last`` closing at ``n`` (walking the back-pointers)."""
    pos = int(join(row, close).argmin())
    parts = [(last, pos, n)]
    end = pos
    while (mask, last) in back:
        bl, bp = back[(mask, last)]
        prev, start = int(bl[f, end]), int(bp[f, end])
        mask &= ~(1 << last)
        parts.append((prev, start, end))
        last, end = prev, start
    parts.reverse()
    return parts


def _chain(layers: Sequence[Layer], peers: Sequence[Peer], links: Links, objective: str) -> _Found | None:
    """The best plan over subsequences of ``peers`` in their order: states (last, first, pos), O(k^2)."""
    n, k = len(layers), len(peers)
    C = _costs(layers, peers)
    L = np.array([[links.between(a, b) for b in peers] for a in peers])
    join = np.add if objective == "latency" else np.maximum
    val = np.full((k, k, n + 1), INF)  # [last, first, pos]
    came = np.full((k, k, n + 1, 2), -1, dtype=np.int32)  # (previous last, its start)
    for f in range(k):
        val[f, f, 0] = 0.0
    best: tuple[float, int, int, int] | None = None  # (value, last, first, pos)
    for last in range(k):
        v = val[last]
        firsts = np.flatnonzero(np.isfinite(v).any(axis=1))
        if not len(firsts):
            continue
        for f in firsts:
            total = join(v[f], C[last, :, n] + L[last, f])
            pos = int(total.argmin())
            if math.isfinite(total[pos]) and (best is None or total[pos] < best[0]):
                best = (float(total[pos]), last, int(f), pos)
        sub = v[firsts]
        for j in range(last + 1, k):
            cand = join(sub[:, :, None], (C[last] + L[last, j])[None, :, :])
            arg = cand.argmin(axis=1)
            got = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :]
            better = got < val[j, firsts]
            for r, f in enumerate(firsts):
                sel = better[r]
                val[j, f, sel] = got[r, sel]
                came[j, f, sel, 0] = last
                came[j, f, sel, 1] = arg[r, sel]
    if best is None:
        return None
    value, last, f, pos = best
    parts, end = [(last, pos, n)], pos
    while last != f or end != 0:
        prev, start = (int(x) for x in came[last, f, end])
        parts.append((prev, start, end))
        last, end = prev, start
    parts.reverse()
    return _Found(value, len(parts), parts)


def _nearest_order(peers: Sequence[Peer], links: Links, speed: Sequence[float]) -> list[Peer]:
    """Fastest first, then each next peer the nearest (by link) to the one before; ties to the faster."""
    left = sorted(range(len(peers)), key=lambda i: (speed[i], peers[i].node_id))
    order = [left.pop(0)]
    while left:
        here = peers[order[-1]]
        i = min(left, key=lambda j: (links.between(here, peers[j]), speed[j]))
        left.remove(i)
        order.append(i)
    return [peers[i] for i in order]


def plan(layers: Sequence[Layer], peers: Sequence[Peer], *, links: Links | None = None,
         objective: str = "latency") -> Split:
    """The best split of ``layers`` over any subset of ``peers`` in any order (see the module docstring).
    PlanInfeasible when no subset and order fits."""
    return search(layers, peers, links=links, objective=objective)[0]


def search(layers: Sequence[Layer], peers: Sequence[Peer], *, links: Links | None = None,
           objective: str = "latency", exact_peers: int = EXACT_PEERS) -> tuple[Split, Split | None, bool]:
    """(best split, the runner-up with another set or order of peers or None, exact?). Exact when at most
    ``exact_peers`` peers are usable (the benchmark moves it to measure the heuristic's gap)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    links = links or Links()
    check_fits(layers, peers)
    usable = [q for q in peers if q.flops > 0 and q.memory_bytes > 0]
    exact = len(usable) <= exact_peers
    found: list[Split] = []
    if exact:
        for hit in _exact(layers, usable, links, objective)[:64]:
            found.append(build(layers, [(usable[i], s, e) for i, s, e in hit.parts], links))
    else:
        flops, read = sum(x.flops_per_token for x in layers), sum(x.read for x in layers)
        calls, reads = sum(x.calls for x in layers), reads_by_kernel(layers)
        speed = [compute_s(q, flops, read, calls, reads) for q in usable]  # the whole model's time: who is fastest
        fastest = sorted(range(len(usable)), key=lambda i: (speed[i], usable[i].node_id))
        # The pool: the POOL fastest, more (up to MAX_POOL) while they offer less than 1.5x the model's memory.
        need, size, offered = sum(x.bytes for x in layers), 0, 0
        while size < len(fastest) and (size < POOL or (offered < 1.5 * need and size < MAX_POOL)):
            offered += usable[fastest[size]].memory_bytes
            size += 1
        pool_idx = fastest[:size]
        pool = [usable[i] for i in pool_idx]
        orders = [_nearest_order(pool, links, [speed[i] for i in pool_idx]), pool]
        for order in orders:
            hit = _chain(layers, order, links, objective)
            if hit is not None:
                found.append(build(layers, [(order[i], s, e) for i, s, e in hit.parts], links))
        if objective == "throughput" or not found:
            # The bisection walk along fastest-first: over the WALK fastest, else (nothing fits there) all.
            order = [usable[i] for i in fastest]
            for peers_ in (order[:WALK], order) if len(order) > WALK else (order,):
                try:
                    split = plan_split(layers, peers_)
                except PlanInfeasible:
                    continue
                by_id = {q.node_id: q for q in peers_}
                found.append(build(layers, [(by_id[s.node], s.start, s.end) for s in split.stages], links))
                break
    if not found:
        raise PlanInfeasible("the layers fit no subset and order of these peers (memory per peer)")
    found.sort(key=lambda s: (cost(s, objective), len(s.stages)))
    # Among plans as good as the best (equal peers tie exactly): fewest stages, then most layers already
    # on their peer's disk (nothing to fetch), then the search's order.
    by_id = {q.node_id: q for q in usable}
    top = cost(found[0], objective) * (1 + TIE) + 1e-15
    best = min((s for s in found if cost(s, objective) <= top),
               key=lambda s: (len(s.stages), -_held(layers, s, by_id)))
    if not math.isfinite(cost(best, objective)):
        raise PlanInfeasible("the only plans that fit have an infinite stage time (a peer with ~0 FLOP/s)")
    route = [s.node for s in best.stages]
    runner = next((s for s in found if [t.node for t in s.stages] != route), None)
    return best, runner, exact


def _held(layers: Sequence[Layer], split: Split, by_id: Mapping[str, Peer]) -> int:
    return sum(1 for s in split.stages for i in range(s.start, s.end) if layers[i].index in by_id[s.node].holds)


def brute_force(layers: Sequence[Layer], peers: Sequence[Peer], links: Links | None = None,
                objective: str = "latency") -> float:
    """The optimum by enumeration of every ordered subset of peers and every composition of the layers
    (small cases only: the oracle of the property tests)."""
    links = links or Links()
    n, best = len(layers), INF
    by = [0, *itertools.accumulate(x.bytes for x in layers)]
    for k in range(1, min(n, len(peers)) + 1):
        for chosen in itertools.permutations(peers, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                parts = list(zip(chosen, bounds, bounds[1:], strict=False))
                if any(by[e] - by[s] > q.memory_bytes or q.flops <= 0 for q, s, e in parts):
                    continue
                best = min(best, cost(build(layers, parts, links), objective))
    return best


def why(best: Split, runner: Split | None, exact: bool, objective: str) -> dict[str, object]:
    """What a plan says of itself: the objective, its estimates, what bounds it and the runner-up."""
    worst = max(best.stages, key=lambda x: x.time_s)
    if objective == "throughput":
        bound = (f"link {worst.node} -> next" if worst.hop_s > worst.compute_s else f"peer {worst.node}")
    else:
        hops = sum(x.hop_s for x in best.stages)
        bound = "links" if hops > best.latency_s / 2 else (
            "memory" if len(best.stages) > 1 else f"peer {best.stages[0].node}")
    return {"objective": objective, "exact": exact, "stages": len(best.stages),
            "ms_per_token": round(best.latency_s * 1000, 6),
            "tokens_per_s": round(1 / best.latency_s, 3) if best.latency_s > 0 else None,
            "pipelined_tokens_per_s": round(1 / best.bottleneck_s, 3) if best.bottleneck_s > 0 else None,
            "bound": bound,
            "runner_up_ms": round(cost(runner, objective) * 1000, 6) if runner is not None else None}


def parse_links(raw: object, peers: Sequence[Peer]) -> Links:
    """``{"a": {"b": ms, ...}, ...}`` over known node ids, milliseconds ≥ 0 (INVALID_PLAN_INPUT otherwise)."""
    known = {q.node_id for q in peers}
    if not isinstance(raw, dict):
        raise PeerError("links: expected a JSON object of objects", code="INVALID_PLAN_INPUT")
    for a, row in raw.items():
        if a not in known or not isinstance(row, dict):
            raise PeerError(f"links.{a}: expected a known node id with an object of ms", code="INVALID_PLAN_INPUT")
        for b, ms in row.items():
            if b not in known or isinstance(ms, bool) or not isinstance(ms, int | float) or not ms >= 0 \
                    or not math.isfinite(ms):
                raise PeerError(f"links.{a}.{b}: expected a known node id and milliseconds >= 0, got {ms!r}",
                                code="INVALID_PLAN_INPUT")
    return Links.from_ms(raw)

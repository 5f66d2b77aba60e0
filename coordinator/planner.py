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
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mesh.errors import PeerError
from mesh.ids import Span, check_spans

#: Above this many (peer × layer × range length) steps the tie-breaking dynamic program is skipped.
TIE_BREAK_BUDGET = 300_000


class PlanInfeasible(PeerError):
    """The model does not fit the mesh: the message names the shortfall."""

    code = "PLAN_INFEASIBLE"


@dataclass(frozen=True, slots=True)
class Layer:
    index: int
    flops_per_token: float
    bytes: int  # memory it takes: weights and KV cache
    read_bytes: int | None = None  # what one token reads (weights, the KV it attends to); None: ``bytes``
    calls: float = 0.0  # per-token dispatch overhead in units of one transformer block (a block 1, a norm ~0.1)
    # What ``read`` streams through which weight kernel, (kernel, bytes): "int4", "int8", "bfloat16", "float32";
    # "" for plain memory (the KV cache). Empty: all of ``read`` at the peer's memory bandwidth.
    reads: tuple[tuple[str, int], ...] = ()

    @property
    def read(self) -> int:
        return self.bytes if self.read_bytes is None else self.read_bytes


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    flops: float  # measured FLOP/s
    memory_bytes: int  # free memory it offers for layers
    link_s: float = 0.0  # hop to the next stage, seconds per token (where no measured link says otherwise)
    holds: frozenset[int] = frozenset()  # layer indices it already has on disk
    bandwidth: float = 0.0  # measured memory bandwidth, bytes/s (0: unknown, the stage is FLOP-bound)
    overhead_s: float = 0.0  # measured per-token time of one block's dispatch (a tiny block's decode step)
    kernels: tuple[tuple[str, float], ...] = ()  # measured bytes/s of each weight kernel (else ``bandwidth``)
    scale: float = 1.0  # measured step time over the estimate (1 until it serves)


@dataclass(frozen=True, slots=True)
class Stage(Span):
    """A ``Span`` of layer *positions* (in the layer list, half-open) with what it costs its node."""

    flops: float
    bytes: int
    time_s: float  # compute + hop, per token
    compute_s: float = 0.0
    hop_s: float = 0.0  # to the next stage (the last: back to the first)


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


def split_of(layers: Sequence[Layer], stages: Sequence[tuple[Peer, int, int]]) -> Split:
    """The Split of given ``(peer, start, end)`` stages (positions in ``layers``, half-open): INVALID_PLAN_INPUT
    unless they cover every layer once, contiguously from 0, no peer twice (``check_spans``)."""
    check_spans([Span(q.node_id, s, e) for q, s, e in stages], len(layers), code="INVALID_PLAN_INPUT",
                what="stages")
    peers = [q for q, _, _ in stages]
    return _stages(layers, _Prefix.of(layers), peers, [(i, s, e) for i, (_, s, e) in enumerate(stages)])


def check_fits(layers: Sequence[Layer], peers: Sequence[Peer]) -> None:
    """PlanInfeasible naming the shortfall when no plan can exist (memory, or a layer no peer can hold)."""
    if not layers:
        raise PlanInfeasible("the model has no layers")
    usable = [q for q in peers if q.flops > 0 and q.memory_bytes > 0]
    if not usable:
        raise PlanInfeasible(f"no peer can take layers ({len(peers)} offered, none with compute and memory)")
    need, have = sum(x.bytes for x in layers), sum(q.memory_bytes for q in usable)
    if need > have:
        raise PlanInfeasible(f"the model needs {_size(need)}, the peers offer {_size(have)}: "
                             f"{_size(need - have)} short")
    biggest = max(layers, key=lambda x: x.bytes)
    if biggest.bytes > max(q.memory_bytes for q in usable):
        raise PlanInfeasible(f"layer {biggest.index} needs {_size(biggest.bytes)}; the largest peer "
                             f"offers {_size(max(q.memory_bytes for q in usable))}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def plan_split(layers: Sequence[Layer], peers: Sequence[Peer]) -> Split:
    """The split of minimum bottleneck over ``peers`` in this pipeline order (see the module docstring)."""
    check_fits(layers, peers)
    n, p = len(layers), _Prefix.of(layers)
    # Bounds: one peer doing everything is an upper bound when it fits; otherwise grow until feasible.
    hi = max(max(stage_time(p.flops[n], q) for q in peers if q.flops > 0), 1e-12)
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
    if not math.isfinite(best.bottleneck_s):
        raise PlanInfeasible("the only plans that fit have an infinite stage time (a peer with ~0 FLOP/s)")
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


# ---- the plan object ------------------------------------------------------------------------------


def fallback_for(stage: Stage, split: Split, peers: Sequence[Peer]) -> str | None:
    """Who takes ``stage`` if its peer drops: the fastest peer outside the plan that can hold it, else a
    neighbouring stage's peer with that much memory to spare (it extends its range, as ``reassign`` does);
    None if nobody can. That peer keeps the range's shards on disk ahead of time (standby shards)."""
    used = {s.node: s.bytes for s in split.stages}

    def speed(q: Peer) -> tuple[float, str]:  # the stage on q: FLOP-bound or bandwidth-bound, then the id
        t = stage.flops / q.flops
        if q.bandwidth > 0:
            t = max(t, stage.bytes / q.bandwidth)
        return t * q.scale + q.link_s, q.node_id

    free = [q for q in peers if q.node_id not in used and q.flops > 0 and q.memory_bytes >= stage.bytes]
    if free:
        return min(free, key=speed).node_id
    i = next(k for k, s in enumerate(split.stages) if s.node == stage.node and s.start == stage.start)
    near = {split.stages[j].node for j in (i - 1, i + 1) if 0 <= j < len(split.stages)}
    spare = [q for q in peers if q.node_id in near and q.node_id != stage.node
             and q.memory_bytes - used[q.node_id] >= stage.bytes]
    return min(spare, key=speed).node_id if spare else None


# ---- what-if input (``meshnode plan``) -----------------------------------------------------------


def _field(row: object, key: str, kind: type, where: str, default: object = None) -> object:
    if not isinstance(row, dict):
        raise PeerError(f"{where}: expected an object, got {type(row).__name__}", code="INVALID_PLAN_INPUT")
    value = row.get(key, default)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN
    if value is None or not ok:
        raise PeerError(f"{where}.{key}: expected {kind.__name__}, got {value!r}", code="INVALID_PLAN_INPUT")
    if kind in (int, float) and value < 0:  # type: ignore[operator]
        raise PeerError(f"{where}.{key}: must not be negative", code="INVALID_PLAN_INPUT")
    return float(value) if kind is float else value  # type: ignore[arg-type]


def parse_layers(raw: object) -> list[Layer]:
    """``[{"index": int, "flops_per_token": float, "bytes": int}, ...]`` in pipeline order."""
    if not isinstance(raw, list) or not raw:
        raise PeerError("layers: expected a non-empty JSON list", code="INVALID_PLAN_INPUT")
    out = [Layer(_field(r, "index", int, f"layers[{i}]"), _field(r, "flops_per_token", float, f"layers[{i}]"),
                 _field(r, "bytes", int, f"layers[{i}]")) for i, r in enumerate(raw)]  # type: ignore[arg-type]
    if [x.index for x in out] != sorted({x.index for x in out}):
        raise PeerError("layers: indices must be unique and increasing (pipeline order)", code="INVALID_PLAN_INPUT")
    return out


def parse_peers(raw: object) -> list[Peer]:
    """``[{"node_id": str, "flops": float, "memory_bytes": int, "link_ms"?: float, "bandwidth"?: float}, ...]``
    (``bandwidth``: memory bytes/s; absent: FLOP-bound)."""
    if not isinstance(raw, list) or not raw:
        raise PeerError("nodes: expected a non-empty JSON list", code="INVALID_PLAN_INPUT")
    out = [Peer(_field(r, "node_id", str, f"nodes[{i}]"), _field(r, "flops", float, f"nodes[{i}]"),
                _field(r, "memory_bytes", int, f"nodes[{i}]"),
                _field(r, "link_ms", float, f"nodes[{i}]", 0.0) / 1000,  # type: ignore[operator]
                bandwidth=_field(r, "bandwidth", float, f"nodes[{i}]", 0.0))  # type: ignore[arg-type]
           for i, r in enumerate(raw)]  # type: ignore[arg-type]
    if len({q.node_id for q in out}) != len(out):
        raise PeerError("nodes: node_id values must be unique", code="INVALID_PLAN_INPUT")
    return out


# ---- reassignment -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reassignment:
    split: Split
    reassigned: tuple[str, ...]  # peers that got a new or larger range
    replanned: bool  # True when the patch would have grown the bottleneck beyond the threshold


def reassign(layers: Sequence[Layer], peers: Sequence[Peer], current: Split, failed: Iterable[str], *,
             threshold: float = 0.25, fixed: Iterable[str] = (), prefer: Mapping[str, str] | None = None
             ) -> Reassignment:
    """Cover the ranges of ``failed`` peers, keeping every surviving assignment: each lost range goes to
    the best of a free peer (one not in the plan) or a neighbouring stage's peer extending its range
    when it has the memory. A full replan over ``peers`` (alive, in pipeline order) happens only when
    no patch exists or the patched bottleneck exceeds the current one by more than ``threshold``;
    PlanInfeasible when nothing fits. ``fixed`` peers keep their ranges but take no more work (not
    extended, not in a full replan): survivors that are degraded or no longer accept jobs. ``prefer``: a
    failed peer -> the peer that takes its range when that is one of the options and its stage time is
    within ``threshold`` of the best option's (the plan's fallback, which has the range's shards on disk)."""
    gone, keep_only = set(failed), set(fixed)
    alive = {q.node_id: q for q in peers if q.node_id not in gone}
    p = _Prefix.of(layers)
    stages = list(current.stages)
    if not any(s.node in gone for s in stages):
        return Reassignment(current, (), False)
    parts = [(s.node, s.start, s.end) for s in stages]
    reassigned: list[str] = []
    patched = True
    i = 0
    while i < len(parts):
        node, s, e = parts[i]
        if node not in gone:
            i += 1
            continue
        in_plan = {x[0] for x in parts}
        flops, size = p.flops[e] - p.flops[s], p.bytes[e] - p.bytes[s]
        options: list[tuple[float, str, str]] = [  # (stage time after, how, node)
            (stage_time(flops, q), "free", q.node_id) for q in alive.values()
            if q.node_id not in in_plan and q.node_id not in keep_only and q.flops > 0
            and q.memory_bytes >= size]
        for j, how in ((i - 1, "before"), (i + 1, "after")):
            if 0 <= j < len(parts) and parts[j][0] in alive and parts[j][0] not in keep_only:
                q, (_, js, je) = alive[parts[j][0]], parts[j]
                if p.bytes[je] - p.bytes[js] + size <= q.memory_bytes:
                    options.append((stage_time(p.flops[je] - p.flops[js] + flops, q), how, q.node_id))
        if not options:
            patched = False
            break
        best = min(options)
        # The fallback (shards on disk already) wins unless another option is better by more than the threshold.
        preferred = [o for o in options if prefer and o[2] == prefer.get(node) and o[0] <= best[0] * (1 + threshold)]
        _, how, chosen = min(preferred) if preferred else best
        reassigned.append(chosen)
        if how == "free":
            parts[i] = (chosen, s, e)
            i += 1
        elif how == "before":
            parts[i - 1] = (parts[i - 1][0], parts[i - 1][1], e)
            del parts[i]
        else:
            parts[i + 1] = (parts[i + 1][0], s, parts[i + 1][2])
            del parts[i]
    split = None
    if patched:
        split = _stages(layers, p, [alive[x[0]] for x in parts], [(k, x[1], x[2]) for k, x in enumerate(parts)])
        if split.bottleneck_s <= current.bottleneck_s * (1 + threshold):
            return Reassignment(split, tuple(dict.fromkeys(reassigned)), False)
    try:
        fresh = plan_split(layers, [q for q in alive.values() if q.node_id not in keep_only])
    except PlanInfeasible:
        if split is None:
            raise
        fresh = None
    if split is not None and (fresh is None or split.bottleneck_s <= fresh.bottleneck_s):
        return Reassignment(split, tuple(dict.fromkeys(reassigned)), False)
    assert fresh is not None
    kept = {s.span for s in current.stages}
    moved = tuple(s.node for s in fresh.stages if s.span not in kept)
    return Reassignment(fresh, moved, True)

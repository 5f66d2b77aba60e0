"""What the coordinator does about a model's plan, given what it sees now. Pure; no I/O, no clock.

``Controller.decide`` is called on every tick of the coordinator with the model's layers, every member
as a ``Worker`` and the plan held for the model. It returns a ``Decision`` (a new split to publish as the
next epoch, and why) or None:

- no plan yet                      → the best plan over the ``ready`` peers that accept jobs, any subset in
                                     any order, for the objective (``search.search``: latency or throughput,
                                     with the measured links) ("initial");
- a peer of the plan is offline, draining or gone → ``planner.reassign``: surviving ranges stay, the
  lost ones go to a free or neighbouring peer, a full replan only past the threshold ("reassign" /
  "replan"). A peer that merely missed a beat (degraded) keeps its range: no flapping;
- the plan was made in an earlier term → the same assignments, re-issued under this term ("term");
- new ready peers appeared        → a fresh plan is adopted only if it cuts the objective's cost (the
  current plan re-costed with today's speeds and links) by more than the threshold ("improve"), so joins
  do not reshuffle the mesh for nothing.

Reassignment keeps every survivor's range (no shard moves that a failure did not force), so it patches
along a pipeline order: ``planner.plan_split`` is exact for a given order; ``best_order`` tries a few
(as given, fastest first, most memory first, holders of the model first) and keeps the best.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator import planner, search
from coordinator.planner import Layer, Peer, PlanInfeasible, Split
from coordinator.plans import Plan
from coordinator.search import Links
from mesh.wire import NodeStatus

#: A peer measuring less than this (FLOP/s; real peers measure 1e9 and up) gets no layers: a near-zero
#: score, honest or not, would make its stage time infinite.
MIN_WORKER_FLOPS = 1e6
#: ``replicas = 0`` (auto): another pipeline is added while one fits on the peers left and its cost is within
#: this factor of the first's (a much slower pipeline would serve its sessions much later than the first).
AUTO_REPLICA_COST = 2.0


def replica_splits(layers: Sequence[Layer], peers: Sequence[Peer], first: Split, links: Links, objective: str,
                   want: int) -> list[Split]:
    """More pipelines after ``first``, each the best plan for ``objective`` over the peers no pipeline uses
    yet: ``want - 1`` of them (``want`` = 0: as many as fit within ``AUTO_REPLICA_COST`` of the first's cost)."""
    used = {s.node for s in first.stages}
    out: list[Split] = []
    limit = float("inf") if want == 0 else want - 1
    while len(out) < limit:
        rest = [q for q in peers if q.node_id not in used]
        if not rest:
            break
        try:
            split = search.plan(layers, rest, links=links, objective=objective)
        except PlanInfeasible:
            break
        if want == 0 and search.cost(split, objective) > AUTO_REPLICA_COST * search.cost(first, objective):
            break
        out.append(split)
        used |= {s.node for s in split.stages}
    return out


#: A member's compute claim counts for at most this many times the best per-core claim of the *other*
#: members, times its own cores: a confused (or lying) member cannot pull every layer to itself.
CLAIM_CAP = 2.0


def capped_claims(claims: dict[str, tuple[float, int]]) -> dict[str, float]:
    """node id -> (claimed FLOP/s, cores) to the FLOP/s the planner may believe. A lone member keeps its
    claim; so does every member within ``CLAIM_CAP`` of the best other per-core claim."""
    per_core = sorted(((flops / max(1, cores), node) for node, (flops, cores) in claims.items()), reverse=True)
    out = {}
    for node, (flops, cores) in claims.items():
        best_other = next((pc for pc, other in per_core if other != node), None)
        out[node] = flops if best_other is None else min(flops, CLAIM_CAP * best_other * max(1, cores))
    return out


@dataclass(frozen=True, slots=True)
class Worker:
    """A member as the coordinator sees it."""

    node_id: str
    flops: float
    memory_bytes: int  # memory it offers for layers
    status: NodeStatus
    accepts_jobs: bool = True
    holds_model: bool = False
    link_s: float = 0.0
    bandwidth: float = 0.0  # memory bandwidth, bytes/s (0: unknown)
    scale: float = 1.0  # measured step time over the estimate, where it serves
    overhead_s: float = 0.0  # one block's dispatch time per token in the plan's compute dtype
    kernels: tuple[tuple[str, float], ...] = ()  # bytes/s of each weight kernel

    @property
    def usable(self) -> bool:
        """May be given new work."""
        return (self.status == NodeStatus.READY and self.accepts_jobs and self.flops >= MIN_WORKER_FLOPS
                and self.memory_bytes > 0)

    @property
    def alive(self) -> bool:
        """Keeps the work it has (a missed beat or resource pressure is not a reason to move layers)."""
        return self.status in (NodeStatus.READY, NodeStatus.DEGRADED, NodeStatus.REGISTERING)

    def peer(self, layers: Sequence[Layer]) -> Peer:
        holds = frozenset(x.index for x in layers) if self.holds_model else frozenset()
        return Peer(self.node_id, self.flops, self.memory_bytes, self.link_s, holds, bandwidth=self.bandwidth,
                    overhead_s=self.overhead_s, kernels=self.kernels, scale=self.scale)


@dataclass(frozen=True, slots=True)
class Decision:
    split: Split
    peers: tuple[Peer, ...]  # what the split was planned over (fallbacks are chosen among them)
    reason: str
    reassigned: tuple[str, ...] = ()
    why: dict[str, object] = field(default_factory=dict)  # ``search.why`` of the split
    replicas: tuple[Split, ...] = ()  # more pipelines of the model, on peers of no other pipeline


def _orders(peers: Sequence[Peer]) -> list[list[Peer]]:
    orders = [
        list(peers),
        sorted(peers, key=lambda q: (-q.flops, q.node_id)),
        sorted(peers, key=lambda q: (-q.memory_bytes, -q.flops, q.node_id)),
        sorted(peers, key=lambda q: (not q.holds, -q.flops, q.node_id)),
    ]
    unique: list[list[Peer]] = []
    for o in orders:
        if o not in unique:
            unique.append(o)
    return unique


def _best(layers: Sequence[Layer], peers: Sequence[Peer]) -> tuple[list[Peer], Split]:
    planner.check_fits(layers, peers)
    best: tuple[float, int, int] | None = None
    chosen: tuple[list[Peer], Split] | None = None
    error: PlanInfeasible | None = None
    for order in _orders(peers):
        try:
            split = planner.plan_split(layers, order)
        except PlanInfeasible as err:
            error = err
            continue
        held = {q.node_id: q.holds for q in order}
        key = (split.bottleneck_s,
               -sum(1 for s in split.stages for i in range(s.start, s.end) if layers[i].index in held[s.node]),
               len(split.stages))
        if best is None or key < best:
            best, chosen = key, (order, split)
    if chosen is None:
        assert error is not None
        raise error
    return chosen


def best_split(layers: Sequence[Layer], peers: Sequence[Peer]) -> Split:
    """The best of ``plan_split`` over a few pipeline orders: lowest bottleneck, then most layers held by
    their peer, then fewest stages. PlanInfeasible (naming the shortfall) when none fits."""
    return _best(layers, peers)[1]


def best_order(layers: Sequence[Layer], peers: Sequence[Peer]) -> list[Peer]:
    """The pipeline order ``best_split`` plans under (a full replan inside ``reassign`` uses it); the
    first order when nothing fits (``reassign`` then reports the shortfall)."""
    try:
        return _best(layers, peers)[0]
    except PlanInfeasible:
        return _orders(peers)[0]


@dataclass
class Controller:
    threshold: float = 0.25  # a patch or a join may change the cost by this much before a replan
    objective: str = "latency"  # what a plan minimises (``search.OBJECTIVES``)
    replicas: int = 1  # pipelines per model: 1 (no replica), N, or 0 (auto: as many as fit, see replica_splits)
    _considered: dict[str, frozenset[str]] = field(default_factory=dict)  # model -> usable peers last planned over

    def plan(self, layers: Sequence[Layer], peers: Sequence[Peer], links: Links) -> tuple[Split, dict[str, object]]:
        """The best split for the objective over any subset and order of ``peers``, and its ``why``."""
        best, runner, exact = search.search(layers, peers, links=links, objective=self.objective)
        return best, search.why(best, runner, exact, self.objective)

    def decide(self, model: str, layers: Sequence[Layer], workers: Sequence[Worker], current: Plan | None,
               term: int, links: Links | None = None) -> Decision | None:
        """The next plan for ``model``, or None to keep ``current``. PlanInfeasible when nothing fits.
        ``links``: the measured hops between peers (a missing pair costs the sender's ``link_s``)."""
        links = links or Links()
        usable = [w.peer(layers) for w in workers if w.usable]
        usable_ids = frozenset(q.node_id for q in usable)
        if current is None or current.total_layers != len(layers):
            self._considered[model] = usable_ids
            split, why = self.plan(layers, usable, links)
            return Decision(split, tuple(usable), "initial", why=why, replicas=self._more(layers, usable, split, links))

        alive = {w.node_id: w for w in workers if w.alive}
        lost = [a.node for a in current.assignments if a.node not in alive]
        intact = [current.split(layers, i) for i, p in enumerate(current.pipelines)
                  if i > 0 and all(a.node in alive for a in p)]
        if lost and intact:  # the first pipeline broke: a replica (loaded already) takes its place at once
            self._considered[model] = usable_ids
            first, rest = intact[0], intact[1:]
            why = search.why(search.build(layers, [(alive[s.node].peer(layers), s.start, s.end)
                                                   for s in first.stages], links), None, False, self.objective)
            taken = {s.node for r in intact for s in r.stages}  # the lost pipeline's survivors are free now
            more = self._more(layers, [q for q in usable if q.node_id not in taken], first, links, have=len(rest))
            return Decision(first, tuple(usable), "promote", tuple(lost), why=why | {"method": "promote"},
                            replicas=(*rest, *more))
        if lost:
            self._considered[model] = usable_ids
            d = self.cover(layers, [w for w in workers if not any(w.node_id in {s.node for s in r.stages}
                                                                    for r in intact)],
                           current.split(layers), lost, links=links,
                           prefer={a.node: a.fallback for a in current.assignments if a.fallback})
            return dataclasses.replace(d, replicas=tuple(intact))
        if len(intact) != len(current.replicas):  # a replica lost a peer: drop it, refill from free peers
            self._considered[model] = usable_ids
            first = current.split(layers)
            kept = list(intact)
            taken = {s.node for s in first.stages} | {s.node for r in kept for s in r.stages}
            more = self._more(layers, [q for q in usable if q.node_id not in taken], first, links,
                              have=len(kept))
            return Decision(first, tuple(usable), "replica", why=dict(current.why), replicas=(*kept, *more))

        if current.term != term:
            peers = {q.node_id: q for q in usable}
            for a in current.assignments:
                peers.setdefault(a.node, alive[a.node].peer(layers))
            return Decision(current.split(layers), tuple(peers.values()), "term", why=dict(current.why),
                            replicas=tuple(intact))

        if not usable_ids <= self._considered.get(model, frozenset()):
            self._considered[model] = usable_ids
            try:
                fresh, why = self.plan(layers, usable, links)
            except PlanInfeasible:
                return None
            now = search.build(layers, [(alive[s.node].peer(layers), s.start, s.end)
                                        for s in current.split(layers).stages], links)
            if search.cost(fresh, self.objective) * (1 + self.threshold) < search.cost(now, self.objective):
                return Decision(fresh, tuple(usable), "improve", why=why,
                                replicas=self._more(layers, usable, fresh, links))
            taken = {a.node for p in current.pipelines for a in p}
            more = self._more(layers, [q for q in usable if q.node_id not in taken], current.split(layers), links,
                              have=len(intact))
            if more:  # new peers make room for another pipeline
                return Decision(current.split(layers), tuple(usable), "replica", why=dict(current.why),
                                replicas=(*intact, *more))
        return None

    def _more(self, layers: Sequence[Layer], peers: Sequence[Peer], first: Split, links: Links, have: int = 0
              ) -> tuple[Split, ...]:
        """Replica pipelines beyond ``have`` existing ones, over ``peers`` (none of ``first``'s)."""
        if self.replicas == 1 or (self.replicas > 1 and have >= self.replicas - 1):
            return ()
        want = 0 if self.replicas == 0 else self.replicas - have
        return tuple(replica_splits(layers, peers, first, links, self.objective, want))

    def cover(self, layers: Sequence[Layer], workers: Sequence[Worker], current: Split, failed: Iterable[str], *,
              reason: str = "reassign", links: Links | None = None, prefer: dict[str, str] | None = None
              ) -> Decision:
        """``planner.reassign`` of ``current`` without ``failed``: survivors keep their ranges even if
        degraded or refusing jobs (``fixed``); new work goes only to usable peers. The reason is
        ``reason``, or "replan" when the threshold forced a full replan."""
        gone = set(failed)
        in_plan = {s.node for s in current.stages}
        by_id = {w.node_id: w for w in workers}
        fixed = {w.node_id for w in workers if w.node_id in in_plan and w.alive and not w.usable} - gone
        order = best_order(layers, [w.peer(layers) for w in workers if w.usable and w.node_id not in gone])
        order += [by_id[node].peer(layers) for node in sorted(fixed)]
        r = planner.reassign(layers, order, current, gone, threshold=self.threshold, fixed=fixed, prefer=prefer)
        costed = search.build(layers, [(next(q for q in order if q.node_id == s.node), s.start, s.end)
                                       for s in r.split.stages], links or Links())
        why = search.why(costed, None, False, self.objective) | {"method": "reassign"}
        return Decision(r.split, tuple(order), "replan" if r.replanned else reason, r.reassigned, why=why)


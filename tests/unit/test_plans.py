"""Signed plans and the coordinator's decisions, without sockets: the wire format refuses forgeries and
malformed plans, the book accepts only the current term's coordinator and newer epochs, and the controller
reassigns only lost ranges, never flaps on a missed beat, re-issues under a new term and improves on joins
only past the threshold — checked on many simulated peers."""

from __future__ import annotations

import dataclasses
import random

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.control import Controller, Worker, best_split
from coordinator.election import Leadership
from coordinator.planner import Layer, PlanInfeasible, plan_split
from coordinator.plans import (
    MAX_PENDING,
    PLAN,
    Held,
    Plan,
    PlanBook,
    decode_plan,
    encode_plan,
    make_plan,
    open_plan,
    seal_plan,
)
from inference.protocol import Route, route_of
from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.ids import NodeId, Span
from mesh.wire import NodeStatus, seal

S = NodeStatus
LAYERS = [Layer(i, 1e9, 100) for i in range(16)]


def workers(n: int, *, flops: float = 1e10, memory: int = 1000, prefix: str = "w") -> list[Worker]:
    return [Worker(f"{prefix}{i:02d}", flops, memory, S.READY) for i in range(n)]


def plan_of(coordinator: Identity, *, term: int = 1, epoch: int = 1, model: str = "m",
            ws: list[Worker] | None = None) -> Plan:
    peers = [w.peer(LAYERS) for w in ws or workers(4)]
    return make_plan(LAYERS, peers, plan_split(LAYERS, peers), model=model, revision="r1", term=term, epoch=epoch,
                     coordinator=coordinator.node_id, reason="initial")


def held(plan: Plan, identity: Identity) -> Held:
    return Held(plan, seal_plan(plan, identity))


# ---- wire ----------------------------------------------------------------------------------------


def test_assignments_are_spans_and_a_plan_s_spans_are_its_route() -> None:
    plan = plan_of(Identity.generate())
    a = plan.assignments[0]
    assert isinstance(a, Span) and a.span == Span(a.node, a.start, a.end) and type(a.span) is Span
    assert plan.spans() == tuple(Span(a.node, a.start, a.end) for a in plan.assignments)
    assert all(type(s) is Span for s in plan.spans())
    route = Route(plan.model_id, plan.revision, plan.version,
                  plan.spans(), plan.compute_dtype)
    assert route.hops == plan.spans() == route_of(route.to_wire()).hops
    assert plan.split(LAYERS).stages[0].span == a.span  # layer indices are positions here




def test_a_plan_survives_the_wire_and_forgeries_do_not() -> None:
    coord, other = Identity.generate(), Identity.generate()
    plan = plan_of(coord)
    assert open_plan(seal_plan(plan, coord)) == plan
    view = plan.view(tokens=10)
    assert [s["layer_range"] for s in view["model_split_plan"]["splits"]] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    assert view["estimated_total_time"] == pytest.approx(10 * plan.latency_s)
    assert len(view["fallback_nodes"]) == 4 and len(view["selected_nodes"]) == 4
    # Signed by a key other than the coordinator it names.
    with pytest.raises(PeerError) as err:
        open_plan(seal(PLAN, encode_plan(plan), other))
    assert err.value.code == "PLAN_SIGNER_MISMATCH"
    # A flipped bit in the payload breaks the signature.
    env = cbor2.loads(seal_plan(plan, coord))
    env["p"] = env["p"][:-1] + bytes([env["p"][-1] ^ 1])
    with pytest.raises(PeerError) as err:
        open_plan(cbor2.dumps(env))
    assert err.value.code == "BAD_SIGNATURE"
    with pytest.raises(PeerError) as err:
        open_plan(seal("node_info", encode_plan(plan), coord))
    assert err.value.code == "UNKNOWN_MESSAGE_KIND"
    with pytest.raises(PeerError) as err:
        open_plan(b"\x00" * 70_000)
    assert err.value.code == "MESSAGE_TOO_LARGE"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["assignments"].pop(1), "contiguous"),
    (lambda d: d["assignments"].pop(), "cover 12 layers"),
    (lambda d: d["assignments"][1].__setitem__(0, d["assignments"][0][0]), "appears twice"),
    (lambda d: d["assignments"][0].__setitem__(2, 0), "contiguous"),
    (lambda d: d["assignments"][0].__setitem__(4, float("nan")), "bad value"),
    (lambda d: d["assignments"][0].__setitem__(3, -1), "bad value"),
    (lambda d: d.__setitem__("assignments", []), "at least one stage"),
    (lambda d: d.__setitem__("epoch", 0), "start at 1"),
    (lambda d: d.__setitem__("version", 2), "not supported"),
    (lambda d: d.__setitem__("assignments", [[0] * 7] * 2000), "at most 1024"),
    (lambda d: d.pop("term"), "missing field 'term'"),
])
def test_malformed_plans_are_refused_with_a_reason(change, message) -> None:
    raw = cbor2.loads(encode_plan(plan_of(Identity.generate())))
    change(raw)
    with pytest.raises(PeerError, match=message) as err:
        decode_plan(cbor2.dumps(raw))
    assert err.value.code in ("MALFORMED_MESSAGE", "UNSUPPORTED_VERSION")


# ---- the book ------------------------------------------------------------------------------------


def test_only_the_current_terms_coordinator_and_newer_epochs_count() -> None:
    old, new, rogue = Identity.generate(), Identity.generate(), Identity.generate()
    book = PlanBook()
    lead1 = Leadership(1, NodeId(old.node_id))
    assert book.offer(held(plan_of(old, term=1, epoch=1), old), lead1).code == "ACCEPTED"
    assert book.offer(held(plan_of(old, term=1, epoch=1), old), lead1).code == "DUPLICATE"
    assert book.offer(held(plan_of(rogue, term=1, epoch=5), rogue), lead1).code == "NOT_COORDINATOR"
    v = book.offer(held(plan_of(old, term=1, epoch=2), old), lead1)
    assert v.accepted and v.previous is not None and v.previous.epoch == 1
    assert book.offer(held(plan_of(old, term=1, epoch=1), old), lead1).code == "STALE_EPOCH"
    # Term 2 is claimed by `new`: the old coordinator's plans are stale from now on.
    lead2 = Leadership(2, NodeId(new.node_id))
    assert book.offer(held(plan_of(old, term=1, epoch=9), old), lead2).code == "STALE_TERM"
    assert book.next_epoch("m") == 3  # epochs continue across terms from the last accepted plan
    assert book.offer(held(plan_of(new, term=2, epoch=3), new), lead2).accepted
    assert book.current["m"].plan.coordinator == new.node_id
    # Another model's plan is independent.
    assert book.offer(held(plan_of(new, term=2, epoch=1, model="other"), new), lead2).accepted


def test_the_followed_coordinators_plan_replaces_another_coordinators_of_the_same_term() -> None:
    """Two peers that were alone at start each elected themselves in term 1 and planned epoch 1; once both
    follow ``a``, a's plan replaces b's own (seen in the in-process mesh: each kept its own plan)."""
    a, b = Identity.generate(), Identity.generate()
    book = PlanBook()
    assert book.offer(held(plan_of(b, term=1, epoch=1), b), Leadership(1, NodeId(b.node_id))).accepted
    follow_a = Leadership(1, NodeId(a.node_id))
    v = book.offer(held(plan_of(a, term=1, epoch=1), a), follow_a)
    assert v.accepted and book.current["m"].plan.coordinator == a.node_id
    assert book.offer(held(plan_of(b, term=1, epoch=2), b), follow_a).code == "NOT_COORDINATOR"
    assert book.offer(held(plan_of(a, term=1, epoch=1), a), follow_a).code == "DUPLICATE"


def test_a_plan_that_outruns_its_coordinators_claim_is_kept_until_the_claim_arrives() -> None:
    old, new = Identity.generate(), Identity.generate()
    book = PlanBook()
    lead1 = Leadership(1, NodeId(old.node_id))
    book.offer(held(plan_of(old, term=1, epoch=1), old), lead1)
    early = held(plan_of(new, term=2, epoch=2), new)
    assert book.offer(early, lead1).code == "PENDING"
    assert book.current["m"].plan.term == 1
    assert book.retry(lead1) == []
    ((_, verdict),) = book.retry(Leadership(2, NodeId(new.node_id)))
    assert verdict.accepted and book.current["m"] == early and not book.pending
    # A flood of future-term plans for made-up models stays bounded.
    for i in range(500):
        book.offer(held(plan_of(new, term=9, epoch=1, model=f"junk{i}"), new), Leadership(2, NodeId(new.node_id)))
    assert len(book.pending) == MAX_PENDING and set(book.current) == {"m"} and set(book.max_epoch) == {"m"}


# ---- the controller ------------------------------------------------------------------------------


def run_plan(ctl: Controller, book: PlanBook, ident: Identity, ws: list[Worker], term: int = 1) -> Plan | None:
    """One coordinator tick: decide, and accept the decision as the next epoch (what the service does)."""
    cur = book.current.get("m")
    d = ctl.decide("m", LAYERS, ws, cur.plan if cur else None, term)
    if d is None:
        return None
    plan = make_plan(LAYERS, d.peers, d.split, model="m", revision="r1", term=term, epoch=book.next_epoch("m"),
                     coordinator=ident.node_id, reason=d.reason, reassigned=d.reassigned)
    assert book.offer(held(plan, ident), Leadership(term, NodeId(ident.node_id))).accepted
    return plan


def covers_every_layer_once(plan: Plan) -> bool:
    return [a.start for a in plan.assignments] == [0, *(a.end for a in plan.assignments[:-1])] and \
        plan.assignments[-1].end == len(LAYERS)


def test_losing_a_peer_moves_only_its_range_and_bumps_the_epoch() -> None:
    ident, ctl, book = Identity.generate(), Controller(objective="throughput"), PlanBook()
    ws = workers(4)
    first = run_plan(ctl, book, ident, ws)
    assert first is not None and len(first.assignments) == 4 and first.epoch == 1
    assert run_plan(ctl, book, ident, ws) is None  # nothing changed: no new epoch
    # A spare joins: a fresh plan would not beat the current one by 25%: kept.
    ws.append(Worker("spare", 1e10, 1000, S.READY))
    assert run_plan(ctl, book, ident, ws) is None
    # One peer misses beats (degraded): it keeps its range, nothing moves.
    victim = first.assignments[1]
    ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.DEGRADED if w.node_id == victim.node else w.status)
          for w in ws]
    assert run_plan(ctl, book, ident, ws) is None
    # It goes offline: its range goes to the spare, every other range stays.
    ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.OFFLINE if w.node_id == victim.node else S.READY)
          for w in ws]
    second = run_plan(ctl, book, ident, ws)
    assert second is not None and second.epoch == 2 and second.reason == "reassign"
    assert second.reassigned == ("spare",)
    before = {a.span for a in first.assignments if a.node != victim.node}
    assert before | {Span("spare", victim.start, victim.end)} == set(second.spans())
    assert covers_every_layer_once(second)


def test_a_draining_peer_is_replaced_and_a_growing_bottleneck_forces_a_replan() -> None:
    ident, ctl, book = Identity.generate(), Controller(objective="throughput"), PlanBook()
    ws = workers(4, memory=10_000)
    first = run_plan(ctl, book, ident, ws)
    assert first is not None and len(first.assignments) == 4
    # No spare: a neighbour would double its stage (+100% > 25%) → a full replan over the three left.
    gone = first.assignments[3].node
    ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.DRAINING if w.node_id == gone else S.READY) for w in ws]
    second = run_plan(ctl, book, ident, ws)
    assert second is not None and second.reason == "replan" and second.epoch == 2
    assert gone not in {a.node for a in second.assignments} and len(second.assignments) == 3
    assert covers_every_layer_once(second)


def test_a_new_term_reissues_the_same_assignments_and_joins_improve_only_past_the_threshold() -> None:
    old, new = Identity.generate(), Identity.generate()
    book = PlanBook()
    ws = workers(2)
    first = run_plan(Controller(objective="throughput"), book, old, ws, term=1)
    assert first is not None
    ctl = Controller(objective="throughput")  # the new coordinator's controller, with the old plan in its book
    again = run_plan(ctl, book, new, ws, term=2)
    assert again is not None and again.reason == "term" and again.spans() == first.spans()
    assert (again.term, again.epoch) == (2, 2)
    # Two peers 4x faster join: the fresh plan more than halves the bottleneck → adopted.
    ws += workers(2, flops=4e10, prefix="fast")
    better = run_plan(ctl, book, new, ws, term=2)
    assert better is not None and better.reason == "improve" and better.bottleneck_s < again.bottleneck_s / 1.25
    assert run_plan(ctl, book, new, ws, term=2) is None  # and then it stays put


def test_a_mesh_too_small_for_the_model_is_an_error_naming_the_shortfall() -> None:
    ctl = Controller(objective="throughput")
    with pytest.raises(PlanInfeasible, match="the model needs 1600 bytes, the peers offer 1000 bytes: 600 bytes short"):
        ctl.decide("m", LAYERS, workers(2, memory=500), None, 1)
    # Peers that do not accept jobs, or are still registering, are not given work.
    ws = [Worker("a", 1e10, 10_000, S.READY, accepts_jobs=False), Worker("b", 1e10, 10_000, S.REGISTERING)]
    with pytest.raises(PlanInfeasible, match="no peer can take layers"):
        ctl.decide("m", LAYERS, ws, None, 1)


def test_pipeline_order_search_is_never_worse_than_the_given_order() -> None:
    rng = random.Random(7)
    for _ in range(50):
        peers = [Worker(f"p{i}", rng.uniform(1e9, 1e11), rng.randint(200, 2000), S.READY).peer(LAYERS)
                 for i in range(rng.randint(2, 8))]
        try:
            given_order = plan_split(LAYERS, peers)
        except PlanInfeasible:
            continue
        assert best_split(LAYERS, peers).bottleneck_s <= given_order.bottleneck_s * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 40), st.integers(0, 2**32 - 1))
def test_many_simulated_peers_dropping_keeps_every_layer_covered_by_live_peers(n: int, seed: int) -> None:
    rng = random.Random(seed)
    ident, ctl, book = Identity.generate(), Controller(objective="throughput"), PlanBook()
    ws = [Worker(f"p{i:02d}", rng.uniform(1e9, 1e11), rng.randint(100, 1000), S.READY) for i in range(n)]
    try:
        plan = run_plan(ctl, book, ident, ws)
    except PlanInfeasible:
        return
    assert plan is not None
    for _ in range(3):  # peers of the plan drop, one round at a time
        in_plan = [a.node for a in plan.assignments]
        dead = set(rng.sample(in_plan, rng.randint(1, max(1, len(in_plan) // 2))))
        ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.OFFLINE if w.node_id in dead else w.status) for w in ws]
        try:
            nxt = run_plan(ctl, book, ident, ws)
        except PlanInfeasible:
            return  # the survivors cannot hold the model: an error, the old plan is kept
        assert nxt is not None and nxt.epoch == plan.epoch + 1
        alive = {w.node_id: w for w in ws if w.status != S.OFFLINE}
        assert covers_every_layer_once(nxt) and all(a.node in alive for a in nxt.assignments)
        assert all(a.memory_bytes <= alive[a.node].memory_bytes for a in nxt.assignments)
        if nxt.reason == "reassign":  # a patch keeps every surviving range (possibly extended)
            for a in plan.assignments:
                if a.node not in dead:
                    (b,) = [b for b in nxt.assignments if b.node == a.node]
                    assert b.start <= a.start and b.end >= a.end
        plan = nxt


def test_numbers_too_big_for_a_float_are_refused_not_raised() -> None:
    ident = Identity.generate()
    raw = cbor2.loads(encode_plan(plan_of(ident)))
    for change in (lambda d: d.__setitem__("bottleneck_s", 2**2000), lambda d: d.__setitem__("issued_at", -(2**2000)),
                   lambda d: d["assignments"][0].__setitem__(4, 2**2000),
                   lambda d: d["nodes"][0].__setitem__(1, 2**2000)):
        bad = cbor2.loads(cbor2.dumps(raw))
        change(bad)
        with pytest.raises(PeerError) as err:
            open_plan(seal(PLAN, cbor2.dumps(bad), ident))
        assert err.value.code == "MALFORMED_MESSAGE"
    from mesh.wire import NodeInfo, decode_node_info, encode_node_info
    info = cbor2.loads(encode_node_info(NodeInfo(node_id=NodeId(ident.node_id), incarnation=1, seq=1,
                                                 status=S.READY, version="x")))
    info["compute_flops"] = 2**2000
    with pytest.raises(PeerError) as err:
        decode_node_info(cbor2.dumps(info))
    assert err.value.code == "MALFORMED_MESSAGE"


def test_pending_plans_wait_for_the_claim_and_a_rogue_cannot_push_them_out() -> None:
    real, rogue = Identity.generate(), Identity.generate()
    book = PlanBook()
    # Term 3 is known (from followers' heartbeats) but its coordinator's claim has not arrived yet.
    assert book.offer(held(plan_of(real, term=3, epoch=1), real), Leadership(3, None)).code == "PENDING"
    assert book.offer(held(plan_of(rogue, term=99, epoch=9), rogue), Leadership(3, None)).code == "PENDING"
    ((plan, verdict),) = book.retry(Leadership(3, NodeId(real.node_id)))
    assert verdict.accepted and plan.coordinator == real.node_id
    assert book.current["m"].plan.coordinator == real.node_id
    # The rogue's far-future plan stays aside (bounded) and is dropped once term 99 goes to someone else.
    assert book.retry(Leadership(99, NodeId(real.node_id))) == [] and not book.pending


def test_survivors_that_may_not_take_work_keep_their_range_and_get_no_more() -> None:
    ident, ctl, book = Identity.generate(), Controller(objective="throughput"), PlanBook()
    ws = workers(3, memory=10_000)
    first = run_plan(ctl, book, ident, ws)
    assert first is not None and len(first.assignments) == 3
    a, b, c = (x.node for x in first.assignments)
    spare = Worker("spare", 1e10, 10_000, S.READY)
    # a dies; b missed beats (degraded) and c stopped accepting jobs: the spare takes a's range.
    ws = [Worker(a, 1e10, 10_000, S.OFFLINE), Worker(b, 1e10, 10_000, S.DEGRADED),
          Worker(c, 1e10, 10_000, S.READY, accepts_jobs=False), spare]
    nxt = run_plan(ctl, book, ident, ws)
    assert nxt is not None and nxt.reassigned == ("spare",)
    assert set(nxt.spans()) == {Span("spare", 0, first.assignments[0].end), *first.spans()[1:]}
    # A peer reporting a vanishing FLOP/s score is never given work.
    assert not Worker("zero", 1e-300, 10_000, S.READY).usable


def test_one_plan_per_model_id() -> None:
    from mesh.ids import keep_ref

    specs: list[str] = []
    for spec in ("tiny@r1", "other", "tiny@r2", "tiny"):
        specs = keep_ref(specs, spec)
    assert specs == ["other", "tiny"]


def test_seed_splits_become_spans_of_layer_positions_or_a_clear_error() -> None:
    from coordinator.service import parse_splits

    layers = [Layer(i, 1.0, 10) for i in (2, 3, 4, 5)]  # indices need not start at 0: positions do

    def split(node: str, start: int, end: int) -> dict:
        return {"layer_range": [start, end], "assigned_node": node}

    assert parse_splits([split("a", 2, 4), split("b", 4, 6)], layers) == [Span("a", 0, 2), Span("b", 2, 4)]
    for raw, message in [(5, "non-empty list"), ([], "non-empty list"),
                         ([{"layer_range": [2, 6]}], "need assigned_node"),
                         ([split("a", 2, 9)], "outside the model's layers"),
                         ([split("a", 2, 4)], "cover 2 layers, not 4"),
                         ([split("a", 2, 4), split("b", 5, 6)], "gap"),
                         ([split("a", 2, 4), split("a", 4, 6)], "appears twice")]:
        with pytest.raises(PeerError, match=message) as err:
            parse_splits(raw, layers)
        assert err.value.code == "INVALID_PLAN_INPUT"


def test_latency_plans_one_stage_on_the_holder_and_a_join_of_an_equal_peer_changes_nothing() -> None:
    ident, ctl, book = Identity.generate(), Controller(), PlanBook()
    assert ctl.objective == "latency"  # the default: one user's token time
    ws = [Worker(f"w{i:02d}", 1e10, 2000, S.READY, link_s=0.001, holds_model=i == 2) for i in range(4)]
    first = run_plan(ctl, book, ident, ws)
    # The model fits every peer: one stage (no hop), on the peer that already has the layers on disk.
    assert first is not None and [(a.node, a.start, a.end) for a in first.assignments] == [("w02", 0, 16)]
    ws.append(Worker("spare", 1e10, 2000, S.READY, link_s=0.001))
    assert run_plan(ctl, book, ident, ws) is None  # an equal peer cannot cut one token's time
    # Memory for half the model each: two stages, each peer's range within its memory.
    small = Controller()
    d = small.decide("m", LAYERS, workers(4, memory=800), None, 1)
    assert d is not None and len(d.split.stages) == 2 and d.why["objective"] == "latency" and d.why["exact"]
    assert all(s.bytes <= 800 for s in d.split.stages)


def test_a_faster_peer_joining_improves_the_latency_plan_and_the_why_says_so() -> None:
    ident, ctl, book = Identity.generate(), Controller(), PlanBook()
    ws = workers(2, memory=2000)
    assert run_plan(ctl, book, ident, ws) is not None
    ws.append(Worker("fast", 4e10, 2000, S.READY))  # 4x the FLOP/s: one token in a quarter of the time
    d = ctl.decide("m", LAYERS, ws, book.current["m"].plan, 1)
    assert d is not None and d.reason == "improve" and [s.node for s in d.split.stages] == ["fast"]
    assert d.why["bound"] == "peer fast" and d.why["runner_up_ms"] > d.why["ms_per_token"]


def test_replicas_are_planned_on_the_peers_left_round_trip_and_a_broken_first_pipeline_promotes_one() -> None:
    ident, book = Identity.generate(), PlanBook()
    ctl = Controller(replicas=0)  # auto: as many pipelines as fit
    ws = [Worker(f"w{i:02d}", 1e10, 1000, S.READY, link_s=0.001) for i in range(5)]  # each holds 10 of 16 layers
    d = ctl.decide("m", LAYERS, ws, None, 1)
    assert d is not None and len(d.split.stages) == 2 and len(d.replicas) == 1  # 2 + 2 peers; 1 left over
    plan = make_plan(LAYERS, d.peers, d.split, model="m", revision="r1", term=1, epoch=1,
                     coordinator=ident.node_id, reason=d.reason, replicas=d.replicas)
    nodes = [a.node for p in plan.pipelines for a in p]
    assert len(nodes) == len(set(nodes)) == 4
    assert {a.fallback for a in plan.assignments} <= {w.node_id for w in ws} - set(nodes)  # fallbacks are free
    got = open_plan(seal_plan(plan, ident))
    assert got.replicas == plan.replicas and len(got.view()["replicas"]) == 2
    twice = dataclasses.replace(plan, replicas=(plan.assignments,))  # a peer in two pipelines
    with pytest.raises(PeerError) as err:
        open_plan(seal_plan(twice, ident))
    assert err.value.code == "MALFORMED_MESSAGE"
    assert book.offer(held(plan, ident), Leadership(1, NodeId(ident.node_id))).accepted
    # A peer of the first pipeline dies: the replica (loaded already) becomes the first pipeline at once.
    dead = plan.assignments[0].node
    ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.OFFLINE if w.node_id == dead else S.READY, link_s=0.001)
          for w in ws]
    d2 = ctl.decide("m", LAYERS, ws, plan, 1)
    assert d2 is not None and d2.reason == "promote"
    assert [(s.node, s.start, s.end) for s in d2.split.stages] == [
        (s.node, s.start, s.end) for s in plan.split(LAYERS, 1).stages]
    # ... and the free peers (the broken pipeline's survivor, the one left over) refill a replica in the same step
    free = {w.node_id for w in ws} - {dead} - {a.node for a in plan.replicas[0]}
    assert len(d2.replicas) == 1 and {s.node for s in d2.replicas[0].stages} == free
    # A peer of a replica dies instead: the replica goes, the first pipeline stays as it is.
    gone = plan.replicas[0][0].node
    ws = [Worker(w.node_id, w.flops, w.memory_bytes, S.OFFLINE if w.node_id == gone else S.READY, link_s=0.001)
          for w in ws]
    d3 = ctl.decide("m", LAYERS, ws, plan, 1)
    assert d3 is not None and d3.reason == "replica" and d3.split.stages == plan.split(LAYERS).stages
    assert all(gone not in {s.node for s in r.stages} for r in d3.replicas)

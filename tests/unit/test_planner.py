"""The planner, property-tested: every layer once, contiguous and ordered, memory never exceeded, and the
bottleneck equal to a brute-force optimum on small random cases; never worse than the greedy baseline."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.planner import (
    Layer,
    Peer,
    PlanInfeasible,
    Split,
    brute_force,
    greedy_by_compute,
    parse_layers,
    parse_peers,
    plan_split,
    reassign,
    split_by_memory,
    split_of,
)
from mesh.errors import PeerError
from mesh.ids import Span

layers_st = st.lists(st.tuples(st.floats(1.0, 100.0), st.integers(1, 50)), min_size=1, max_size=8).map(
    lambda xs: [Layer(i, f, b) for i, (f, b) in enumerate(xs)])
peers_st = st.lists(
    st.tuples(st.floats(1.0, 50.0), st.integers(10, 300), st.sampled_from([0.0, 0.0, 0.5, 2.0])),
    min_size=1, max_size=4,
).map(lambda xs: [Peer(f"p{i}", f, m, link) for i, (f, m, link) in enumerate(xs)])


def check_valid(layers: list[Layer], peers: list[Peer], split: Split) -> None:
    by_id = {p.node_id: p for p in peers}
    pos = 0
    order = [p.node_id for p in peers]
    used = [s.node for s in split.stages]
    assert len(set(used)) == len(used), "a peer has two ranges"
    assert [u for u in order if u in used] == used, "stages are not in pipeline order"
    for s in split.stages:
        assert s.start == pos and s.end > s.start, "ranges are not contiguous"
        assert s.bytes == sum(x.bytes for x in layers[s.start:s.end]) <= by_id[s.node].memory_bytes
        pos = s.end
    assert pos == len(layers), "not every layer is assigned"
    assert split.bottleneck_s == max(s.time_s for s in split.stages)


@settings(max_examples=300, deadline=None)
@given(layers_st, peers_st)
def test_plan_is_valid_and_equals_the_brute_force_optimum(layers: list[Layer], peers: list[Peer]) -> None:
    optimum = brute_force(layers, peers)
    try:
        split = plan_split(layers, peers)
    except PlanInfeasible:
        assert optimum == float("inf")
        return
    check_valid(layers, peers, split)
    assert split.bottleneck_s == pytest.approx(optimum, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(layers_st, peers_st, st.data())
def test_held_layers_win_ties_without_costing_bottleneck(layers: list[Layer], peers: list[Peer],
                                                        data: st.DataObject) -> None:
    held = [frozenset(data.draw(st.sets(st.integers(0, len(layers) - 1)))) for _ in peers]
    holders = [Peer(p.node_id, p.flops, p.memory_bytes, p.link_s, h) for p, h in zip(peers, held, strict=True)]
    try:
        plain = plan_split(layers, peers)
    except PlanInfeasible:
        return
    tied = plan_split(layers, holders)
    check_valid(layers, holders, tied)
    assert tied.bottleneck_s == pytest.approx(plain.bottleneck_s, rel=1e-9)

    def kept(split: Split) -> int:
        return sum(len(h & set(range(s.start, s.end))) for s in split.stages
                   for p, h in zip(peers, held, strict=True) if p.node_id == s.node)

    assert kept(tied) >= kept(plain)


def test_slow_peers_are_left_out_when_they_would_not_help() -> None:
    layers = [Layer(i, 10.0, 1) for i in range(8)]
    peers = [Peer("fast", 100.0, 100), Peer("slow", 1.0, 100), Peer("fast2", 100.0, 100)]
    split = plan_split(layers, peers)
    assert [s.node for s in split.stages] == ["fast", "fast2"]
    assert split.bottleneck_s == pytest.approx(0.4)


def test_infeasible_meshes_name_the_shortfall() -> None:
    layers = [Layer(i, 1.0, 100 * 2**20) for i in range(4)]
    with pytest.raises(PlanInfeasible, match=r"needs 400\.0 MiB, the peers offer 300\.0 MiB: 100\.0 MiB short"):
        plan_split(layers, [Peer("a", 1.0, 150 * 2**20), Peer("b", 1.0, 150 * 2**20)])
    with pytest.raises(PlanInfeasible, match=r"layer 0 needs 100\.0 MiB; the largest peer offers 90\.0"):
        plan_split(layers, [Peer(str(i), 1.0, 90 * 2**20) for i in range(6)])
    with pytest.raises(PlanInfeasible, match="no peer can take layers"):
        plan_split(layers, [Peer("a", 0.0, 2**40)])
    with pytest.raises(PlanInfeasible, match="in pipeline order"):  # enough in total, not in this order
        plan_split([Layer(0, 1.0, 50), Layer(1, 1.0, 50), Layer(2, 1.0, 10), Layer(3, 1.0, 10)],
                   [Peer("a", 1.0, 20), Peer("b", 1.0, 100)])


def test_against_the_greedy_baseline_on_heterogeneous_meshes() -> None:
    """Never worse than the greedy compute-proportional split, usually better; the ratio is reported."""
    rng = random.Random(7)
    ratios, better = [], 0
    for _ in range(200):
        layers = [Layer(i, rng.uniform(1, 3) * 1e9, rng.randint(50, 150) * 2**20) for i in range(32)]
        peers = [Peer(f"p{i}", rng.choice([1, 2, 5, 20, 50]) * 1e9, rng.randint(1, 4) * 2**30,
                      rng.choice([0.0, 0.002, 0.01])) for i in range(rng.randint(2, 8))]
        try:
            greedy = greedy_by_compute(layers, peers)
        except PlanInfeasible:
            continue
        ours = plan_split(layers, peers)
        assert ours.bottleneck_s <= greedy.bottleneck_s * (1 + 1e-9)
        better += ours.bottleneck_s < greedy.bottleneck_s * (1 - 1e-6)
        ratios.append(greedy.bottleneck_s / ours.bottleneck_s)
        memory = split_by_memory(layers, peers) if sum(p.memory_bytes for p in peers) else None
        if memory is not None:
            assert ours.bottleneck_s <= memory.bottleneck_s * (1 + 1e-9)
    assert len(ratios) > 100 and better > len(ratios) / 2
    print(f"greedy/optimal bottleneck over {len(ratios)} meshes: mean {sum(ratios) / len(ratios):.2f}, "
          f"max {max(ratios):.2f}; strictly better in {better}")


def test_meshnode_plan_prints_the_plan_or_fails_clearly(tmp_path, capsys) -> None:
    import json

    from coordinator import search
    from mesh.app.cli import main

    layers = [{"index": i, "flops_per_token": 1e9, "bytes": 100 * 2**20} for i in range(6)]
    nodes = [{"node_id": "a", "flops": 1e10, "memory_bytes": 2**30, "link_ms": 2.0},
             {"node_id": "b", "flops": 3e10, "memory_bytes": 2**30},
             {"node_id": "c", "flops": 1e10, "memory_bytes": 2**30}]
    (tmp_path / "l.json").write_text(json.dumps(layers))
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    files = ["--layers", str(tmp_path / "l.json"), "--nodes", str(tmp_path / "n.json")]
    assert main(["plan", *files, "--objective", "throughput"]) == 0
    plan = json.loads(capsys.readouterr().out)
    splits = plan["model_split_plan"]["splits"]
    covered = [i for s in splits for i in range(*s["layer_range"])]
    assert covered == list(range(6))
    expected = search.plan(parse_layers(layers), parse_peers(nodes), objective="throughput").bottleneck_s
    assert plan["model_split_plan"]["bottleneck_s"] == pytest.approx(expected)
    assert expected <= plan_split(parse_layers(layers), parse_peers(nodes)).bottleneck_s  # any order: no worse
    assert all(f["node_id"] for f in plan["fallback_nodes"]) and len(plan["fallback_nodes"]) == len(splits)
    assert plan["why"]["objective"] == "throughput" and plan["why"]["exact"] is True
    # latency (the default): the model fits b, the fastest, so one stage; a measured link matrix is taken
    (tmp_path / "links.json").write_text(json.dumps({"a": {"b": 0.5}, "b": {"c": 0.25}}))
    assert main(["plan", *files, "--links", str(tmp_path / "links.json")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["assigned_node"] for s in plan["model_split_plan"]["splits"]] == ["b"]
    assert plan["why"]["objective"] == "latency" and plan["why"]["stages"] == 1
    # --replicas: every peer can hold the model alone; auto adds none here (a and c would take 3x b's time per
    # token, past AUTO_REPLICA_COST), 3 asks for all three one-stage pipelines, b's first
    assert main(["plan", *files, "--replicas", "auto"]) == 0
    assert len(json.loads(capsys.readouterr().out)["replicas"]) == 1
    assert main(["plan", *files, "--replicas", "3"]) == 0
    pipelines = json.loads(capsys.readouterr().out)["replicas"]
    assert [[s["assigned_node"] for s in p["splits"]] for p in pipelines] == [["b"], ["a"], ["c"]]
    with pytest.raises(SystemExit):
        main(["plan", *files, "--replicas", "0"])
    capsys.readouterr()
    (tmp_path / "links.json").write_text(json.dumps({"a": {"zz": 1.0}}))
    assert main(["plan", *files, "--links", str(tmp_path / "links.json")]) == 2
    assert "INVALID_PLAN_INPUT" in capsys.readouterr().err
    # Infeasible: non-zero exit and the shortfall on stderr; bad input: a code.
    nodes[0]["memory_bytes"] = nodes[1]["memory_bytes"] = nodes[2]["memory_bytes"] = 100 * 2**20
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    assert main(["plan", "--layers", str(tmp_path / "l.json"), "--nodes", str(tmp_path / "n.json")]) == 2
    assert "PLAN_INFEASIBLE" in capsys.readouterr().err
    (tmp_path / "n.json").write_text('[{"node_id": "a", "flops": "fast", "memory_bytes": 1}]')
    assert main(["plan", "--layers", str(tmp_path / "l.json"), "--nodes", str(tmp_path / "n.json")]) == 2
    assert "INVALID_PLAN_INPUT" in capsys.readouterr().err



def four_peer_plan() -> tuple[list[Layer], list[Peer], Split]:
    layers = [Layer(i, 1e9, 100) for i in range(16)]
    peers = [Peer(f"p{i}", 1e10, 1000) for i in range(4)] + [Peer("spare", 1e10, 1000)]
    split = plan_split(layers, peers[:4])
    assert len(split.stages) == 4
    return layers, peers, split


def test_losing_one_peer_moves_only_its_range() -> None:
    layers, peers, split = four_peer_plan()
    lost = split.stages[1]
    out = reassign(layers, peers, split, {lost.node})
    assert not out.replanned and out.reassigned == ("spare",)
    by_id = {q.node_id: q for q in peers}
    check_valid(layers, [by_id[s.node] for s in out.split.stages], out.split)
    before = {(s.node, s.start, s.end) for s in split.stages if s.node != lost.node}
    after = {(s.node, s.start, s.end) for s in out.split.stages}
    assert before <= after and ("spare", lost.start, lost.end) in after
    assert out.split.bottleneck_s == pytest.approx(split.bottleneck_s)


def test_without_a_spare_a_neighbour_extends_unless_the_threshold_forces_a_replan() -> None:
    layers, peers, split = four_peer_plan()
    big = [Peer(q.node_id, q.flops, 10_000) for q in peers[:4]]  # room to absorb a neighbour's range
    lost = split.stages[3].node
    # Absorbing doubles a stage: +100% > 25% → a full replan over the three survivors.
    out = reassign(layers, big, split, {lost})
    assert out.replanned and {s.node for s in out.split.stages} <= {"p0", "p1", "p2"}
    assert sum(s.end - s.start for s in out.split.stages) == 16
    # With a 150% threshold the patch stands: p2 extends over the lost range, the others keep theirs.
    out = reassign(layers, big, split, {lost}, threshold=1.5)
    assert not out.replanned and out.reassigned == ("p2",)
    assert [(s.node, s.start, s.end) for s in out.split.stages] == [
        *[(s.node, s.start, s.end) for s in split.stages[:2]], ("p2", split.stages[2].start, 16)]


def test_reassignment_that_cannot_fit_names_the_shortfall() -> None:
    layers, peers, split = four_peer_plan()
    with pytest.raises(PlanInfeasible, match="needs 1600 bytes, the peers offer 1000 bytes: 600 bytes short"):
        reassign(layers, peers[:4], split, {"p0", "p1", "p2"})


@settings(max_examples=200, deadline=None)
@given(layers_st, peers_st, st.data())
def test_reassignment_always_covers_every_layer_once(layers: list[Layer], peers: list[Peer],
                                                     data: st.DataObject) -> None:
    try:
        split = plan_split(layers, peers)
    except PlanInfeasible:
        return
    used = [s.node for s in split.stages]
    failed = set(data.draw(st.lists(st.sampled_from(used), min_size=1, unique=True)))
    try:
        out = reassign(layers, peers, split, failed)
    except PlanInfeasible:
        return  # what survives cannot hold the model: an error, never a partial plan
    by_id = {q.node_id: q for q in peers}
    assert not failed & {s.node for s in out.split.stages}
    check_valid(layers, [by_id[s.node] for s in out.split.stages], out.split)
    if not out.replanned:  # a patch keeps every surviving assignment (possibly extended)
        for s in split.stages:
            if s.node not in failed:
                (t,) = [t for t in out.split.stages if t.node == s.node]
                assert t.start <= s.start and t.end >= s.end


def test_a_patch_stands_when_a_full_replan_does_not_fit_in_order() -> None:
    """p1 drops; the patch (p3 takes its range) doubles the bottleneck, past the threshold, but the
    survivors in this order have no plan of their own: the patch is kept rather than giving up."""
    layers = [Layer(i, 1.0, b) for i, b in enumerate([3, 5, 5, 5, 4])]
    peers = [Peer("p0", 1.0, 4), Peer("p1", 2.0, 10), Peer("p2", 2.0, 9), Peer("p3", 1.0, 12)]
    split = plan_split(layers, peers)
    assert [s.node for s in split.stages] == ["p0", "p1", "p2"]
    with pytest.raises(PlanInfeasible):
        plan_split(layers, [q for q in peers if q.node_id != "p1"])
    out = reassign(layers, peers, split, {"p1"}, threshold=0.0)
    assert not out.replanned and out.reassigned == ("p3",)
    assert [(s.node, s.start, s.end) for s in out.split.stages] == [("p0", 0, 1), ("p3", 1, 3), ("p2", 3, 5)]


def test_fixed_survivors_keep_their_range_but_take_no_more() -> None:
    layers, peers, split = four_peer_plan()
    big = [Peer(q.node_id, q.flops, 10_000) for q in peers]
    lost, last = split.stages[1], split.stages[3].node
    neighbours = {split.stages[0].node, split.stages[2].node}
    # Neighbours that may not grow: the free spare takes the lost range, the rest stays as it was.
    out = reassign(layers, big, split, {lost.node}, fixed=neighbours)
    assert not out.replanned and out.reassigned == ("spare",)
    assert {(s.node, s.start, s.end) for s in out.split.stages} == (
        {(s.node, s.start, s.end) for s in split.stages if s is not lost} | {("spare", lost.start, lost.end)})
    # The spare may not take work either: no patch, and the replan uses only the peer free to work.
    out = reassign(layers, big, split, {lost.node}, fixed=neighbours | {"spare"})
    assert out.replanned and [s.node for s in out.split.stages] == [last]


def test_degenerate_inputs_end_quickly_with_an_answer() -> None:
    # Zero-FLOP layers and no hop cost: the bound starts at 0 and must still grow (no endless loop).
    with pytest.raises(PlanInfeasible, match="in pipeline order"):
        plan_split([Layer(0, 0.0, 50), Layer(1, 0.0, 50), Layer(2, 0.0, 10)], [Peer("a", 1.0, 20), Peer("b", 1.0, 100)])
    assert plan_split([Layer(0, 0.0, 5)], [Peer("a", 1.0, 10)]).bottleneck_s == 0.0
    # A peer with a vanishing score whose memory is needed: infeasible, never an infinite stage time.
    with pytest.raises(PlanInfeasible):
        plan_split([Layer(0, 1.0, 10), Layer(1, 1.0, 10)], [Peer("a", 1.0, 10), Peer("b", 1e-320, 10)])


def test_stages_are_spans_and_split_of_takes_only_a_pipeline() -> None:
    layers = [Layer(i, 1.0, 1) for i in range(4)]
    a, b = Peer("a", 1.0, 10), Peer("b", 2.0, 10)
    split = split_of(layers, [(a, 0, 1), (b, 1, 4)])
    assert [s.span for s in split.stages] == [Span("a", 0, 1), Span("b", 1, 4)]
    assert all(isinstance(s, Span) and s.span == Span(s.node, s.start, s.end) for s in split.stages)
    assert split.bottleneck_s == 1.5
    for bad, message in [([(a, 0, 1), (b, 2, 4)], "gap"), ([(a, 0, 2), (b, 1, 4)], "overlaps"),
                         ([(a, 1, 4)], "start at layer 0"), ([(a, 0, 1), (b, 1, 3)], "cover 3 layers, not 4"),
                         ([(a, 0, 2), (a, 2, 4)], "appears twice"), ([(a, 0, 0), (b, 0, 4)], "empty"), ([], "least")]:
        with pytest.raises(PeerError, match=message) as err:
            split_of(layers, bad)
        assert err.value.code == "INVALID_PLAN_INPUT"


def test_a_compute_claim_counts_for_at_most_twice_the_best_other_per_core_claim() -> None:
    from coordinator.control import CLAIM_CAP, capped_claims

    honest = {"a": (8e10, 8), "b": (4e10, 4), "c": (1e10, 2)}
    assert capped_claims(honest) == {k: v[0] for k, v in honest.items()}  # within 2x of one another per core
    liar = capped_claims({**honest, "x": (1e15, 4)})  # claims 25,000x the best per-core compute
    assert liar["x"] == CLAIM_CAP * 1e10 * 4 and {k: liar[k] for k in honest} == {k: v[0] for k, v in honest.items()}
    assert capped_claims({"alone": (1e15, 1)}) == {"alone": 1e15}  # nobody to compare with
    pair = capped_claims({"p": (1e12, 1), "q": (1e10, 1)})
    assert pair == {"p": 2e10, "q": 1e10}

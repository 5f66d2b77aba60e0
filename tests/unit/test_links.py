"""The link table a peer keeps of its round trips: whom it pings, how it smooths, what it gossips."""

from __future__ import annotations

from mesh.ids import NodeId
from mesh.links import ALPHA, LinkTable
from mesh.wire import MAX_LINKS

PEERS = [NodeId(f"p{i:02d}") for i in range(20)]


def test_each_round_pings_the_least_recently_pinged_so_every_peer_gets_its_turn() -> None:
    table = LinkTable()
    seen: list[NodeId] = []
    for round_ in range(5):
        chosen = table.due(PEERS, now=float(round_), per_round=8)
        assert len(chosen) == 8 and len(set(chosen)) == 8
        seen += chosen
    # 40 pings over 20 peers: every peer twice, never one three times before another once more
    assert sorted(seen.count(p) for p in PEERS) == [2] * 20
    newcomer = NodeId("p99")
    assert newcomer in table.due([*PEERS, newcomer], now=5.0, per_round=1)  # never pinged: first


def test_rtts_are_smoothed_and_a_failed_ping_forgets_the_link() -> None:
    table = LinkTable()
    table.observe(PEERS[0], 0.010)
    assert table.rtt_ms[PEERS[0]] == 10.0
    table.observe(PEERS[0], 0.040)  # one slow ping moves the estimate by ALPHA of the difference
    assert abs(table.rtt_ms[PEERS[0]] - (10.0 + ALPHA * 30.0)) < 1e-9
    table.failed(PEERS[0])
    assert PEERS[0] not in table.rtt_ms and table.nearest() == {}


def test_gossip_carries_the_nearest_links_only_and_departed_peers_are_dropped() -> None:
    table = LinkTable()
    for i, p in enumerate(PEERS):
        table.observe(p, (20 - i) / 1000)  # p19 is the nearest (1 ms), p00 the farthest (20 ms)
    near = table.nearest()
    assert len(near) == MAX_LINKS and set(near) == {str(p) for p in PEERS[-MAX_LINKS:]}
    assert near[str(PEERS[-1])] == 1.0
    table.keep_only(PEERS[:3])
    assert set(table.rtt_ms) == set(PEERS[:3])
    assert set(table.due(PEERS[:3], now=0.0, per_round=8)) == set(PEERS[:3])

"""Deterministic simulations of many peers driving the real PeerCore (no sockets, virtual time)."""

from __future__ import annotations

import pytest

from mesh.sim import SimMesh


def _join_all(mesh: SimMesh) -> None:
    order = list(range(mesh.size))
    mesh.rng.shuffle(order)
    for i in order:  # random order, random gaps
        mesh.start(i)
        mesh.run_for(mesh.rng.uniform(0.0, 0.2))


def _index_of(mesh: SimMesh, node_id: str) -> int:
    return next(p.index for p in mesh.peers if p.node_id == node_id)


@pytest.mark.parametrize("seed", [1, 2])
def test_fifty_peers_join_in_random_order_and_converge(seed: int) -> None:
    mesh = SimMesh(50, seed=seed)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    # Every peer holds the same table (same ids, all ready) and names the same coordinator and term.
    views = {tuple(m.node_id for m in p.core.membership.members()) for p in mesh.alive_peers()}
    assert len(views) == 1 and len(next(iter(views))) == 50
    terms = {p.core.leadership.term for p in mesh.alive_peers()}
    assert len(terms) == 1
    # It stays converged: no flapping over ten more heartbeats.
    for _ in range(10):
        mesh.run_for(1.0)
        assert mesh.converged()


def test_killing_the_coordinator_yields_exactly_one_new_coordinator() -> None:
    mesh = SimMesh(50, seed=3)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    (old,) = mesh.coordinators()
    old_term = mesh.alive_peers()[0].core.leadership.term
    mesh.kill(_index_of(mesh, old))
    took = mesh.run_until(lambda m: m.converged(), timeout=20)
    assert took is not None and took <= 5.0
    (new,) = mesh.coordinators()
    assert new != old
    assert mesh.claimants() == {new}
    assert {p.core.leadership.term for p in mesh.alive_peers()} == {old_term + 1}
    # Every survivor marked the dead coordinator offline.
    for p in mesh.alive_peers():
        assert p.core.membership.get(old).status.value == "offline"


def test_partition_30_20_gives_one_coordinator_per_side_then_one_after_healing() -> None:
    mesh = SimMesh(50, seed=4)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    (first,) = mesh.coordinators()
    first_index = _index_of(mesh, first)
    others = [i for i in range(50) if i != first_index]
    side_a = {first_index, *others[:29]}  # 30 peers, with the coordinator
    side_b = set(others[29:])  # 20 peers, without it
    mesh.partition(side_a, side_b)
    assert mesh.run_until(lambda m: m.converged(0) and m.converged(1), timeout=20) is not None
    (coord_a,) = mesh.coordinators(0)
    (coord_b,) = mesh.coordinators(1)
    assert coord_a == first  # the side that kept its coordinator kept it
    assert coord_b != coord_a
    mesh.heal()
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    assert len(mesh.coordinators()) == 1 and len(mesh.claimants()) == 1
    for _ in range(5):
        mesh.run_for(1.0)
        assert mesh.converged()


def test_a_draining_coordinator_hands_over() -> None:
    mesh = SimMesh(10, seed=5)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    (old,) = mesh.coordinators()
    core = mesh.peers[_index_of(mesh, old)].core
    core.drain(mesh.now)

    def handed_over(m: SimMesh) -> bool:
        return len(m.claimants()) == 1 and old not in m.claimants() and len(m.coordinators()) == 1

    assert mesh.run_until(handed_over, timeout=10) is not None
    for p in mesh.alive_peers():
        assert p.core.membership.get(old).status.value == "draining"


def test_a_restarted_peer_comes_back_ready() -> None:
    mesh = SimMesh(5, seed=6)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    victim = next(p for p in mesh.alive_peers() if p.node_id not in mesh.coordinators())
    mesh.kill(victim.index)
    assert mesh.run_until(lambda m: m.converged(), timeout=10) is not None
    mesh.start(victim.index)  # same key, new incarnation
    assert mesh.run_until(lambda m: m.converged(), timeout=10) is not None
    assert len(mesh.alive_peers()) == 5


def test_forged_and_malformed_gossip_is_rejected_and_the_mesh_stays_converged() -> None:
    import cbor2

    from mesh.identity import Identity
    from mesh.wire import NODE_INFO, NodeInfo, NodeStatus, encode_node_info, seal, seal_node_info

    mesh = SimMesh(10, seed=7)
    _join_all(mesh)
    assert mesh.run_until(lambda m: m.converged(), timeout=20) is not None
    (coord,) = mesh.coordinators()
    mallory = Identity.generate()
    # Mallory claims the coordinator's id and a huge term, to hijack the election.
    hijack = NodeInfo(node_id=coord, incarnation=2**40, seq=1, status=NodeStatus.READY, version="x",
                      term=10**6, coordinator=coord)
    own = NodeInfo(node_id=mallory.node_id, incarnation=1, seq=1, status=NodeStatus.READY, version="x")
    future = cbor2.loads(encode_node_info(own)) | {"capability_schema_version": "7.0"}
    bad_sig = cbor2.loads(seal_node_info(own, mallory)) | {"s": bytes(64)}
    for i in range(10):
        mesh.inject(i, seal_node_info(hijack, mallory))
        mesh.inject(i, seal(NODE_INFO, cbor2.dumps(future), mallory))
        mesh.inject(i, cbor2.dumps(bad_sig))
        mesh.inject(i, b"\x9f\x9f\x9f")
    codes = [code for _, code in mesh.rejected]
    for code in ("NODE_ID_CONFLICT", "INVALID_CAPABILITY_SCHEMA", "BAD_SIGNATURE", "MALFORMED_MESSAGE"):
        assert codes.count(code) == 10, (code, codes)
    mesh.run_for(3.0)
    assert mesh.converged() and mesh.coordinators() == {coord}
    assert {p.core.leadership.term for p in mesh.alive_peers()} == {1}

"""A closed mesh in one process (memory transport, virtual clock): a founder, members joined with invites, and
strangers — a peer of another mesh and an open one — that bootstrap to every member yet are never ready in a
member's view, never coordinator, and cannot open a manifest stream; a used-up and an expired invite are
refused with their codes; a revocation gossiped by one member makes every member drop the revoked peer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from mesh import admission as adm
from mesh import credential
from mesh.app.inproc import InProcessMesh
from mesh.config import Config
from mesh.errors import PeerError
from mesh.keyfile import load_or_create
from mesh.wire import NodeStatus
from storage.transfer import MANIFEST_PROTOCOL


def config() -> Config:
    c = Config()
    return dataclasses.replace(c, coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05, objective="throughput"))


def ready_view(peer) -> set[str]:
    return {m.node_id for m in peer.node.core.membership.members() if m.status == NodeStatus.READY} | {peer.node_id}


async def test_only_invited_peers_take_part_and_a_revoked_one_is_dropped(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with InProcessMesh(tmp_path, config()) as mesh:
        founder = credential.found(tmp_path / "a", load_or_create(tmp_path / "a"), trio.current_time())
        a = await mesh.start("a", membership=founder)
        invite = await a.node.gate.invite(ttl=600, uses=2, addrs=tuple(a.node.transport.addrs()))
        b = await mesh.start("b", membership=await mesh.join("b", invite))
        c = await mesh.start("c", membership=await mesh.join("c", invite))
        members = [a, b, c]
        ids = {p.node_id for p in members}
        await mesh.wait(lambda: all(ready_view(p) == ids for p in members), timeout=30, what="3 members ready")

        with pytest.raises(PeerError) as err:  # both uses spent
            await mesh.join("late", invite)
        assert err.value.code == "INVITE_USED_UP"
        short = await a.node.gate.invite(ttl=5, uses=3, addrs=tuple(a.node.transport.addrs()))
        await trio.sleep(6)
        with pytest.raises(PeerError) as err:
            await mesh.join("late", short)
        assert err.value.code == "INVITE_EXPIRED"

        # strangers bootstrap to every member: a peer that founded its own mesh, and an open one
        other = credential.found(tmp_path / "s", load_or_create(tmp_path / "s"), trio.current_time())
        s = await mesh.start("s", membership=other, flops=1e13)  # it would win any election
        o = await mesh.start("o", flops=1e13, open=True)
        await trio.sleep(20)
        for p in members:
            assert ready_view(p) == ids, p.name
            assert p.node.core.leadership.coordinator in ids
            assert s.node_id not in p.node.transport.connected_peers() or s.node_id not in p.node.gate.admitted
        with pytest.raises(PeerError):  # a stranger's stream is reset before any handler sees it
            async with o.node.transport.open_stream(a.node_id, MANIFEST_PROTOCOL) as stream:
                await stream.send_frame(b"\xa0")
                await stream.receive_frame(1024)

        # any member revokes b: within 10 s every member drops it, and b's heartbeats count no more
        await c.node.gate.revoke(b.node_id)
        await mesh.wait(lambda: all(not p.node.gate.roster.is_member(b.node_id) for p in (a, c)), timeout=10,
                        what="a and c to refuse b")
        await mesh.wait(lambda: b.node_id not in a.node.gate.admitted and b.node_id not in ready_view(a),
                        timeout=30, what="a to drop b")
        reloaded = credential.load(tmp_path / "a", load_or_create(tmp_path / "a"))
        assert reloaded is not None and not reloaded.roster.is_member(b.node_id)  # remembered across a restart
        with pytest.raises(PeerError) as err:
            await b.node.gate.invite(ttl=60, uses=1, addrs=())  # b learns it too: it cannot invite
        assert err.value.code == "REVOKED"


def test_gossip_counts_only_when_a_member_signed_it_and_an_admitted_peer_relayed_it(tmp_path: Path) -> None:
    from mesh.gate import Gate
    from mesh.identity import Identity
    from mesh.transport import GossipMessage
    from mesh.wire import seal

    founder, bob, stranger = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
    membership = credential.found(tmp_path, founder, 0.0)
    membership.roster.add_chain(adm.issue(membership.chain, founder, bob.node_id, 1.0))

    async def save() -> None:
        pass

    gate = Gate(membership, founder, network=None, clock=lambda: 0.0, save=save)  # type: ignore[arg-type]
    gate.admitted.add(bob.node_id)
    by_bob, by_stranger = seal("node_info", b"x", bob), seal("node_info", b"x", stranger)
    assert gate.accepts(GossipMessage(bob.node_id, bob.node_id, by_bob))
    assert not gate.accepts(GossipMessage(stranger.node_id, bob.node_id, by_stranger))  # signed by a stranger
    assert not gate.accepts(GossipMessage(bob.node_id, stranger.node_id, by_bob))  # relayed by a stranger
    membership.roster.revoke(adm.seal_revocation(adm.Revocation(membership.mesh, bob.node_id, founder.node_id, 2.0),
                                                 founder))
    assert not gate.accepts(GossipMessage(bob.node_id, bob.node_id, by_bob))  # revoked since

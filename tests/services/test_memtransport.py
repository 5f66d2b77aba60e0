"""The memory transport twin keeps the contracts of the libp2p transport the services rely on."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.memtransport import PIPE_CHUNKS, MemoryNetwork
from mesh.transport import GossipMessage, Stream, StreamClosedError, peer_id_of

ECHO = "/test/echo/1"


async def echo(stream: Stream) -> None:
    while True:
        try:
            frame = await stream.receive_frame(1 << 16)
        except StreamClosedError:
            return
        await stream.send_frame(frame)


async def test_connections_are_symmetric_and_streams_carry_frames(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle(ECHO, echo)
        assert peer_id_of(b.addrs()[0]) == b.node_id
        assert await a.connect(b.addrs()[0]) == b.node_id
        assert a.connected_peers() == {b.node_id} and b.connected_peers() == {a.node_id}
        async with a.open_stream(b.node_id, ECHO) as s:
            for payload in (b"x", b"hello" * 1000):
                await s.send_frame(payload)
                assert await s.receive_frame(1 << 16) == payload
        with pytest.raises(StreamClosedError):  # a protocol nobody serves, as libp2p's negotiation fails
            async with a.open_stream(b.node_id, "/nobody/1"):
                pass
        await a.disconnect(b.node_id)
        assert b.connected_peers() == set() and b.connection_age(a.node_id) is None


async def test_a_crash_breaks_open_streams_and_later_dials(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle(ECHO, echo)
        async with a.open_stream(b.node_id, ECHO) as s:  # dials first: not connected yet
            await s.send_frame(b"1")
            assert await s.receive_frame(8) == b"1"
            net.crash(b.node_id)
            with pytest.raises(StreamClosedError):
                await s.send_frame(b"2")
                await s.receive_frame(8)
            assert a.connected_peers() == set()
            with pytest.raises(PeerError) as failed:
                await a.connect(b.addrs()[0])
            assert failed.value.code == "DIAL_FAILED"


async def test_a_writer_waits_for_a_reader_that_does_not_read(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    started = trio.Event()

    async def idle(stream: Stream) -> None:
        started.set()
        await trio.sleep(3600)

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle(ECHO, idle)
        async with a.open_stream(b.node_id, ECHO, timeout=5.0) as s:
            for _ in range(PIPE_CHUNKS):  # what the pipe buffers goes through at once
                await s.write(b"x", timeout=0.1)
            with pytest.raises(PeerError) as slow:
                await s.write(b"x", timeout=1.0)
            assert slow.value.code == "PEER_TIMEOUT"
            await s.reset()


async def test_gossip_floods_two_hops_and_a_refusal_stops_the_relay(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c:
        await a.connect(b.addrs()[0])
        await b.connect(c.addrs()[0])  # a — b — c: c hears a only through b
        got: list[GossipMessage] = []
        async with c.subscribe("t") as messages:
            await a.publish("t", b"one")
            with trio.fail_after(1):
                async for msg in messages:
                    got.append(msg)
                    break
            assert got[0].data == b"one" and got[0].sender == a.node_id and got[0].forwarder == b.node_id
            b.set_validator("t", lambda msg: msg.data != b"bad")
            await a.publish("t", b"bad")
            await a.publish("t", b"two")
            with trio.fail_after(1):
                async for msg in messages:
                    got.append(msg)
                    break
            assert [m.data for m in got] == [b"one", b"two"]  # "bad" was refused at b: never relayed to c

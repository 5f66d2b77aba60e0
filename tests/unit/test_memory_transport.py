"""The memory transport twin, contract by contract, on a virtual clock (pytest-trio's ``autojump_clock``:
MockClock(autojump_threshold=0), so every timeout below is exact virtual time)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.memtransport import PIPE_CHUNKS, SUBSCRIBER_QUEUE, MemoryNetwork, MemoryTransport
from mesh.transport import (
    DIAL_TIMEOUT,
    GossipMessage,
    PeerTimeoutError,
    PeerUnreachableError,
    Stream,
    StreamClosedError,
)

UPPER = "/test/upper/1"


async def upper(stream: Stream) -> None:
    await stream.send_frame((await stream.receive_frame(1024)).upper())


async def next_message(messages: AsyncIterator[GossipMessage], *, within: float = 1.0) -> GossipMessage | None:
    """The next gossip message, or None when none comes within ``within`` virtual seconds."""
    with trio.move_on_after(within):
        return await messages.__anext__()
    return None


async def test_connections_are_symmetric_whoever_dials(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        assert a.addrs() != b.addrs() and a.connected_peers() == set() and a.connection_age(b.node_id) is None
        assert await a.connect(b.addrs()[0]) == b.node_id
        await trio.sleep(3.0)
        assert await b.connect(a.addrs()[0]) == a.node_id  # the other way: the same connection
        assert a.connected_peers() == {b.node_id} and b.connected_peers() == {a.node_id}
        assert a.connection_age(b.node_id) == b.connection_age(a.node_id) == 3.0
        await b.disconnect(a.node_id)
        assert a.connected_peers() == set() and a.connection_age(b.node_id) is None
        await b.connect(a.addrs()[0])
        assert a.connected_peers() == {b.node_id} and a.connection_age(b.node_id) == 0.0


async def test_dial_errors(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    stranger = Identity.generate().node_id
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        for addr, code in [
            (f"/ip4/127.0.0.1/tcp/1/p2p/{stranger}", "DIAL_FAILED"),  # nobody with that id
            (f"/ip4/127.0.0.1/tcp/1/p2p/{b.node_id}", "DIAL_FAILED"),  # b, but not where b listens
            (a.addrs()[0], "DIAL_FAILED"),  # itself
            ("/ip4/127.0.0.1/tcp/1", "BAD_MULTIADDR"),
        ]:
            with pytest.raises(PeerError) as failed:
                await a.connect(addr)
            assert failed.value.code == code, addr
        with pytest.raises(PeerUnreachableError):  # no connection and no address known
            async with a.open_stream(stranger, UPPER):
                pass
        assert a.connected_peers() == set()


async def test_framed_request_response_dials_first(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle(UPPER, upper)
        async with a.open_stream(b.node_id, UPPER) as s:  # not connected yet: dials b's address
            await s.send_frame(b"hello" * 100)
            assert await s.receive_frame(1024) == b"HELLO" * 100
            with pytest.raises(StreamClosedError):  # the handler returned: its side is closed
                await s.receive_frame(1024)
        assert a.connected_peers() == {b.node_id}
        with pytest.raises(StreamClosedError):  # a protocol b does not serve, as libp2p's negotiation fails
            async with a.open_stream(b.node_id, "/nobody/1"):
                pass


async def test_eof_after_a_half_close_and_errors_after_a_reset(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()

    async def count_until_eof(stream: Stream) -> None:
        total = 0
        while chunk := await stream._raw.read(100):  # b"" at EOF
            total += len(chunk)
        await stream.send_frame(str(total).encode())

    async def reset_at_once(stream: Stream) -> None:
        await stream.reset()

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle("/count/1", count_until_eof)
        b.handle("/reset/1", reset_at_once)
        async with a.open_stream(b.node_id, "/count/1") as s:
            await s.write(b"x" * 250)
            await s.close()  # half-close: b reads EOF, and a still reads b's answer
            assert await s.receive_frame(16) == b"250"
            assert await s._raw.read(16) == b""  # then EOF on a's side too
        async with a.open_stream(b.node_id, "/reset/1") as s:
            await trio.sleep(0.1)
            with pytest.raises(ConnectionResetError):  # not b"": a reset is no EOF
                await s._raw.read(16)
            with pytest.raises(StreamClosedError):
                await s.write(b"x")
            with pytest.raises(StreamClosedError):
                await s.receive_frame(16)


async def test_handler_errors_reset_the_stream_and_are_logged(autojump_clock: trio.testing.MockClock,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    net = MemoryNetwork()

    async def refuse(stream: Stream) -> None:
        raise PeerError("no", code="BAD_INPUT")

    async def bug(stream: Stream) -> None:
        raise ValueError("a bug")

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle("/refuse/1", refuse)
        b.handle("/bug/1", bug)
        for protocol in ("/refuse/1", "/bug/1"):
            async with a.open_stream(b.node_id, protocol) as s:
                with pytest.raises(ConnectionResetError):  # reset, not closed
                    await s._raw.read(1)
        codes = [getattr(r, "code", None) for r in caplog.records if getattr(r, "event", None) == "stream_failed"]
        assert codes == ["BAD_INPUT", "INTERNAL"]
        assert await a.ping(b.node_id) == 0.0  # b still serves


async def test_a_writer_waits_until_the_reader_reads(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    reading = trio.Event()
    got: list[bytes] = []

    async def slow_reader(stream: Stream) -> None:
        await reading.wait()
        got.append(await stream.read_some(1))

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, trio.open_nursery() as n:
        b.handle("/slow/1", slow_reader)
        async with a.open_stream(b.node_id, "/slow/1", timeout=60.0) as s:
            for _ in range(PIPE_CHUNKS):  # what the pipe buffers goes through at once
                await s.write(b"x", timeout=0.1)
            assert trio.current_time() == 0.0
            n.start_soon(_set_after, reading, 10.0)
            await s.write(b"y")  # blocks until b takes one chunk out
            assert trio.current_time() == 10.0
            with pytest.raises(PeerTimeoutError):  # the buffer is full again and b reads no more
                await s.write(b"z", timeout=1.0)
            assert trio.current_time() == 11.0 and got == [b"x"]
            await s.reset()


async def _set_after(event: trio.Event, delay: float) -> None:
    await trio.sleep(delay)
    event.set()


async def test_gossip_floods_two_hops_once_each_and_echoes_to_the_publisher(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c, net.open(Identity.generate()) as d:
        for x, y in ((a, b), (a, c), (b, d), (c, d)):  # a diamond: d hears a through b and through c
            await x.connect(y.addrs()[0])
        relayed_by = []
        d.set_validator("t", lambda m: relayed_by.append(m.forwarder) is None)
        async with a.subscribe("t") as at_a, d.subscribe("t") as at_d:
            await a.publish("t", b"one")
            msg = await next_message(at_d)
            assert msg is not None and (msg.sender, msg.data) == (a.node_id, b"one")
            assert msg.forwarder is None  # as py-libp2p: only the validator is told who relayed it
            assert len(relayed_by) == 1 and relayed_by[0] in (b.node_id, c.node_id)  # one path of the two
            assert await next_message(at_d) is None  # once, although two paths reach d
            echo = await next_message(at_a)  # as py-libp2p's pubsub: a publisher hears its own message
            assert echo is not None and echo.sender == a.node_id and echo.data == b"one"


async def test_a_refused_message_is_neither_delivered_nor_relayed(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c:
        await a.connect(b.addrs()[0])
        await b.connect(c.addrs()[0])  # a — b — c: c hears a only through b
        seen_by_b: list[bytes] = []

        def b_accepts(msg: GossipMessage) -> bool:
            seen_by_b.append(msg.data)
            return msg.data != b"bad"

        b.set_validator("t", b_accepts)
        async with b.subscribe("t") as at_b, c.subscribe("t") as at_c:
            await a.publish("t", b"bad")
            await a.publish("t", b"good")
            assert [m.data for m in [await next_message(at_c), await next_message(at_c)] if m] == [b"good"]
            assert [m.data for m in [await next_message(at_b), await next_message(at_b)] if m] == [b"good"]
            assert seen_by_b == [b"bad", b"good"]


async def test_a_slow_subscriber_loses_messages_and_publish_never_waits(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        await a.connect(b.addrs()[0])
        async with b.subscribe("t") as at_b:
            with trio.fail_after(0.001):  # no virtual time passes: nothing waited
                for i in range(SUBSCRIBER_QUEUE + 3):
                    await a.publish("t", str(i).encode())
            assert sum(getattr(r, "event", None) == "gossip_dropped" for r in caplog.records) == 3
            got = [await next_message(at_b) for _ in range(SUBSCRIBER_QUEUE + 1)]
            assert [m.data for m in got if m] == [str(i).encode() for i in range(SUBSCRIBER_QUEUE)]


async def test_a_crash_breaks_streams_on_the_other_side_and_later_dials(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    handler_error: list[BaseException] = []

    async def wait_for_a_frame(stream: Stream) -> None:
        try:
            await stream.receive_frame(8, timeout=60.0)
        except PeerError as err:
            handler_error.append(err)
            raise

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c:
        b.handle(UPPER, upper)
        c.handle("/wait/1", wait_for_a_frame)
        async with a.open_stream(b.node_id, UPPER, timeout=60.0) as s:
            net.crash(b.node_id)
            with pytest.raises(StreamClosedError):  # at once, not after the 60 s deadline
                await s.receive_frame(8)
            assert trio.current_time() == 0.0
        assert a.connected_peers() == set()
        with pytest.raises(PeerError) as failed:
            await a.connect(b.addrs()[0])
        assert failed.value.code == "DIAL_FAILED"
        with pytest.raises(PeerError) as failed:  # a known address that nobody listens on any more
            async with a.open_stream(b.node_id, UPPER):
                pass
        assert failed.value.code == "DIAL_FAILED"
        async with a.open_stream(c.node_id, "/wait/1"):
            await trio.sleep(1.0)
            net.crash(a.node_id)  # the opener dies: the handler's read on c fails
            await trio.sleep(0.1)
        assert len(handler_error) == 1 and isinstance(handler_error[0], StreamClosedError)
        assert trio.current_time() == 1.1


async def test_leaving_the_network_breaks_streams_and_errors_come_out_as_themselves(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, AsyncExitStack() as outlives_b:
        with pytest.raises(KeyError):  # the block's error, not an ExceptionGroup of the transport's nursery
            async with net.open(Identity.generate()) as b:
                b.handle(UPPER, upper)
                s = await outlives_b.enter_async_context(a.open_stream(b.node_id, UPPER, timeout=60.0))
                raise KeyError("boom")
        with pytest.raises(StreamClosedError):  # b's handler was cancelled without a reset: the leave broke it
            await s.receive_frame(8)
        assert trio.current_time() == 0.0 and a.connected_peers() == set()
        with pytest.raises(PeerError) as failed:
            await a.connect(b.addrs()[0])
        assert failed.value.code == "DIAL_FAILED"


async def test_a_frozen_peer_stays_connected_but_reads_time_out(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c:
        b.handle(UPPER, upper)
        await a.connect(b.addrs()[0])
        async with a.open_stream(b.node_id, UPPER, timeout=3.0) as s:
            net.freeze(b.node_id)
            await s.send_frame(b"hi")  # buffered, as in a socket: the writer cannot tell
            with pytest.raises(PeerTimeoutError):
                await s.receive_frame(8)
            assert trio.current_time() == 3.0 and a.connected_peers() == {b.node_id}
            net.thaw(b.node_id)  # SIGCONT: b reads what waited and answers
            assert await s.receive_frame(8) == b"HI"
        net.freeze(b.node_id)
        with pytest.raises(PeerTimeoutError):
            await a.ping(b.node_id, timeout=2.0)
        assert trio.current_time() == 5.0
        entered = False
        with pytest.raises(PeerTimeoutError):  # at the open already, as libp2p's protocol negotiation
            async with a.open_stream(b.node_id, UPPER, timeout=1.0):
                entered = True
        assert not entered and trio.current_time() == 6.0
        with pytest.raises(PeerError) as failed:  # a new connection's handshake never finishes
            await c.connect(b.addrs()[0])
        assert failed.value.code == "DIAL_FAILED" and trio.current_time() == 6.0 + DIAL_TIMEOUT
        async with a.subscribe("t") as at_a:
            await b.publish("t", b"from b")  # a stopped process sends nothing
            assert await next_message(at_a) is None
        net.thaw(b.node_id)
        assert await a.ping(b.node_id) == 0.0


async def test_what_a_frozen_peer_writes_arrives_after_the_thaw(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    speak, hang_up = trio.Event(), trio.Event()
    got: list[object] = []

    async def late(stream: Stream) -> None:
        await speak.wait()
        await stream.send_frame(b"late")
        await hang_up.wait()  # then the handler returns: its side closes (EOF)

    async def read_all(s: Stream) -> None:
        got.append((await s.receive_frame(16, timeout=10.0), trio.current_time()))
        with pytest.raises(StreamClosedError):
            await s.read_some(1, timeout=10.0)
        got.append(("EOF", trio.current_time()))

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle("/late/1", late, timeout=60.0)
        async with a.open_stream(b.node_id, "/late/1") as s, trio.open_nursery() as n:
            n.start_soon(read_all, s)
            await trio.sleep(1.0)  # a is waiting in a read when b stops
            net.freeze(b.node_id)
            speak.set()  # the stopped peer's task writes anyway: it must not arrive yet
            await trio.sleep(1.0)
            assert got == []
            net.thaw(b.node_id)
            await trio.sleep(1.0)
            assert got == [(b"late", 2.0)]
            net.freeze(b.node_id)
            hang_up.set()  # nor may its EOF
            await trio.sleep(1.0)
            assert got == [(b"late", 2.0)]
            net.thaw(b.node_id)
        assert got == [(b"late", 2.0), ("EOF", 4.0)]


async def test_a_peer_restarted_on_its_key_is_reachable_again(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    key = Identity.generate()
    leave = trio.Event()

    async def first_life(task_status: trio.TaskStatus[MemoryTransport] = trio.TASK_STATUS_IGNORED) -> None:
        async with net.open(key) as first:
            task_status.started(first)
            await leave.wait()

    async with net.open(Identity.generate()) as a, trio.open_nursery() as n:
        first = await n.start(first_life)
        await a.connect(first.addrs()[0])
        net.freeze(key.node_id)
        net.crash(key.node_id)  # SIGSTOP, then kill -9
        async with net.open(key) as second:
            with pytest.raises(ValueError):  # two live transports for one key is a test's mistake
                async with net.open(key):
                    pass
            leave.set()  # the dead incarnation's block ends late: the new one stays
            await trio.sleep(1.0)
            assert second.addrs() != first.addrs()
            await a.connect(second.addrs()[0])
            assert await a.ping(key.node_id) == 0.0


async def test_a_partition_silences_one_pair_only(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b, \
            net.open(Identity.generate()) as c:
        for x, y in ((a, b), (b, c), (a, c)):
            await x.connect(y.addrs()[0])
        net.partition(a.node_id, b.node_id)
        with pytest.raises(PeerTimeoutError):
            await a.ping(b.node_id, timeout=1.0)
        assert await a.ping(c.node_id) == 0.0 and await c.ping(b.node_id) == 0.0
        relayed_by = []
        b.set_validator("t", lambda m: relayed_by.append(m.forwarder) is None)
        async with b.subscribe("t") as at_b:
            await a.publish("t", b"around")  # a — c — b still carries it
            msg = await next_message(at_b)
            assert msg is not None and msg.sender == a.node_id and relayed_by == [c.node_id]
        net.heal(a.node_id, b.node_id)
        assert await a.ping(b.node_id) == 0.0


async def test_the_handler_limiter_makes_extra_streams_wait(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    release = trio.Event()
    running: list[int] = []

    async def held(stream: Stream) -> None:
        running.append(1)
        await release.wait()
        await upper(stream)

    async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
        b.handle(UPPER, held, max_concurrent=1)
        async with a.open_stream(b.node_id, UPPER) as first, a.open_stream(b.node_id, UPPER) as second:
            await first.send_frame(b"one")
            await second.send_frame(b"two")
            await trio.sleep(1.0)
            assert running == [1]  # the second handler waits for the first one's slot
            release.set()
            assert await first.receive_frame(8) == b"ONE"
            assert await second.receive_frame(8) == b"TWO"
            assert running == [1, 1]


async def test_discovery_never_yields(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with net.open(Identity.generate()) as a:
        with trio.move_on_after(60.0) as waited:
            async for addr in a.discovered:
                pytest.fail(f"discovered {addr}")
        assert waited.cancelled_caught


def test_runs_under_a_plain_trio_run_with_a_mock_clock() -> None:
    """No pytest-trio needed: N peers in one ``trio.run`` on a virtual clock (an hour passes at once)."""

    async def main() -> float:
        net = MemoryNetwork()
        async with net.open(Identity.generate()) as a, net.open(Identity.generate()) as b:
            b.handle(UPPER, upper)
            await trio.sleep(3600)
            async with a.open_stream(b.node_id, UPPER) as s:
                await s.send_frame(b"x")
                assert await s.receive_frame(8) == b"X"
            return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 3600.0

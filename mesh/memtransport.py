"""The in-memory twin of ``mesh.transport.Transport``: the same interface (``mesh.ports.Network``), so whole
peers run on it unchanged, N of them in one ``trio.run``, on a virtual clock (trio primitives only: no
socket, no thread, no wall clock).

What it models: symmetric connections (both sides list each other; ``connection_age``); streams per protocol
with back-pressure (bounded buffers), half-close (EOF), reset, and the handler semantics of
``Transport.handle`` (a limiter, a PeerError resets and is logged with its code, any other exception is
logged as INTERNAL and resets, the stream closes when the handler returns); gossip flooded over the
connections, each peer seeing a message once and running its topic validator before it delivers or relays
(a refused message goes no further); ``crash`` (as kill -9: connections and streams break at once, dials
fail). What it does not model: Noise, yamux, multistream negotiation, gossipsub's mesh degree and
scoring, latency (a hop costs no virtual time), mDNS (``discovered`` never yields).

A subscriber that falls 256 messages behind loses the next ones, as gossipsub drops for a slow consumer;
each drop is logged (``gossip_dropped``), never silent.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.transport import (
    STREAM_TIMEOUT,
    DialError,
    GossipMessage,
    PeerTimeoutError,
    PeerUnreachableError,
    Stream,
    StreamClosedError,
    is_loopback_addr,
    owned,
    peer_id_of,
    serve_stream,
)

log = logging.getLogger(__name__)
PIPE_CHUNKS = 16  # writes buffered per direction of a stream before the writer waits
SUBSCRIBER_QUEUE = 256
SEEN_LIMIT = 10_000


@dataclass
class _Pipe:
    """One direction of a stream: bounded chunks, EOF when the writer closes, ``broken`` after a reset."""

    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    buf: bytearray = field(default_factory=bytearray)
    broken: bool = False

    @classmethod
    def new(cls) -> _Pipe:
        return cls(*trio.open_memory_channel[bytes](PIPE_CHUNKS))


class _RawStream:
    """What ``mesh.transport.Stream`` wraps: async ``read``, ``write``, ``close``, ``reset``."""

    def __init__(self, out: _Pipe, inp: _Pipe, ends: set[_RawStream]) -> None:
        self.out, self.inp, self._ends = out, inp, ends
        ends.add(self)

    async def write(self, data: bytes) -> None:
        if self.out.broken:
            raise ConnectionResetError("stream reset")
        await self.out.send.send(bytes(data))

    async def read(self, n: int) -> bytes:
        if not self.inp.buf:
            try:
                self.inp.buf += await self.inp.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self.inp.broken:
                    raise ConnectionResetError("stream reset") from None
                return b""
        chunk = bytes(self.inp.buf[:n])
        del self.inp.buf[:n]
        return chunk

    async def close(self) -> None:
        await self.out.send.aclose()  # EOF for the other side; reading on goes on

    async def reset(self) -> None:
        for pipe in (self.out, self.inp):
            pipe.broken = True
            pipe.send.close()
            pipe.receive.close()
        self._ends.discard(self)


@dataclass
class _Handler:
    run: Callable[[Stream], Awaitable[None]]
    limiter: trio.CapacityLimiter
    timeout: float


class MemoryTransport:
    """One peer's end of a ``MemoryNetwork``; create with ``MemoryNetwork.open(identity)``."""

    def __init__(self, network: MemoryNetwork, identity: Identity, nursery: trio.Nursery, port: int) -> None:
        self.network, self.node_id, self._nursery = network, identity.node_id, nursery
        self.addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.node_id}"
        self.alive = True
        self._handlers: dict[str, _Handler] = {}
        self._validators: dict[str, Callable[[GossipMessage], bool]] = {}
        self._subscribers: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = collections.defaultdict(list)
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._streams: dict[NodeId, set[_RawStream]] = collections.defaultdict(set)
        self._discovered_send, self.discovered = trio.open_memory_channel[str](0)
        self.handle("/meshnode/ping/1", _answer_ping, timeout=2.0)

    # ---- addresses and connections -------------------------------------------------------------------

    def addrs(self) -> list[str]:
        return [self.addr]

    def connected_peers(self) -> set[NodeId]:
        return self.network._peers_of(self.node_id)

    def connection_age(self, peer: NodeId) -> float | None:
        since = self.network._connections.get(frozenset((self.node_id, peer)))
        return None if since is None else trio.current_time() - since

    async def connect(self, addr: str) -> NodeId:
        peer = peer_id_of(addr)
        await trio.lowlevel.checkpoint()
        target = self.network._transports.get(peer)
        if target is None or not target.alive or target.addr != addr or not self.alive:
            raise DialError(f"dial {addr} failed: nobody listens there")
        self.network._connect(self.node_id, peer)
        return peer

    async def disconnect(self, peer: NodeId) -> None:
        await trio.lowlevel.checkpoint()
        self.network._disconnect(self.node_id, peer)

    # ---- streams -------------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_stream(self, peer: NodeId, protocol: str, *, timeout: float = STREAM_TIMEOUT
                          ) -> AsyncIterator[Stream]:
        """As ``Transport.open_stream``: dials the peer first if needed; closed on exit, reset on error."""
        if peer not in self.connected_peers():
            remote = self.network._transports.get(peer)
            if remote is None or not remote.alive:
                raise PeerUnreachableError(f"not connected to {peer} and no address to dial")
            await self.connect(remote.addr)
        await trio.lowlevel.checkpoint()
        remote = self.network._transports[peer]
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise StreamClosedError(f"cannot open {protocol} to {peer}: protocol not supported")
        a, b = _Pipe.new(), _Pipe.new()
        mine = _RawStream(a, b, self._streams[peer])
        theirs = _RawStream(b, a, remote._streams[self.node_id])
        remote._nursery.start_soon(remote._serve, handler, protocol, Stream(theirs, self.node_id, handler.timeout))  # type: ignore[arg-type]
        async with owned(Stream(mine, peer, timeout)) as stream:  # type: ignore[arg-type]
            yield stream

    def handle(self, protocol: str, handler: Callable[[Stream], Awaitable[None]], *,
               max_concurrent: int = 16, timeout: float = STREAM_TIMEOUT) -> None:
        self._handlers[protocol] = _Handler(handler, trio.CapacityLimiter(max_concurrent), timeout)

    async def _serve(self, handler: _Handler, protocol: str, stream: Stream) -> None:
        async with handler.limiter:
            await serve_stream(protocol, handler.run, stream)

    async def ping(self, peer: NodeId, *, timeout: float = 2.0) -> float:
        start = trio.current_time()
        with trio.move_on_after(timeout):
            async with self.open_stream(peer, "/meshnode/ping/1", timeout=timeout) as stream:
                await stream.send_frame(b"ping")
                if await stream.receive_frame(64) != b"ping":
                    raise PeerError(f"{peer} answered the ping with other bytes", code="BAD_PING_REPLY")
            return trio.current_time() - start
        raise PeerTimeoutError(f"no ping reply from {peer} within {timeout}s")

    # ---- gossip --------------------------------------------------------------------------------------

    def set_validator(self, topic: str, accept: Callable[[GossipMessage], bool]) -> None:
        self._validators[topic] = accept

    async def publish(self, topic: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.alive:
            self.network._flood(self, topic, (self.node_id, next(self.network._seqno)), data)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[AsyncIterator[GossipMessage]]:
        send, receive = trio.open_memory_channel[GossipMessage](SUBSCRIBER_QUEUE)
        self._subscribers[topic].append(send)
        try:
            async with receive:
                yield receive.__aiter__()
        finally:
            self._subscribers[topic].remove(send)

    def _accept(self, topic: str, msg: GossipMessage, msg_id: tuple[str, int]) -> bool:
        """Seen before, or refused by the validator: False (neither delivered nor relayed)."""
        if msg_id in self._seen:
            return False
        self._seen[msg_id] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        accept = self._validators.get(topic)
        if accept is not None and not accept(msg):
            return False
        for send in self._subscribers.get(topic, ()):
            try:
                send.send_nowait(msg)
            except trio.WouldBlock:
                log.warning("gossip subscriber of %s is %d messages behind: message dropped", topic,
                            SUBSCRIBER_QUEUE, extra={"event": "gossip_dropped", "node_id": self.node_id})
        return True


async def _answer_ping(stream: Stream) -> None:
    await stream.send_frame(await stream.receive_frame(64))


class MemoryNetwork:
    """The hub of an in-memory mesh: who listens, who is connected to whom, and failure injection."""

    def __init__(self) -> None:
        self._transports: dict[NodeId, MemoryTransport] = {}
        self._connections: dict[frozenset[NodeId], float] = {}  # pair -> connected since
        self._ports = itertools.count(20000)
        self._seqno = itertools.count()

    @asynccontextmanager
    async def open(self, identity: Identity) -> AsyncIterator[MemoryTransport]:
        """A transport for ``identity`` on this network until the block ends (then it leaves, as a crash)."""
        async with trio.open_nursery() as nursery:
            transport = MemoryTransport(self, identity, nursery, next(self._ports))
            assert is_loopback_addr(transport.addr)
            self._transports[transport.node_id] = transport
            try:
                yield transport
            finally:
                self.crash(transport.node_id)
                nursery.cancel_scope.cancel()

    def crash(self, node_id: NodeId) -> None:
        """As kill -9: every connection and stream of the peer breaks now and nobody can dial it again."""
        t = self._transports.get(node_id)
        if t is None or not t.alive:
            return
        t.alive = False
        for peer in list(self._peers_of(node_id)):
            self._disconnect(node_id, peer)

    def _peers_of(self, node_id: NodeId) -> set[NodeId]:
        return {p for pair in self._connections if node_id in pair for p in pair if p != node_id}

    def _connect(self, a: NodeId, b: NodeId) -> None:
        if a != b:
            self._connections.setdefault(frozenset((a, b)), trio.current_time())

    def _disconnect(self, a: NodeId, b: NodeId) -> None:
        self._connections.pop(frozenset((a, b)), None)
        for x, y in ((a, b), (b, a)):  # streams between them break on both sides, as a closed connection
            t = self._transports.get(x)
            for raw in list(t._streams.get(y, ())) if t is not None else ():
                for pipe in (raw.out, raw.inp):
                    pipe.broken = True
                    pipe.send.close()
                raw._ends.discard(raw)

    def _flood(self, origin: MemoryTransport, topic: str, msg_id: tuple[str, int], data: bytes) -> None:
        origin._seen[msg_id] = None
        frontier = [origin]
        while frontier:
            nxt = []
            for t in frontier:
                for peer in sorted(self._peers_of(t.node_id)):
                    target = self._transports.get(peer)
                    if target is None or not target.alive:
                        continue
                    msg = GossipMessage(sender=origin.node_id, forwarder=t.node_id, data=data)
                    if target._accept(topic, msg, msg_id):
                        nxt.append(target)
            frontier = nxt

"""The in-memory twin of ``mesh.transport.Transport``: the same interface (``mesh.ports.Network``), so whole
peers run on it unchanged, N of them in one ``trio.run``, on a virtual clock (trio primitives only: no socket,
no thread, no wall clock), as trio.testing's memory streams.

It models symmetric connections; streams with back-pressure (bounded buffers), half-close (EOF), reset, and
``Transport.handle``'s handler semantics; gossip flooded over the connections, each peer seeing a message once
and validating it before it delivers or relays (the publisher validates and hears its own message, as in
py-libp2p); failures injected on the hub: ``crash`` (kill -9), ``freeze``/``thaw`` (SIGSTOP/SIGCONT: the
connections stay up, nothing sent either way arrives), ``partition``/``heal`` (that silence for one pair).
It does not model Noise, yamux, protocol negotiation, sockets, latency (a hop costs no time), gossipsub's
topic meshes and scoring (every connection relays every topic; a silent link drops gossip rather than
delaying it), libp2p's health pings (a silent connection stays up until the node closes it), or mDNS
(``discovered`` never yields). Gossip never waits: a subscriber 256 messages behind loses the next ones, as
gossipsub drops for a slow consumer, each drop logged (``gossip_dropped``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.transport import (
    DIAL_TIMEOUT,
    PING_PROTOCOL,
    STREAM_TIMEOUT,
    DialError,
    GossipMessage,
    PeerUnreachableError,
    Stream,
    StreamClosedError,
    answer_ping,
    is_loopback_addr,
    opened,
    peer_id_of,
    ping_over,
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
    """One end of a stream, what ``mesh.transport.Stream`` wraps: async ``read``, ``write``, ``close``,
    ``reset``. Writes fill the buffer as a socket would; reads wait while the link is silent (a frozen end,
    a partition), so nothing sent either way arrives before it speaks again."""

    def __init__(self, network: MemoryNetwork, local: NodeId, remote: NodeId, out: _Pipe, inp: _Pipe) -> None:
        self.network, self.local, self.remote, self.out, self.inp = network, local, remote, out, inp

    @property
    def broken(self) -> bool:
        return self.out.broken or self.inp.broken

    async def write(self, data: bytes) -> None:
        if self.out.broken:
            raise ConnectionResetError("stream reset")
        await self.out.send.send(bytes(data))

    async def read(self, n: int) -> bytes:
        while True:  # what arrives while the link is silent waits in the buffer until it speaks again
            await self.network._until_audible(self.local, self.remote, self)
            if self.inp.buf:
                chunk = bytes(self.inp.buf[:n])
                del self.inp.buf[:n]
                return chunk
            try:
                self.inp.buf += await self.inp.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self.inp.broken:
                    raise ConnectionResetError("stream reset") from None
                if not self.network._silent(self.local, self.remote):
                    return b""

    async def close(self) -> None:
        await self.out.send.aclose()  # EOF for the other side; reading on goes on

    async def reset(self) -> None:
        self.break_()
        await trio.lowlevel.checkpoint()

    def break_(self) -> None:
        """Both directions fail now, on both ends (what is still buffered is lost, as with a TCP RST)."""
        for pipe in (self.out, self.inp):
            pipe.broken = True
            pipe.buf.clear()
            pipe.send.close()
            pipe.receive.close()
        self.network._notify()


@dataclass
class _Handler:
    run: Callable[[Stream], Awaitable[None]]
    limiter: trio.CapacityLimiter
    timeout: float


class MemoryTransport:
    """One peer's end of a ``MemoryNetwork``; create with ``MemoryNetwork.open(identity)``."""

    def __init__(self, network: MemoryNetwork, identity: Identity, nursery: trio.Nursery, port: int,
                 loopback_only: bool) -> None:
        self.network, self.node_id, self._nursery = network, identity.node_id, nursery
        self.addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.node_id}"
        self.alive = True
        self._loopback_only = loopback_only
        self._handlers: dict[str, _Handler] = {}
        self._validators: dict[str, Callable[[GossipMessage], bool]] = {}
        self._subscribers: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = collections.defaultdict(list)
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._discovered_send, self.discovered = trio.open_memory_channel[str](0)
        self.handle(PING_PROTOCOL, answer_ping, timeout=2.0)

    # ---- addresses and connections -------------------------------------------------------------------

    def addrs(self) -> list[str]:
        return [self.addr]

    def connected_peers(self) -> set[NodeId]:
        return self.network._peers_of(self.node_id)

    def connection_age(self, peer: NodeId) -> float | None:
        since = self.network._connections.get(frozenset((self.node_id, peer)))
        return None if since is None else trio.current_time() - since

    async def connect(self, addr: str) -> NodeId:
        """As ``Transport.connect``: DialError (DIAL_FAILED) when nobody listens at ``addr`` or the handshake
        does not finish within DIAL_TIMEOUT (a silent peer); BAD_MULTIADDR from ``peer_id_of``."""
        peer = peer_id_of(addr)
        await trio.lowlevel.checkpoint()
        net = self.network
        if peer not in self.connected_peers() and net._silent(self.node_id, peer):
            with trio.move_on_after(DIAL_TIMEOUT):  # TCP accepts, the handshake never answers
                await net._until_audible(self.node_id, peer)
            if net._silent(self.node_id, peer):
                raise DialError(f"dial {addr} timed out after {DIAL_TIMEOUT}s")
        target = net._transports.get(peer)
        if target is None or not target.alive or target.addr != addr or not self.alive or peer == self.node_id:
            raise DialError(f"dial {addr} failed: nobody listens there")
        net._connect(self.node_id, peer)
        return peer

    async def disconnect(self, peer: NodeId) -> None:
        await trio.lowlevel.checkpoint()
        self.network._disconnect(self.node_id, peer)

    # ---- streams -------------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_stream(self, peer: NodeId, protocol: str, *, timeout: float = STREAM_TIMEOUT
                          ) -> AsyncIterator[Stream]:
        """As ``Transport.open_stream``: dials the peer first if needed; closed on exit, reset on error;
        PeerTimeoutError when the peer does not answer within ``timeout``."""
        async with opened(lambda: self._new_stream(peer, protocol), peer, protocol, timeout) as stream:
            yield stream

    async def _new_stream(self, peer: NodeId, protocol: str) -> _RawStream:
        net = self.network
        if peer not in self.connected_peers():  # as Transport._redial; the hub plays the peerstore
            known = net._transports.get(peer)
            addrs = [a for a in ([known.addr] if known else []) if is_loopback_addr(a) or not self._loopback_only]
            if not addrs:
                raise PeerUnreachableError(f"not connected to {peer} and no address to dial")
            await self.connect(addrs[0])
        await net._until_audible(self.node_id, peer)  # the protocol negotiation waits for an answer
        remote = net._transports.get(peer)
        if remote is None or peer not in self.connected_peers():
            raise StreamClosedError(f"cannot open {protocol} to {peer}: the connection closed")
        handler = remote._handlers.get(protocol)
        if handler is None:
            raise StreamClosedError(f"cannot open {protocol} to {peer}: protocol not supported")
        a, b = _Pipe.new(), _Pipe.new()
        mine, theirs = _RawStream(net, self.node_id, peer, a, b), _RawStream(net, peer, self.node_id, b, a)
        net._streams.update((mine, theirs))
        stream = Stream(theirs, self.node_id, handler.timeout)  # type: ignore[arg-type]
        remote._nursery.start_soon(remote._serve, handler, protocol, stream)
        return mine

    def handle(self, protocol: str, handler: Callable[[Stream], Awaitable[None]], *,
               max_concurrent: int = 16, timeout: float = STREAM_TIMEOUT) -> None:
        """As ``Transport.handle``: at most ``max_concurrent`` handlers at a time (more wait)."""
        self._handlers[protocol] = _Handler(handler, trio.CapacityLimiter(max_concurrent), timeout)

    async def _serve(self, handler: _Handler, protocol: str, stream: Stream) -> None:
        async with handler.limiter:
            await serve_stream(protocol, handler.run, stream)

    async def ping(self, peer: NodeId, *, timeout: float = 2.0) -> float:
        """Round-trip time over a fresh ping stream: 0.0 on a virtual clock (a hop costs no time)."""
        return await ping_over(self, peer, timeout)

    # ---- gossip --------------------------------------------------------------------------------------

    def set_validator(self, topic: str, accept: Callable[[GossipMessage], bool]) -> None:
        """Messages that ``accept`` refuses are neither delivered nor relayed (nor published, here first)."""
        self._validators[topic] = accept

    async def publish(self, topic: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()  # a frozen or crashed publisher's links are silent or gone
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
        """Seen before, or refused by the validator: False (neither delivered nor relayed). As py-libp2p, a
        message is marked seen only once accepted, so one refused here may come again by another path."""
        if msg_id in self._seen:
            return False
        accept = self._validators.get(topic)
        try:
            if accept is not None and not accept(msg):
                return False
        except Exception:  # a bug in one peer's validator must not fail the publisher's publish()
            log.exception("gossip validator for %s failed", topic,
                          extra={"event": "rejected", "code": "INTERNAL", "peer": msg.forwarder})
            return False
        self._seen[msg_id] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)
        delivered = dataclasses.replace(msg, forwarder=None)  # as py-libp2p: a subscription is not told
        for send in self._subscribers.get(topic, ()):
            try:
                send.send_nowait(delivered)
            except trio.WouldBlock:
                log.warning("gossip subscriber of %s is %d messages behind: message dropped", topic,
                            SUBSCRIBER_QUEUE, extra={"event": "gossip_dropped", "node_id": self.node_id})
        return True


class MemoryNetwork:
    """The hub of an in-memory mesh: who listens, who is connected to whom, and failure injection."""

    def __init__(self) -> None:
        self._transports: dict[NodeId, MemoryTransport] = {}  # the latest transport of each node id
        self._connections: dict[frozenset[NodeId], float] = {}  # pair -> connected since
        self._streams: weakref.WeakSet[_RawStream] = weakref.WeakSet()  # ends someone still holds
        self._frozen: set[NodeId] = set()
        self._cut: set[frozenset[NodeId]] = set()
        self._changed = trio.Event()  # set (and replaced) whenever a link or stream changes
        self._ports = itertools.count(20000)
        self._seqno = itertools.count()

    @asynccontextmanager
    async def open(self, identity: Identity, *, loopback_only: bool = True) -> AsyncIterator[MemoryTransport]:
        """A transport for ``identity`` on this network until the block ends (then it leaves, as a crash).
        Its handlers run in a nursery of its own; an error of the block is re-raised as itself."""
        old = self._transports.get(identity.node_id)
        if old is not None and old.alive:
            raise ValueError(f"{identity.node_id} is already on this network")
        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            transport = MemoryTransport(self, identity, nursery, next(self._ports), loopback_only)
            self._transports[transport.node_id] = transport
            try:
                yield transport
            except Exception as exc:
                body_error = exc
            finally:
                if self._transports.get(transport.node_id) is transport:
                    self.crash(transport.node_id)
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    # ---- failure injection ---------------------------------------------------------------------------

    def crash(self, node_id: NodeId) -> None:
        """As kill -9: every connection and stream of the peer breaks now and nobody can dial it again.
        The caller cancels the peer's own tasks."""
        t = self._transports.get(node_id)
        if t is None or not t.alive:
            return
        t.alive = False
        self._frozen.discard(node_id)
        for peer in list(self._peers_of(node_id)):
            self._disconnect(node_id, peer)

    def freeze(self, node_id: NodeId) -> None:
        """As SIGSTOP: its connections stay up, but nothing it sends or is sent arrives until ``thaw``."""
        self._frozen.add(node_id)
        self._notify()

    def thaw(self, node_id: NodeId) -> None:
        self._frozen.discard(node_id)
        self._notify()

    def partition(self, a: NodeId, b: NodeId) -> None:
        """A pulled cable between ``a`` and ``b``: the silence of ``freeze``, for this pair only."""
        self._cut.add(frozenset((a, b)))
        self._notify()

    def heal(self, a: NodeId, b: NodeId) -> None:
        self._cut.discard(frozenset((a, b)))
        self._notify()

    # ---- internals -----------------------------------------------------------------------------------

    def _silent(self, a: NodeId, b: NodeId) -> bool:
        return a in self._frozen or b in self._frozen or frozenset((a, b)) in self._cut

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _until_audible(self, a: NodeId, b: NodeId, raw: _RawStream | None = None) -> None:
        """Returns at once unless the link is silent; then when it speaks again (or ``raw`` breaks)."""
        while self._silent(a, b) and not (raw is not None and raw.broken):
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    def _peers_of(self, node_id: NodeId) -> set[NodeId]:
        return {p for pair in self._connections if node_id in pair for p in pair if p != node_id}

    def _connect(self, a: NodeId, b: NodeId) -> None:
        self._connections.setdefault(frozenset((a, b)), trio.current_time())

    def _disconnect(self, a: NodeId, b: NodeId) -> None:
        """The connection closes: the streams between them break on both sides."""
        self._connections.pop(frozenset((a, b)), None)
        for raw in [r for r in self._streams if {r.local, r.remote} == {a, b}]:
            raw.break_()
        self._notify()

    def _flood(self, origin: MemoryTransport, topic: str, msg_id: tuple[str, int], data: bytes) -> None:
        """The publisher validates and delivers its own message first (py-libp2p's ``push_msg``), then each
        peer that accepts it relays it to its connections, breadth first."""
        if not origin._accept(topic, GossipMessage(origin.node_id, origin.node_id, data), msg_id):
            return
        frontier = [origin]
        while frontier:
            nxt = []
            for t in frontier:
                for peer in sorted(self._peers_of(t.node_id)):
                    target = self._transports.get(peer)
                    if target is None or not target.alive or self._silent(t.node_id, peer):
                        continue
                    msg = GossipMessage(sender=origin.node_id, forwarder=t.node_id, data=data)
                    if target._accept(topic, msg, msg_id):
                        nxt.append(target)
            frontier = nxt

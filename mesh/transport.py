"""The only module that imports libp2p: a host, gossipsub, dialing, and connection events.

Everything above this module speaks in plain types (node ids as text, multiaddrs as text, bytes). The
workarounds for py-libp2p's defects live here, each with a comment naming the upstream behaviour and
the version it was written for (``LIBP2P_VERSION``; pyproject pins it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import ipaddress
import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream, INetwork, INotifee, IRawConnection
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from mesh.errors import OversizeError, PeerError
from mesh.identity import Identity
from mesh.ids import NodeId

log = logging.getLogger(__name__)

LIBP2P_VERSION = "0.8.1"
if importlib.metadata.version("libp2p") != LIBP2P_VERSION:  # pragma: no cover - a packaging mistake
    log.warning("libp2p %s installed; the workarounds in %s were written for %s",
                importlib.metadata.version("libp2p"), __name__, LIBP2P_VERSION)
GOSSIP_PROTOCOLS = ["/meshsub/1.1.0", "/meshsub/1.0.0"]
PING_PROTOCOL = "/meshnode/ping/1"
#: A dial that takes longer than this on a LAN is a dead address; the next round tries again.
DIAL_TIMEOUT = 5.0
#: Deadline of one stream operation (open, read, write) unless the caller gives its own.
STREAM_TIMEOUT = 5.0
#: Liveness pings on every connection (libp2p's health monitor): one that fails aborts the connection.
PING_INTERVAL = 5.0
#: Frames of the request/response protocols are length-prefixed (4 bytes, big endian).
_FRAME_HEADER = struct.Struct(">I")


class DialError(PeerError):
    code = "DIAL_FAILED"


class PeerTimeoutError(PeerError):
    """A peer did not answer in time: frozen, overloaded, or its connection silently died."""

    code = "PEER_TIMEOUT"


class StreamClosedError(PeerError):
    """The peer closed or reset the stream before the exchange was complete."""

    code = "STREAM_CLOSED"


class PeerUnreachableError(PeerError):
    """No connection to the peer and no address we may dial."""

    code = "PEER_UNREACHABLE"


@dataclass(frozen=True, slots=True)
class GossipMessage:
    sender: NodeId  # the original publisher (gossipsub keeps it across relays)
    #: The connected peer that relayed it here: validators are told; a subscription is not (py-libp2p's
    #: subscription queue keeps only the message), so there it is None, in both transports.
    forwarder: NodeId | None
    data: bytes


def is_loopback_addr(addr: str) -> bool:
    """True when a multiaddr starts with a loopback IP (127.0.0.0/8 or ::1): the only addresses tests
    and demos may dial. DNS names and anything unparsable count as not loopback."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def peer_id_of(addr: str) -> NodeId:
    """The /p2p/ component of a full multiaddr; PeerError when it has none or cannot be parsed."""
    try:
        return NodeId(info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id.to_base58())
    except Exception as exc:  # multiaddr and libp2p raise many unrelated types for a bad address
        raise PeerError(f"not a full multiaddr with /p2p/<peer id>: {addr!r} ({exc})", code="BAD_MULTIADDR") from None


class Stream:
    """A libp2p stream where every operation has a deadline and failures are PeerErrors.

    libp2p 0.8.1: a read from or write to a silent (stopped) peer blocks forever, so nothing here
    waits without ``trio.fail_after``.
    """

    def __init__(self, raw: INetStream, peer: NodeId, timeout: float) -> None:
        self._raw = raw
        self.peer = peer
        self.timeout = timeout

    async def _io(self, what: str, op: Callable[[], Awaitable[Any]], timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                return await op()
        except trio.TooSlowError:
            raise PeerTimeoutError(f"{what} to/from {self.peer} took longer than {limit}s") from None
        except StreamEOF:
            raise StreamClosedError(f"{self.peer} closed the stream during {what}") from None
        except PeerError:
            raise
        except Exception as exc:  # libp2p raises StreamReset, StreamError, MuxedConnUnavailable, ...
            raise StreamClosedError(f"{what} with {self.peer} failed: {type(exc).__name__}: {exc}") from None

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        await self._io("write", lambda: self._raw.write(data), timeout)

    async def read_exactly(self, n: int, *, timeout: float | None = None) -> bytes:
        deadline = trio.current_time() + (self.timeout if timeout is None else timeout)
        buf = bytearray()
        while len(buf) < n:
            left = max(0.0, deadline - trio.current_time())
            chunk = await self._io("read", functools.partial(self._raw.read, n - len(buf)), left)
            if not chunk:
                raise StreamClosedError(f"{self.peer} closed the stream after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def read_some(self, max_bytes: int, *, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes``, as soon as any arrive; the deadline is for silence, not for a full read
        (a slow but steady sender is not a stalled one). STREAM_CLOSED at the end of the stream."""
        chunk = await self._io("read", functools.partial(self._raw.read, max_bytes), timeout)
        if not chunk:
            raise StreamClosedError(f"{self.peer} closed the stream")
        return chunk

    async def send_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        await self.write(_FRAME_HEADER.pack(len(data)) + data, timeout=timeout)

    async def receive_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        """One length-prefixed frame; OversizeError before reading a body larger than ``max_size``."""
        limit = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        (size,) = _FRAME_HEADER.unpack(await self.read_exactly(_FRAME_HEADER.size, timeout=limit))
        if size > max_size:
            raise OversizeError(f"frame of {size} bytes from {self.peer} exceeds {max_size}")
        return await self.read_exactly(size, timeout=max(0.0, deadline - trio.current_time()))

    async def close(self) -> None:
        """Half-close politely; never waits long on a peer that stopped reading."""
        with trio.move_on_after(1.0):
            try:
                await self._raw.close()
                return
            except Exception:  # already reset or the connection is gone: nothing left to close
                pass
        await self.reset()

    async def reset(self) -> None:
        with trio.move_on_after(1.0):
            try:
                await self._raw.reset()
            except Exception:  # the connection is already gone
                pass


@asynccontextmanager
async def owned(stream: Stream) -> AsyncIterator[Stream]:
    """``stream`` for the block: closed when it ends, reset when it raises (or is cancelled)."""
    try:
        yield stream
    except BaseException:
        await stream.reset()
        raise
    await stream.close()


@asynccontextmanager
async def opened(new: Callable[[], Awaitable[Any]], peer: NodeId, protocol: str, timeout: float
                 ) -> AsyncIterator[Stream]:
    """A stream from ``new()`` (a raw stream with read/write/close/reset) for the block, as ``owned``;
    PeerTimeoutError when it is not open within ``timeout``."""
    try:
        with trio.fail_after(timeout):
            raw = await new()
    except trio.TooSlowError:
        raise PeerTimeoutError(f"opening {protocol} to {peer} took longer than {timeout}s") from None
    async with owned(Stream(raw, peer, timeout)) as stream:
        yield stream


async def serve_stream(protocol: str, handler: Callable[[Stream], Awaitable[None]], stream: Stream) -> None:
    """The boundary of one inbound stream: a PeerError resets it and is logged with its code; any other
    exception is logged as INTERNAL and resets it (a bug in one handler must not take the connection, or the
    peer, down); a handler that returns closes it."""
    try:
        await handler(stream)
    except PeerError as err:
        log.info("%s from %s failed: %s %s", protocol, stream.peer, err.code, err,
                 extra={"event": "stream_failed", "code": err.code, "peer": stream.peer})
        await stream.reset()
        return
    except Exception:
        log.exception("%s handler failed for a stream from %s", protocol, stream.peer,
                      extra={"event": "stream_failed", "code": "INTERNAL", "peer": stream.peer})
        await stream.reset()
        return
    await stream.close()


async def ping_over(streams: Any, peer: NodeId, timeout: float) -> float:
    """Round-trip time of one small frame over a fresh ping stream of ``streams`` (either transport), from
    its send to its echo: the stream's opening (protocol negotiation, more round trips) is not counted, so
    it is the link's time as activations on an open stream see it. PEER_TIMEOUT when the whole exchange,
    opening included, takes longer than ``timeout``; BAD_PING_REPLY for other bytes."""
    payload = secrets.token_bytes(16)
    try:
        with trio.fail_after(timeout):  # one deadline for the whole exchange, not one per step
            async with streams.open_stream(peer, PING_PROTOCOL, timeout=timeout) as stream:
                start = trio.current_time()
                await stream.send_frame(payload)
                echo = await stream.receive_frame(len(payload))
    except trio.TooSlowError:
        raise PeerTimeoutError(f"no ping reply from {peer} within {timeout}s") from None
    if echo != payload:
        raise PeerError(f"{peer} answered the ping with other bytes", code="BAD_PING_REPLY")
    return trio.current_time() - start


async def answer_ping(stream: Stream) -> None:
    """The ``/meshnode/ping/1`` handler: echo one small frame."""
    await stream.send_frame(await stream.receive_frame(64))


def _fix_inbound_connection_leak(swarm: Swarm) -> None:
    """libp2p 0.8.1: ``Swarm._do_handle_inbound_connection`` keeps each inbound connection's handler
    (a task, and a slot of the inbound limiter) until the whole swarm stops (``manager.wait_finished``),
    so after ``max_connections - min_connections`` (250) inbound connections the node refuses every new
    one for the rest of its life. This replacement does the same upgrade, then waits for its own
    connection to close. (TCP only: pre-multiplexed transports such as QUIC keep the original path.)"""
    original = swarm._do_handle_inbound_connection

    async def handle(read_write_closer: Any, maddr: multiaddr.Multiaddr, failure_event: Any) -> None:
        if isinstance(read_write_closer, IMuxedConn):
            await original(read_write_closer, maddr, failure_event)
            return
        remote = swarm._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await swarm.connection_gate.is_allowed(remote):
            await _close_quietly(read_write_closer)
            return
        raw: IRawConnection = RawConnection(read_write_closer, False)
        try:
            muxed = await swarm.upgrade_inbound_raw_conn(raw, maddr)
        except Exception as exc:  # a failed handshake: bad key, wrong protocol, limits, a port scan
            log.debug("inbound connection on %s failed: %s", maddr, exc)
            await _close_quietly(raw)
            return
        # The listener closes the socket when this handler returns, so wait for the connection's end.
        await muxed.event_closed.wait()  # type: ignore[attr-defined]  # yamux (muxer_preference below)

    swarm._do_handle_inbound_connection = handle  # type: ignore[method-assign]


def _disable_auto_connector(swarm: Swarm) -> None:
    """libp2p 0.8.1: the swarm's auto-connector dials up to 200 peers out of the peerstore whenever it has
    fewer connections than its watermarks (every 30 s, and after every disconnect): addresses we never
    chose (non-loopback ones learned from other peers included) and peers closed on purpose. Our dialer
    owns dialing (bootstrap, members, loopback-only when asked), so the auto-connector never dials."""

    async def never() -> None:
        return None

    swarm.auto_connector.maybe_connect = never  # type: ignore[method-assign]


class _PeerStore(PeerStore):
    """libp2p 0.8.1: once the peerstore holds more than ``max_peers`` (1000) peers it evicts entries
    without addresses first, and the host's own entry (its keys) is one of them: from then on identify
    fails on every connection and the node is dead. This store never evicts its own host or a peer it is
    connected to; the rest goes in the same order as upstream (no addresses first, then expired)."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: Callable[[], set[ID]] = set

    def _enforce_peer_limit(self) -> None:
        excess = len(self.peer_data_map) - self.max_peers
        if excess <= 0:
            return
        keep = self.keep()
        candidates = [(bool(data.get_addrs()), not data.is_expired(), pid)
                      for pid, data in self.peer_data_map.items() if pid not in keep]
        candidates.sort(key=lambda c: c[:2])
        for _, _, pid in candidates[:excess]:
            self.peer_record_map.pop(pid, None)
            del self.peer_data_map[pid]


async def _close_quietly(conn: Any) -> None:
    with trio.move_on_after(1.0):
        try:
            await conn.close()
        except Exception:  # already closed by the other side
            pass


class _Notifee(INotifee):
    def __init__(self, on_change: Callable[[NodeId, bool], None]) -> None:
        self._on_change = on_change

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_change(NodeId(conn.muxed_conn.peer_id.to_base58()), True)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_change(NodeId(conn.muxed_conn.peer_id.to_base58()), False)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class Transport:
    """A running libp2p host with gossipsub. Create with ``Transport.open(...)``."""

    def __init__(self, host: IHost, pubsub: Pubsub, identity: Identity, loopback_only: bool) -> None:
        self._host = host
        self._loopback_only = loopback_only
        self._connected_since: dict[NodeId, float] = {}
        self._closing: dict[NodeId, trio.Event] = {}
        self._pubsub = pubsub
        self.node_id: NodeId = identity.node_id
        self._discovered_send, self.discovered = trio.open_memory_channel[str](64)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        identity: Identity,
        listen: Sequence[str],
        *,
        mdns: bool = False,
        loopback_only: bool = False,
        gossip_heartbeat: float = 1.0,
    ) -> AsyncIterator[Transport]:
        key_pair = create_new_key_pair(identity.seed)
        conn_config = ConnectionConfig(
            # libp2p 0.8.1: with the default max_connections_per_peer=3 every connect waits ~250 ms
            # ("happy eyeballs" across connection slots); one connection per peer connects in ~10 ms.
            max_connections_per_peer=1,
            # libp2p 0.8.1: a frozen or vanished peer (SIGSTOP, power cut, cable pulled) produces no
            # event at all and its connection stays "up" forever. Mesh members are handled by the node
            # (it closes the connection of a member that fell silent: heartbeats are the liveness
            # signal, with their tolerance for a missed beat). For every other connection, ping it and
            # abort it after one failed ping; upstream aborts on a single failure, so the interval and
            # timeout are long enough that a busy link (a shard download) never trips it.
            enable_health_monitoring=True,
            health_initial_delay=PING_INTERVAL,
            health_warmup_window=0,
            health_check_interval=PING_INTERVAL,
            ping_timeout=PING_INTERVAL,
            abort_connection_on_ping_failure=True,
        )
        peerstore = _PeerStore()
        host = new_host(
            key_pair=key_pair,
            peerstore_opt=peerstore,
            enable_mDNS=mdns,
            enable_upnp=False,
            connection_config=conn_config,
            muxer_preference="YAMUX",
        )
        _fix_inbound_connection_leak(host.get_network())  # type: ignore[arg-type]
        # libp2p 0.8.1 retries a failed dial 3 times (0.1 + 0.2 + 0.4 s of backoff): the coordinator's ping of
        # a killed peer took 0.7 s to fail instead of the refused connect's milliseconds. Our own loops (the
        # dialer, a stream's one redial) govern the cadence instead.
        host.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
        _disable_auto_connector(host.get_network())  # type: ignore[arg-type]
        peerstore.keep = lambda: {host.get_id(), *host.get_connected_peers()}
        gossipsub = GossipSub(
            protocols=GOSSIP_PROTOCOLS,
            degree=6,
            degree_low=4,
            degree_high=12,
            # libp2p 0.8.1 defaults: heartbeat 120 s (far too slow to heal a mesh), adaptive gossip
            # stretches it to 60 s after ~30 s, and spam protection drops a relay's 11th message per
            # second per topic. We bound load ourselves (one heartbeat per peer per interval).
            heartbeat_interval=max(1, round(gossip_heartbeat)),
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,
            prune_back_off=10,
        )
        pubsub = Pubsub(host, gossipsub)
        listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
        # An error raised by the caller's block is re-raised as itself once the host is closed, not
        # wrapped in the ExceptionGroups of the libp2p service nurseries it passes through.
        body_error: Exception | None = None
        async with host.run(listen_addrs=listen_addrs):
            transport = cls(host, pubsub, identity, loopback_only)
            transport.handle(PING_PROTOCOL, answer_ping, timeout=2.0)
            host.get_network().register_notifee(_Notifee(transport._on_connection))
            handler = transport._on_mdns_peer
            if mdns:
                peerDiscovery.register_peer_discovered_handler(handler)
            async def close_host() -> None:
                # libp2p 0.8.1: leaving host.run() does not close the listener (it keeps accepting);
                # an explicit close inside run() releases the port for an immediate restart.
                with trio.move_on_after(2.0) as scope:
                    scope.shield = True
                    await host.close()

            try:
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    transport._trio_token = trio.lowlevel.current_trio_token()
                    try:
                        yield transport
                    except Exception as exc:
                        body_error = exc
                    finally:
                        # Connections close before pubsub stops: libp2p 0.8.1 otherwise lets a late
                        # subscription message reach the stopped pubsub, whose "Nursery is closed to new
                        # arrivals" RuntimeError then escapes from the host.
                        await close_host()
            finally:
                if mdns:
                    peerDiscovery.unregister_peer_discovered_handler(handler)
                await close_host()  # idempotent; covers a failure while the services started
                # libp2p 0.8.1: every Pubsub starts a sweeper thread for its seen-messages cache and
                # nothing stops it; a process that opens and closes hosts would keep one per host.
                pubsub.seen_messages.stop()
        if body_error is not None:
            raise body_error

    # ---- addresses and connections ---------------------------------------------------------------

    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) others can dial, the real port filled in."""
        return [str(a) for a in self._host.get_addrs()]

    def connected_peers(self) -> set[NodeId]:
        return {NodeId(p.to_base58()) for p in self._host.get_connected_peers()}

    def connection_age(self, peer: NodeId) -> float | None:
        """Seconds since the current connection to ``peer`` opened; None when not connected."""
        since = self._connected_since.get(peer)
        if since is None or peer not in self.connected_peers():
            return None
        return trio.current_time() - since

    async def disconnect(self, peer: NodeId) -> None:
        """Close every connection to ``peer`` (bounded: a frozen peer cannot hold this up)."""
        if peer in self._closing:
            return
        self._closing[peer] = done = trio.Event()
        try:
            with trio.move_on_after(2.0):
                try:
                    await self._host.disconnect(ID.from_base58(peer))
                except Exception as exc:  # already gone, or libp2p failed half-way: nothing more to do
                    log.debug("disconnect %s: %s", peer, exc)
        finally:
            del self._closing[peer]
            done.set()

    def _on_connection(self, peer: NodeId, up: bool) -> None:
        log.debug("connection %s peer=%s", "up" if up else "down", peer)
        if up:
            self._connected_since[peer] = trio.current_time()
        elif peer not in self.connected_peers():
            self._connected_since.pop(peer, None)

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        """Runs on zeroconf's thread: hand the address to trio, which dials it."""
        for addr in info.addrs:
            full = f"{addr}/p2p/{info.peer_id.to_base58()}"
            try:
                trio.from_thread.run_sync(self._discovered_send.send_nowait, full, trio_token=self._trio_token)
            except (trio.WouldBlock, trio.RunFinishedError):
                log.debug("mdns discovery queue full, dropping %s (rediscovered later)", full)

    async def connect(self, addr: str) -> NodeId:
        """Dial a full multiaddr; returns the peer id. Raises PeerError(BAD_MULTIADDR/DIAL_FAILED)."""
        peer = peer_id_of(addr)
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        # libp2p 0.8.1: a failed dial blocks that peer for 60 s, so a peer restarted on the same key
        # and port could not be re-dialed for a minute. Our own retry cadence governs instead.
        self._host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise DialError(f"dial {addr} timed out after {DIAL_TIMEOUT}s") from None
        except Exception as exc:  # libp2p raises many unrelated types for a failed dial
            raise DialError(f"dial {addr} failed: {exc}") from None
        return peer

    # ---- streams ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def open_stream(self, peer: NodeId, protocol: str, *, timeout: float = STREAM_TIMEOUT
                          ) -> AsyncIterator[Stream]:
        """A new stream to ``peer`` (dialing it first if needed), closed on exit, reset on error.
        PeerTimeoutError when the peer does not answer within ``timeout``."""
        async with opened(lambda: self._new_stream(peer, protocol), peer, protocol, timeout) as stream:
            yield stream

    async def _new_stream(self, peer: NodeId, protocol: str) -> INetStream:
        for attempt in (1, 2):
            if (closing := self._closing.get(peer)) is not None:
                await closing.wait()  # a connection being closed must not be used for a new stream
            if peer not in self.connected_peers():
                await self._redial(peer)
            try:
                return await self._host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
            except Exception as exc:  # libp2p: StreamFailure, SwarmException, MultiselectClientError, ...
                if attempt == 1 and (peer in self._closing or peer not in self.connected_peers()):
                    continue  # the connection died under us (closed as silent, replaced): dial afresh once
                raise StreamClosedError(f"cannot open {protocol} to {peer}: {type(exc).__name__}: {exc}") from None
        raise AssertionError("unreachable")

    async def _redial(self, peer: NodeId) -> None:
        try:
            known = self._host.get_peerstore().addrs(ID.from_base58(peer))
        except Exception:  # libp2p: PeerStoreError for a peer never seen, ValueError for a bad id
            known = []
        addrs = [f"{a}/p2p/{peer}" for a in known]
        if self._loopback_only:
            addrs = [a for a in addrs if is_loopback_addr(a)]
        if not addrs:
            raise PeerUnreachableError(f"not connected to {peer} and no address to dial")
        await self.connect(addrs[0])

    def handle(self, protocol: str, handler: Callable[[Stream], Awaitable[None]], *,
               max_concurrent: int = 16, timeout: float = STREAM_TIMEOUT) -> None:
        """Serve ``protocol``: ``handler`` runs once per inbound stream, at most ``max_concurrent`` at
        a time (more wait: back-pressure). A PeerError resets the stream and is logged with its code."""
        limiter = trio.CapacityLimiter(max_concurrent)

        async def on_stream(raw: INetStream) -> None:
            peer = NodeId(raw.muxed_conn.peer_id.to_base58())
            stream = Stream(raw, peer, timeout)
            async with limiter:
                await serve_stream(protocol, handler, stream)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    async def ping(self, peer: NodeId, *, timeout: float = 2.0) -> float:
        """Round-trip time in seconds over a fresh ``/meshnode/ping/1`` stream."""
        return await ping_over(self, peer, timeout)

    # ---- gossip ----------------------------------------------------------------------------------

    def set_validator(self, topic: str, accept: Callable[[GossipMessage], bool]) -> None:
        """Messages that ``accept`` refuses are neither delivered nor relayed."""

        def validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            return accept(_gossip_message(forwarder, msg))

        self._pubsub.set_topic_validator(topic, validator, False)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._pubsub.publish(topic, data)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[AsyncIterator[GossipMessage]]:
        sub = await self._pubsub.subscribe(topic)

        async def messages() -> AsyncIterator[GossipMessage]:
            async for msg in sub:
                yield _gossip_message(None, msg)

        yield messages()


def _gossip_message(forwarder: ID | None, msg: rpc_pb2.Message) -> GossipMessage:
    return GossipMessage(sender=NodeId(ID(msg.from_id).to_base58()),
                         forwarder=NodeId(forwarder.to_base58()) if forwarder is not None else None, data=msg.data)

"""The only module that imports libp2p: a host, gossipsub, dialing, and connection events.

Everything above this module speaks in plain types (node ids as text, multiaddrs as text, bytes). The
workarounds for py-libp2p's defects live here, each with a comment naming the upstream behaviour and
the version it was written for (``LIBP2P_VERSION``; pyproject pins it).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.ids import NodeId

log = logging.getLogger(__name__)

LIBP2P_VERSION = "0.8.1"
GOSSIP_PROTOCOLS = ["/meshsub/1.1.0", "/meshsub/1.0.0"]
#: A dial that takes longer than this on a LAN is a dead address; the next round tries again.
DIAL_TIMEOUT = 5.0


class DialError(PeerError):
    code = "DIAL_FAILED"
    http_status = 502


@dataclass(frozen=True, slots=True)
class GossipMessage:
    sender: NodeId  # the original publisher (gossipsub keeps it across relays)
    forwarder: NodeId
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

    def __init__(self, host: IHost, pubsub: Pubsub, identity: Identity) -> None:
        self._host = host
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
        gossip_heartbeat: float = 1.0,
    ) -> AsyncIterator[Transport]:
        key_pair = create_new_key_pair(identity.seed)
        # libp2p 0.8.1: with the default max_connections_per_peer=3 every connect waits ~250 ms
        # ("happy eyeballs" across connection slots); one connection per peer connects in ~10 ms.
        conn_config = ConnectionConfig(max_connections_per_peer=1)
        host = new_host(
            key_pair=key_pair,
            enable_mDNS=mdns,
            enable_upnp=False,
            connection_config=conn_config,
        )
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
        async with host.run(listen_addrs=listen_addrs):
            transport = cls(host, pubsub, identity)
            host.get_network().register_notifee(_Notifee(transport._on_connection))
            handler = transport._on_mdns_peer
            if mdns:
                peerDiscovery.register_peer_discovered_handler(handler)
            try:
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    transport._trio_token = trio.lowlevel.current_trio_token()
                    yield transport
            finally:
                if mdns:
                    peerDiscovery.unregister_peer_discovered_handler(handler)
                # libp2p 0.8.1: leaving host.run() does not close the listener (it keeps accepting);
                # an explicit close inside run() releases the port for an immediate restart.
                with trio.move_on_after(2.0) as scope:
                    scope.shield = True
                    await host.close()

    # ---- addresses and connections ---------------------------------------------------------------

    def addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) others can dial, the real port filled in."""
        return [str(a) for a in self._host.get_addrs()]

    def connected_peers(self) -> set[NodeId]:
        return {NodeId(p.to_base58()) for p in self._host.get_connected_peers()}

    def _on_connection(self, peer: NodeId, up: bool) -> None:
        log.debug("connection %s peer=%s", "up" if up else "down", peer)

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
                yield _gossip_message(ID(msg.from_id), msg)

        yield messages()


def _gossip_message(forwarder: ID, msg: rpc_pb2.Message) -> GossipMessage:
    return GossipMessage(
        sender=NodeId(ID(msg.from_id).to_base58()), forwarder=NodeId(forwarder.to_base58()), data=msg.data
    )

"""The narrow interfaces services are built from: structural types, so any object with these members fits.

A service (``coordinator.service.PlanService``, ``inference.host.StageHost``, ``inference.driver.Driver``,
``storage.library.Library``) gets what it uses in its constructor: a view of the membership, streams or gossip
of a network, the current plans, the model library, a clock, a signer, an executor for blocking work. It never
gets the whole peer and never imports another service: what one must tell another travels through a callback
that the composition root (``mesh.app``) wires. In a peer these are the libp2p ``Transport``, the
``PeerCore``, trio's clock and worker threads; in the in-process mesh (``mesh.app.inproc``) the memory
transport twin, the same core, a virtual clock and an executor that runs inline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from coordinator.election import Leadership
from mesh.ids import NodeId
from mesh.membership import Member
from mesh.transport import GossipMessage, Stream
from mesh.wire import NodeStatus
from storage.manifest import Manifest, Shard

T = TypeVar("T")

#: Seconds on the mesh's clock (``trio.current_time`` in a peer, a virtual clock in tests).
Clock = Callable[[], float]


class Offload(Protocol):
    """Runs blocking work (torch, planning, file I/O) off the event loop: a worker thread in a peer
    (``threads``), inline in the in-process mesh, where a virtual clock must not jump while a thread runs."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


async def threads(fn: Callable[..., T], /, *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


async def abandoning(fn: Callable[..., T], /, *args: Any) -> T:
    """A worker thread that a cancel leaves behind (its result is dropped): for a read whose caller keeps
    its last answer rather than wait, such as the heartbeat's look at the model store."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


async def inline(fn: Callable[..., T], /, *args: Any) -> T:
    await trio.lowlevel.checkpoint()
    return fn(*args)


class Signer(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    def sign(self, message: bytes) -> bytes: ...


class Members(Protocol):
    def get(self, node_id: NodeId) -> Member | None: ...

    def members(self) -> list[Member]: ...

    def live(self) -> list[Member]: ...


class MeshView(Protocol):
    """What a service may read about the mesh: this peer's id and status, the members, the coordinator."""

    node_id: NodeId
    status: NodeStatus
    membership: Members

    @property
    def leadership(self) -> Leadership: ...


class Streams(Protocol):
    def open_stream(self, peer: NodeId, protocol: str, *, timeout: float = ...
                    ) -> AbstractAsyncContextManager[Stream]: ...


class Gossip(Protocol):
    async def publish(self, topic: str, data: bytes) -> None: ...

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[AsyncIterator[GossipMessage]]: ...


class Library(Protocol):
    """A model's files on this peer: signed manifests and shards, fetched from the peers that hold them."""

    @property
    def shard_dir(self) -> Path: ...

    def holders(self, model: str, revision: str | None) -> list[NodeId]: ...

    async def manifest(self, model: str, revision: str | None) -> tuple[Manifest, bytes]: ...

    async def ensure(self, manifest: Manifest, shards: Sequence[Shard], *,
                     priority: int = 0) -> tuple[Path, dict[str, Path]]: ...  # storage.queue: NORMAL 0, LOW -10


class Network(Streams, Gossip, Protocol):
    """Everything the root uses of a transport: ``mesh.transport.Transport`` (libp2p) or its in-memory twin
    ``mesh.memtransport.MemoryTransport``."""

    node_id: NodeId
    discovered: trio.MemoryReceiveChannel[str]

    def addrs(self) -> list[str]: ...

    def connected_peers(self) -> set[NodeId]: ...

    def connection_age(self, peer: NodeId) -> float | None: ...

    async def connect(self, addr: str) -> NodeId: ...

    async def disconnect(self, peer: NodeId) -> None: ...

    async def ping(self, peer: NodeId, *, timeout: float = ...) -> float: ...

    def handle(self, protocol: str, handler: Callable[[Stream], Awaitable[None]], *, max_concurrent: int = ...,
               timeout: float = ...) -> None: ...

    def set_validator(self, topic: str, accept: Callable[[GossipMessage], bool]) -> None: ...

"""Whole peers in one ``trio.run``: the real core, the real services, real stores and real torch models, on the
memory transport twin (``mesh.memtransport``) and an executor that runs blocking work inline, so a virtual
clock (``trio.testing.MockClock(autojump_threshold=0)``) drives them all deterministically. What only
processes show (kill -9 of a process, real libp2p, real HTTP) stays with ``mesh.app.localmesh``.

    async with InProcessMesh(tmp_path, config) as mesh:
        a = await mesh.start("a")
        b = await mesh.start("b")          # bootstraps from every peer started before it
        await mesh.wait(lambda: mesh.agreed(), timeout=10)
        mesh.kill("b")                     # as kill -9: connections drop, its tasks stop at once
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mesh import admission as adm
from mesh import credential
from mesh.app.node import VERSION, Node
from mesh.config import Config, NetworkConfig
from mesh.credential import Membership
from mesh.gate import redeem
from mesh.identity import Identity
from mesh.keyfile import load_or_create
from mesh.memtransport import MemoryNetwork
from mesh.peer import PeerCore, PeerProfile
from mesh.ports import inline
from mesh.wire import NodeStatus
from storage.store import Store

#: Config of an in-process peer: no mDNS, no API, loopback addresses of the memory network only.
MEMORY_NETWORK = NetworkConfig(listen=(), mdns=False, loopback_only=True, dial_interval=1.0)


@dataclasses.dataclass
class Peer:
    name: str
    node: Node
    scope: trio.CancelScope

    @property
    def node_id(self) -> str:
        return self.node.node_id


class InProcessMesh:
    def __init__(self, base: Path, config: Config | None = None) -> None:
        config = config or Config()
        self.base = base
        self.config = dataclasses.replace(config, network=MEMORY_NETWORK,
                                          api=dataclasses.replace(config.api, listen=""))
        self.network = MemoryNetwork()
        self.peers: dict[str, Peer] = {}
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> InProcessMesh:
        self._cm = self._run()
        await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._cm.__aexit__(*exc)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    def store(self, name: str) -> Store:
        """A peer's store (its data dir made on first use), e.g. to add a model before the peer starts."""
        data_dir = self.base / name
        return Store(data_dir / "store", load_or_create(data_dir))

    async def join(self, name: str, invite: adm.Invite) -> Membership:
        """Redeem ``invite`` for peer ``name`` (its identity, on this network, before it starts) and keep it."""
        identity = load_or_create(self.base / name)
        async with self.network.open(identity) as transport:
            chain = await redeem(transport, invite)
        return credential.joined(self.base / name, chain, identity)

    async def _membership(self, name: str, identity: Identity) -> Membership:
        """A closed mesh, as ``meshnode start`` runs it: the peer's saved membership; else the first peer
        founds the mesh and a later one joins with an invite from the first live member."""
        data_dir = self.base / name
        saved = credential.load(data_dir, identity)
        if saved is not None:
            return saved
        issuer = next((p for p in self.live() if p.node.gate is not None), None)
        if issuer is None:
            return credential.found(data_dir, identity, trio.current_time())
        assert issuer.node.gate is not None
        invite = await issuer.node.gate.invite(600.0, 1, tuple(issuer.node.transport.addrs()))
        return await self.join(name, invite)

    async def start(self, name: str, *, flops: float = 1e10, layer_memory: int = 1 << 34, bandwidth: float = 0.0,
                    overhead: dict[str, float] | None = None, kernels: dict[str, float] | None = None,
                    bootstrap: bool = True, membership: Membership | None = None, open: bool = False,
                    **inference: Any) -> Peer:
        """Start peer ``name`` and return once it runs; it bootstraps from every live peer started before it.
        A closed mesh unless ``open`` (``membership`` given: that one; else as ``_membership`` says)."""
        assert self._nursery is not None, "use InProcessMesh as an async context manager"
        data_dir = self.base / name
        identity = load_or_create(data_dir)
        if membership is None and not open:
            membership = await self._membership(name, identity)
        addrs = tuple(a for p in self.peers.values() if not p.scope.cancel_called for a in p.node.transport.addrs())
        cfg = dataclasses.replace(
            self.config, node=dataclasses.replace(self.config.node, name=name, data_dir=str(data_dir)),
            network=dataclasses.replace(self.config.network, bootstrap=addrs if bootstrap else ()),
            inference=dataclasses.replace(self.config.inference, **inference))
        profile = PeerProfile(version=VERSION, name=name, incarnation=int(time.time() * 1000),
                              accept_public_jobs=cfg.node.accept_public_jobs,
                              min_free_memory_gb=0.0, layer_memory_bytes=layer_memory,
                              features_supported=("gossip-v1", "election-v1"))
        core = PeerCore(identity, profile, cfg.membership, trio.current_time())
        store = Store(data_dir / "store", identity)
        started: list[Peer] = []

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                async with self.network.open(identity) as transport:
                    node = Node(cfg, identity, core, transport, (), flops, store, offload=inline, reads=inline,
                                membership=membership, wall_clock=trio.current_time, bandwidth=bandwidth,
                                overhead=overhead, kernels=kernels)
                    started.append(Peer(name, node, scope))
                    await node.run(task_status=task_status)

        await self._nursery.start(run)
        self.peers[name] = started[0]
        return started[0]

    def kill(self, name: str) -> None:
        """As kill -9: its connections drop at once and its tasks stop, without a goodbye."""
        peer = self.peers[name]
        self.network.crash(peer.node_id)
        peer.scope.cancel()

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if not p.scope.cancel_called]

    def agreed(self) -> bool:
        """Every live peer sees every other live peer ready and names the same coordinator."""
        live = self.live()
        ids = {p.node_id for p in live}
        leads = set()
        for p in live:
            seen = {m.node_id for m in p.node.core.membership.members() if m.status == NodeStatus.READY}
            if not ids <= seen | {p.node_id}:
                return False
            leads.add(p.node.core.leadership.coordinator)
        return len(leads) == 1 and None not in leads and leads <= ids

    async def wait(self, cond: Callable[[], Any], *, timeout: float, what: str = "the condition") -> Any:
        """Poll ``cond`` on the mesh's clock until it is truthy; TooSlowError after ``timeout`` seconds."""
        with trio.fail_after(timeout if math.isfinite(timeout) else 3600):
            while not (value := cond()):
                await trio.sleep(0.05)
        return value

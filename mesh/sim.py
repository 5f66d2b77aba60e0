"""A deterministic, socket-free simulation of a whole mesh, driving the real ``PeerCore``.

Messages are real signed CBOR envelopes; only the network is simulated: a publish reaches every live
peer in the sender's partition after ``latency`` seconds, in a seeded random order. Time is virtual, so
a 100-peer mesh runs in seconds and every run with the same seed is identical. Tests and
``bench/membership.py`` use it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.membership import MembershipConfig
from mesh.peer import PeerCore, PeerProfile
from mesh.wire import Hardware, NodeStatus


@dataclass
class SimPeer:
    index: int
    identity: Identity
    flops: float
    core: PeerCore | None = None
    alive: bool = False
    group: int = 0
    next_beat: float = 0.0
    next_tick: float = 0.0

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id


@dataclass
class SimMesh:
    size: int
    seed: int = 0
    config: MembershipConfig = field(default_factory=MembershipConfig)
    tick_interval: float = 0.25
    latency: float = 0.02
    step: float = 0.01
    now: float = 0.0
    rejected: list[tuple[NodeId, str]] = field(default_factory=list)
    delivered: int = 0  # messages delivered (each one signature-verified by its receiver)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.peers = [
            SimPeer(i, Identity.from_seed(self.rng.randbytes(32)), flops=self.rng.uniform(1e9, 1e11))
            for i in range(self.size)
        ]
        self._queue: list[tuple[float, int, int, bytes]] = []
        self._order = 0
        self.hardware = Hardware(cpu_cores=4, memory_gb=16.0, memory_free_gb=8.0)

    # ---- scenario controls -----------------------------------------------------------------------

    def start(self, index: int) -> None:
        p = self.peers[index]
        profile = PeerProfile(version="sim", name=f"p{index}", incarnation=int(self.now * 1000) + 1)
        p.core = PeerCore(p.identity, profile, self.config, self.now)
        p.alive = True
        p.next_beat = self.now + self.rng.uniform(0, self.config.heartbeat_interval)
        p.next_tick = self.now + self.rng.uniform(0, self.tick_interval)

    def kill(self, index: int) -> None:
        """A crash: no goodbye, messages in flight to it are lost."""
        self.peers[index].alive = False

    def partition(self, *groups: set[int]) -> None:
        for g, members in enumerate(groups):
            for i in members:
                self.peers[i].group = g

    def heal(self) -> None:
        for p in self.peers:
            p.group = 0

    def inject(self, index: int, data: bytes) -> None:
        """Deliver raw bytes (garbage, forgeries) to one peer now."""
        self._deliver(self.peers[index], data)

    # ---- time ------------------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self._step()

    def run_until(self, predicate: Callable[[SimMesh], bool], timeout: float) -> float | None:
        """Advance until ``predicate(self)`` holds; returns the virtual time taken, None on timeout."""
        start = self.now
        while self.now - start < timeout:
            if predicate(self):
                return self.now - start
            self._step()
        return self.now - start if predicate(self) else None

    def _step(self) -> None:
        self.now = round(self.now + self.step, 9)
        while self._queue and self._queue[0][0] <= self.now:
            _, _, dst, data = heapq.heappop(self._queue)
            peer = self.peers[dst]
            if peer.alive:
                self._deliver(peer, data)
        for p in self.peers:
            if not p.alive or p.core is None:
                continue
            if p.next_beat <= self.now:
                p.next_beat += self.config.heartbeat_interval
                data, _ = p.core.heartbeat(self.now, hardware=self.hardware, compute_flops=p.flops)
                self._publish(p, data)
            if p.next_tick <= self.now:
                p.next_tick += self.tick_interval
                p.core.tick(self.now)

    def _publish(self, sender: SimPeer, data: bytes) -> None:
        targets = [q.index for q in self.peers if q.alive and q.group == sender.group and q is not sender]
        self.rng.shuffle(targets)
        for dst in targets:
            self._order += 1
            jitter = self.rng.uniform(0, self.latency)
            heapq.heappush(self._queue, (self.now + self.latency + jitter, self._order, dst, data))

    def _deliver(self, peer: SimPeer, data: bytes) -> None:
        assert peer.core is not None
        self.delivered += 1
        try:
            peer.core.receive(data, self.now)
        except PeerError as exc:
            self.rejected.append((peer.node_id, exc.code))

    # ---- observations ----------------------------------------------------------------------------

    def alive_peers(self, group: int | None = None) -> list[SimPeer]:
        return [p for p in self.peers if p.alive and p.core and (group is None or p.group == group)]

    def coordinators(self, group: int | None = None) -> set[NodeId | None]:
        """Whom the live peers (of a group) follow."""
        return {p.core.leadership.coordinator for p in self.alive_peers(group) if p.core}

    def claimants(self, group: int | None = None) -> set[NodeId]:
        return {p.node_id for p in self.alive_peers(group) if p.core and p.core.leadership.coordinator == p.node_id}

    def converged(self, group: int | None = None) -> bool:
        """Every live peer (of the group) sees exactly the live peers as ready, the others as offline,
        and all follow one coordinator, which is one of them and the only claimant."""
        peers = self.alive_peers(group)
        if not peers:
            return False
        expected = {p.node_id for p in peers}
        for p in peers:
            assert p.core is not None
            ready = {m.node_id for m in p.core.membership.members() if m.status == NodeStatus.READY}
            if ready != expected:
                return False
            if any(m.status != NodeStatus.OFFLINE for m in p.core.membership.members()
                   if m.node_id not in expected):
                return False
        coords = self.coordinators(group)
        return len(coords) == 1 and next(iter(coords)) in expected and self.claimants(group) == coords

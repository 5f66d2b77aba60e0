"""The membership table and failure detector: a pure state machine fed with verified heartbeats and time.

No I/O, no clock: every method takes ``now`` (seconds, monotonic) and returns the events it caused, so the
same code runs in the real peer and in a deterministic simulation of a hundred peers.

A remote peer's *effective* status combines what it says about itself with what we observe:

- it said ``offline`` (its goodbye), or we heard nothing for ``offline_after``  → ``offline``
- it said ``draining``                                                         → ``draining``
- we heard nothing for ``suspect_after`` (one or two missed beats)             → ``degraded``
- otherwise what it said (``registering``, ``ready``, ``degraded``)

An offline peer that speaks again (it resumed or restarted) comes back with whatever it then says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mesh.errors import NodeIdConflictError
from mesh.identity import node_id_for_key
from mesh.ids import NodeId
from mesh.wire import NodeInfo, NodeStatus

log = logging.getLogger(__name__)

S = NodeStatus
#: The transitions a peer may make in its own lifecycle (h11-style table). Remote peers are not held to
#: it: their status is observed, and observation can jump (a peer we partitioned from goes straight to
#: offline and back).
SELF_TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    S.REGISTERING: frozenset({S.READY, S.DEGRADED, S.DRAINING, S.OFFLINE}),
    S.READY: frozenset({S.DEGRADED, S.DRAINING, S.OFFLINE}),
    S.DEGRADED: frozenset({S.READY, S.DRAINING, S.OFFLINE}),
    S.DRAINING: frozenset({S.OFFLINE}),
    S.OFFLINE: frozenset(),
}


class IllegalTransition(Exception):
    """A local bug: this peer tried to move its own status along an edge the table forbids."""


def check_transition(old: NodeStatus, new: NodeStatus) -> None:
    if new != old and new not in SELF_TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    # Heartbeats are published every this many seconds.
    heartbeat_interval: float = 1.0
    # Silence after which a peer counts as degraded: one missed beat plus jitter.
    suspect_after: float = 1.6
    # Silence after which a peer counts as offline: two missed beats plus jitter, so a dead peer is
    # detected within 3 s of its last heartbeat with the default 0.25 s tick.
    offline_after: float = 2.6
    # Offline peers are forgotten after this long (the table stays bounded under churn).
    forget_after: float = 300.0
    # Seconds a starting peer stays `registering`, listening for an existing coordinator before it may
    # claim a term itself (two heartbeats: long enough to hear a live mesh).
    registering_for: float = 2.0
    # When set, peers without a GPU stay in the table but are not eligible to coordinate or serve.
    require_gpu: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.suspect_after < self.offline_after < self.forget_after:
            raise ValueError(
                "membership: need 0 < heartbeat_interval < suspect_after < offline_after < forget_after, got "
                f"{self.heartbeat_interval}, {self.suspect_after}, {self.offline_after}, {self.forget_after}"
            )
        if self.registering_for < 0:
            raise ValueError(f"membership: registering_for must be >= 0, got {self.registering_for}")


@dataclass(slots=True)
class Arrivals:
    """How steadily one peer's heartbeats arrive here, since it (re)started: gaps between consecutive
    heartbeats, how many were off pace (outside ±20% of the interval) and how many never came."""

    count: int = 0
    total: float = 0.0
    min: float = 0.0
    max: float = 0.0
    off_pace: int = 0
    missed: int = 0

    def add(self, gap: float, seq_step: int, interval: float) -> None:
        self.min = gap if self.count == 0 else min(self.min, gap)
        self.max = max(self.max, gap)
        self.count += 1
        self.total += gap
        self.off_pace += abs(gap - interval * seq_step) > 0.2 * interval or seq_step != 1
        self.missed += max(0, seq_step - 1)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass(slots=True)
class Member:
    info: NodeInfo
    public_key: bytes
    last_seen: float
    status: NodeStatus
    status_since: float
    arrivals: Arrivals = field(default_factory=Arrivals)

    @property
    def node_id(self) -> NodeId:
        return self.info.node_id


@dataclass(frozen=True, slots=True)
class StatusChanged:
    node_id: NodeId
    old: NodeStatus | None  # None: first time seen
    new: NodeStatus
    reason: str


@dataclass(frozen=True, slots=True)
class Forgotten:
    node_id: NodeId


Event = StatusChanged | Forgotten


@dataclass
class Membership:
    """Everything this peer knows about the mesh, itself included."""

    self_id: NodeId
    config: MembershipConfig = field(default_factory=MembershipConfig)
    _members: dict[NodeId, Member] = field(default_factory=dict)

    # ---- inputs ----------------------------------------------------------------------------------

    def observe(self, info: NodeInfo, public_key: bytes, now: float) -> list[Event]:
        """Take in a verified heartbeat. Returns status events; raises NodeIdConflictError when the
        message claims a node_id owned by another key. Stale and duplicate heartbeats change nothing."""
        if node_id_for_key(public_key) != info.node_id:
            raise NodeIdConflictError(f"node_id {info.node_id} is held by another key")
        member = self._members.get(info.node_id)
        if member is None:
            status = self._effective(info, now, now)
            self._members[info.node_id] = Member(info, public_key, now, status, now)
            return [StatusChanged(info.node_id, None, status, "joined")]
        if (info.incarnation, info.seq) <= (member.info.incarnation, member.info.seq):
            return []  # gossip replay or duplicate delivery
        if info.incarnation != member.info.incarnation:
            reason = "restarted"
            member.arrivals = Arrivals()
        else:
            reason = "heartbeat"
            member.arrivals.add(now - member.last_seen, info.seq - member.info.seq, self.config.heartbeat_interval)
        member.info = info
        member.last_seen = now
        return self._update(member, now, reason)

    def tick(self, now: float) -> list[Event]:
        """Apply timeouts. Call it a few times per heartbeat interval."""
        events: list[Event] = []
        for member in list(self._members.values()):
            if member.node_id == self.self_id:
                continue
            if member.status == S.OFFLINE and now - member.status_since >= self.config.forget_after:
                del self._members[member.node_id]
                events.append(Forgotten(member.node_id))
                continue
            events.extend(self._update(member, now, "timeout"))
        return events

    # ---- queries ---------------------------------------------------------------------------------

    def get(self, node_id: NodeId) -> Member | None:
        return self._members.get(node_id)

    def members(self) -> list[Member]:
        """All members, sorted by node id (a stable order for output and tests)."""
        return [self._members[k] for k in sorted(self._members)]

    def live(self) -> list[Member]:
        return [m for m in self.members() if m.status != S.OFFLINE]

    def eligible(self, member: Member) -> bool:
        """May this member coordinate and serve? Ready, and has a GPU when the policy asks for one."""
        return member.status == S.READY and not (self.config.require_gpu and not member.info.hardware.gpus)

    def issues(self, member: Member, now: float) -> list[str]:
        """Why a member is not (fully) healthy, in words an operator reads."""
        out = []
        silence = now - member.last_seen
        if member.node_id != self.self_id and silence >= self.config.suspect_after:
            out.append(f"missed_heartbeats: nothing heard for {silence:.1f}s")
        if member.info.status == S.DEGRADED:
            out.append("reported_degraded: resource pressure on the peer")
        if member.status in (S.DRAINING, S.OFFLINE, S.REGISTERING):
            out.append(f"status_{member.status.value}")
        if self.config.require_gpu and not member.info.hardware.gpus:
            out.append("no_gpu: require_gpu policy excludes this peer")
        return out

    # ---- internals -------------------------------------------------------------------------------

    def _effective(self, info: NodeInfo, last_seen: float, now: float) -> NodeStatus:
        if info.node_id == self.self_id:
            return info.status
        silence = now - last_seen
        if info.status == S.OFFLINE or silence >= self.config.offline_after:
            return S.OFFLINE
        if info.status == S.DRAINING:
            return S.DRAINING
        if silence >= self.config.suspect_after:
            return S.DEGRADED
        return info.status

    def _update(self, member: Member, now: float, reason: str) -> list[Event]:
        new = self._effective(member.info, member.last_seen, now)
        if new == member.status:
            return []
        old = member.status
        member.status = new
        member.status_since = now
        return [StatusChanged(member.node_id, old, new, reason)]


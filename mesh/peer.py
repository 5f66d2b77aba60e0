"""The sans-IO heart of a peer: membership, failure detection, election and its own lifecycle.

``PeerCore`` turns bytes and time into decisions and never touches a socket or a clock. The trio/libp2p
driver (``mesh.app.node``) and the deterministic simulator (``mesh.sim``) both drive this same class:

- ``heartbeat(now, ...)`` → signed bytes to publish on the nodes topic;
- ``receive(data, now)``  → events; raises a ``PeerError`` (with its code) for anything it rejects;
- ``tick(now)``           → events from timeouts, the lifecycle and the election.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from coordinator.election import Candidate, Election, Leadership
from mesh.errors import PeerError
from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.membership import Event, Member, Membership, MembershipConfig, StatusChanged, check_transition
from mesh.wire import Hardware, NodeInfo, NodeStatus, open_signed, seal_node_info

log = logging.getLogger(__name__)
S = NodeStatus


@dataclass(frozen=True, slots=True)
class PeerProfile:
    """What this peer says about itself besides its live hardware numbers."""

    version: str
    name: str = ""
    incarnation: int = 0  # start time in ms; the driver sets it
    accept_public_jobs: bool = True
    features_supported: tuple[str, ...] = ("gossip-v1", "election-v1")
    advanced_features: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    # Below this much free memory the peer reports itself degraded (resource pressure).
    min_free_memory_gb: float = 0.25
    layer_memory_bytes: int = 0  # offered for model layers


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    old: Leadership
    new: Leadership


PeerEvent = Event | LeaderChanged


class PeerCore:
    def __init__(
        self, identity: Identity, profile: PeerProfile, config: MembershipConfig, now: float
    ) -> None:
        self.identity = identity
        self.node_id: NodeId = identity.node_id
        self.profile = profile
        self.membership = Membership(self.node_id, config)
        self.election = Election(self.node_id)
        self.status: NodeStatus = S.REGISTERING
        self._started = now
        self._seq = 0
        self._last_info: NodeInfo | None = None

    # ---- own lifecycle ---------------------------------------------------------------------------

    @property
    def leadership(self) -> Leadership:
        return self.election.leadership

    @property
    def info(self) -> NodeInfo | None:
        """The latest NodeInfo this peer published (None before the first heartbeat)."""
        return self._last_info

    def _set_status(self, new: NodeStatus, now: float, reason: str) -> list[PeerEvent]:
        if new == self.status:
            return []
        check_transition(self.status, new)
        old, self.status = self.status, new
        return [StatusChanged(self.node_id, old, new, reason)]

    def drain(self, now: float) -> list[PeerEvent]:
        """Stop taking work and give up coordination; ``stop`` follows once work is handed off."""
        if self.status in (S.DRAINING, S.OFFLINE):
            return []
        events = self._set_status(S.DRAINING, now, "drain requested")
        return events + self._elect()

    def stop(self, now: float) -> list[PeerEvent]:
        """Final state; the next heartbeat is the peer's goodbye."""
        if self.status == S.OFFLINE:
            return []
        if self.status != S.DRAINING:
            self._set_status(S.DRAINING, now, "stopping")
        return self._set_status(S.OFFLINE, now, "stopped")

    # ---- inputs ----------------------------------------------------------------------------------

    def heartbeat(
        self,
        now: float,
        *,
        hardware: Hardware,
        compute_flops: float,
        addrs: tuple[str, ...] = (),
        installed_models: tuple[str, ...] = (),
        serve_models: tuple[str, ...] = (),
        stages: tuple[str, ...] = (),
        api: str = "",
        training: Mapping[str, str | int | float | bool] | None = None,
        device: Mapping[str, str | int | float | bool] | None = None,
        memory_bandwidth: float = 0.0,
        links: Mapping[str, float] | None = None,
        step_ms: Mapping[str, float] | None = None,
        sessions: Mapping[str, int] | None = None,
        layer_overhead_us: Mapping[str, float] | None = None,
        kernel_bandwidth: Mapping[str, float] | None = None,
    ) -> tuple[bytes, list[PeerEvent]]:
        """Build, sign and record this peer's next heartbeat; returns the bytes to publish."""
        events: list[PeerEvent] = []
        if self.status in (S.READY, S.DEGRADED):
            pressure = hardware.memory_free_gb < self.profile.min_free_memory_gb
            events += self._set_status(S.DEGRADED if pressure else S.READY, now, "resource check")
        self._seq += 1
        lead = self.election.leadership
        info = NodeInfo(
            node_id=self.node_id,
            incarnation=self.profile.incarnation,
            seq=self._seq,
            status=self.status,
            version=self.profile.version,
            name=self.profile.name,
            hardware=hardware,
            compute_flops=compute_flops,
            memory_bandwidth=memory_bandwidth,
            layer_memory_bytes=self.profile.layer_memory_bytes,
            installed_models=installed_models,
            serve_models=serve_models,
            stages=stages,
            accept_public_jobs=self.profile.accept_public_jobs,
            features_supported=self.profile.features_supported,
            advanced_features=self.profile.advanced_features,
            addrs=addrs,
            api=api,
            term=lead.term,
            coordinator=lead.coordinator,
            training=dict(training or {}),
            device=dict(device or {}),
            links=dict(links or {}),
            step_ms=dict(step_ms or {}),
            sessions=dict(sessions or {}),
            layer_overhead_us=dict(layer_overhead_us or {}),
            kernel_bandwidth=dict(kernel_bandwidth or {}),
        )
        self._last_info = info
        # Our own entry; its status events duplicate the ones _set_status already returned.
        self.membership.observe(info, self.identity.public_key, now)
        return seal_node_info(info, self.identity), events

    def receive(self, data: bytes, now: float) -> list[PeerEvent]:
        """Take in one gossip message. Own messages (gossip echoes them) are ignored. Raises PeerError
        (MALFORMED_MESSAGE, MESSAGE_TOO_LARGE, BAD_SIGNATURE, INVALID_CAPABILITY_SCHEMA,
        NODE_ID_CONFLICT, ...) for anything refused; the table is then unchanged."""
        signed = open_signed(data)
        info = signed.message
        if info.node_id == self.node_id:
            if signed.public_key != self.identity.public_key:
                raise PeerError(f"another key claims this peer's id {self.node_id}", code="NODE_ID_CONFLICT")
            return []
        return list(self.membership.observe(info, signed.public_key, now))

    def tick(self, now: float) -> list[PeerEvent]:
        events: list[PeerEvent] = list(self.membership.tick(now))
        if self.status == S.REGISTERING and now - self._started >= self.membership.config.registering_for:
            events += self._set_status(S.READY, now, "registration period over")
        return events + self._elect()

    # ---- election --------------------------------------------------------------------------------

    def _candidate(self, m: Member) -> Candidate:
        # Our own entry's status is synced in _elect; our term and claim come from the election itself,
        # since our last heartbeat may predate them.
        is_self = m.node_id == self.node_id
        term = self.election.leadership.term if is_self else m.info.term
        claims = (self.election.leadership.coordinator == self.node_id) if is_self else m.info.claims_coordinator
        return Candidate(
            node_id=m.node_id,
            score=m.info.compute_flops,
            eligible=self.membership.eligible(m),
            claim_valid=m.status in (S.READY, S.DEGRADED),
            term=term,
            claims=claims,
        )

    def _elect(self) -> list[PeerEvent]:
        me = self.membership.get(self.node_id)
        if me is None:  # no heartbeat yet: we do not know our own score
            return []
        me.status = self.status  # our own entry lags our status until the next heartbeat
        changed = self.election.update([self._candidate(m) for m in self.membership.members()])
        return [] if changed is None else [LeaderChanged(*changed)]

"""Coordinator election: deterministic and convergent over the gossiped membership. Pure; no I/O.

Rules (docs/ARCHITECTURE.md):

1. A *claim* is a heartbeat in which a peer names itself coordinator for a term. It counts only while
   its claimant is live and not draining (``claim_valid``), so a claim dies with its claimant.
2. Every peer follows the valid claim with the highest ``(term, node_id)``. Two sides of a healed
   partition therefore end up with one coordinator, and a coordinator that sees a higher claim steps down.
3. With no valid claim in view, the eligible peer with the highest ``(score, node_id)`` claims
   ``max_term_seen + 1``; everyone else waits for that claim. Terms never go backwards.

A live coordinator is kept even when a stronger peer joins: re-electing on every join would make the
mesh flap, and the planner (not the coordinator's own speed) decides who does the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.ids import NodeId


@dataclass(frozen=True, slots=True)
class Candidate:
    """One peer as this peer sees it (itself included)."""

    node_id: NodeId
    score: float  # capability score: measured FLOP/s
    eligible: bool  # may start a new term (ready, policy satisfied)
    claim_valid: bool  # its claim, if any, still counts (live, not draining)
    term: int  # the term named in its latest heartbeat
    claims: bool  # that heartbeat names itself coordinator


@dataclass(frozen=True, slots=True)
class Leadership:
    term: int = 0
    coordinator: NodeId | None = None


def decide(self_id: NodeId, candidates: Sequence[Candidate], max_term_seen: int) -> Leadership:
    """Whom this peer follows now, given its view. Identical views give identical answers."""
    claims = [(c.term, c.node_id) for c in candidates if c.claims and c.claim_valid]
    if claims:
        term, coordinator = max(claims)
        return Leadership(term, coordinator)
    eligible = [c for c in candidates if c.eligible]
    if eligible and max(eligible, key=lambda c: (c.score, c.node_id)).node_id == self_id:
        return Leadership(max_term_seen + 1, self_id)
    return Leadership(max_term_seen, None)


@dataclass(slots=True)
class Election:
    """Remembers the highest term ever seen so terms only move forward, and the current leadership."""

    self_id: NodeId
    leadership: Leadership = Leadership()
    max_term_seen: int = 0

    def update(self, candidates: Sequence[Candidate]) -> tuple[Leadership, Leadership] | None:
        """Re-decide; returns ``(old, new)`` when the leadership changed, else None."""
        self.max_term_seen = max([self.max_term_seen, self.leadership.term, *(c.term for c in candidates)])
        new = decide(self.self_id, candidates, self.max_term_seen)
        old = self.leadership
        if new == old:
            return None
        self.leadership = new
        self.max_term_seen = max(self.max_term_seen, new.term)
        return old, new

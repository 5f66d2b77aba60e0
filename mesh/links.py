"""Round-trip times to other peers, as a peer measures and gossips them. Pure; the node does the pinging.

Each round the node pings a few connected members (``due``: the least recently pinged first, at most
``per_round``), feeds the answers to ``observe`` and the failures to ``failed``; ``nearest`` is what its
heartbeat carries (``NodeInfo.links``: the ``MAX_LINKS`` smallest smoothed RTTs, ms). The coordinator turns
those into the planner's link matrix (one-way hop = RTT / 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.ids import NodeId
from mesh.wire import MAX_LINKS, MAX_RTT_MS

#: Weight of a new sample in the smoothed RTT (an exponentially weighted mean: one slow ping moves it a third).
ALPHA = 1 / 3


@dataclass
class LinkTable:
    rtt_ms: dict[NodeId, float] = field(default_factory=dict)  # smoothed round trip, ms
    _last: dict[NodeId, tuple[float, int]] = field(default_factory=dict)  # (when, place in its round)

    def due(self, candidates: Iterable[NodeId], now: float, per_round: int) -> list[NodeId]:
        """Whom to ping this round: never-pinged peers first, then the longest ago; a round robin (peers
        pinged in one round come up again in the order they were pinged)."""
        never = (-float("inf"), 0)
        order = sorted(set(candidates), key=lambda p: (self._last.get(p, never), p))
        chosen = order[:per_round]
        for i, p in enumerate(chosen):
            self._last[p] = (now, i)
        return chosen

    def observe(self, peer: NodeId, rtt_s: float) -> None:
        ms = min(max(rtt_s * 1000, 0.0), MAX_RTT_MS)
        old = self.rtt_ms.get(peer)
        self.rtt_ms[peer] = ms if old is None else old + ALPHA * (ms - old)

    def failed(self, peer: NodeId) -> None:
        """A ping that failed or timed out: the link is not known to be usable; forget its estimate."""
        self.rtt_ms.pop(peer, None)

    def keep_only(self, peers: Iterable[NodeId]) -> None:
        """Drop what is known of peers that left (bounded by the membership)."""
        keep = set(peers)
        for table in (self.rtt_ms, self._last):
            for p in [p for p in table if p not in keep]:
                del table[p]

    def nearest(self, k: int = MAX_LINKS) -> dict[str, float]:
        """The ``k`` smallest smoothed RTTs, ms (rounded to µs), as gossiped."""
        best = sorted(self.rtt_ms.items(), key=lambda kv: (kv[1], kv[0]))[:k]
        return {str(p): round(ms, 3) for p, ms in best}

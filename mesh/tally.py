"""Counters and histograms a service keeps about its own work (standard library only).

A service counts as it works (``tally.add(model, "ok")``, ``buckets.observe(seconds)``); the root's exporter
(``mesh.app.metrics``) reads the values when Prometheus scrapes ``GET /metrics``, so no service imports the
exporter or keeps a registry. Label sets stay bounded: past ``max_keys`` distinct ones, anything new counts
under ``OTHER``, so a peer that runs for weeks keeps a fixed-size table whatever names its callers send.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: The label value every label set past a tally's ``max_keys`` is counted under.
OTHER = "other"
#: Distinct label sets a tally keeps by default: many more models than a LAN mesh serves at once.
MAX_KEYS = 64


class Tally:
    """A monotonic count per label tuple (all of one length)."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._values: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str, n: int = 1) -> None:
        key = labels
        if key not in self._values and len(self._values) >= self.max_keys:
            key = (OTHER,) * len(labels)
        self._values[key] = self._values.get(key, 0) + n

    def get(self, *labels: str) -> int:
        return self._values.get(labels, 0)

    def total(self) -> int:
        return sum(self._values.values())

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        return sorted(self._values.items())


class Buckets:
    """A histogram with fixed upper bounds (Prometheus' ``le``): counts, sum and total of what was observed."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bucket bounds must be distinct and ascending, got {list(bounds)}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out

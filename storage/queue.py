"""The download queue, as data: priorities, what a transfer's state may become, and which waiting file gets the
next free download slot. Pure (no I/O, no clock); ``storage.transfer`` drives it.

A transfer is ``queued`` until one of its files holds a slot, ``running`` while one does (``queued`` again
when all of its files wait), and ends ``done``, ``error`` or ``cancelled``; a user may pause it (its bytes
stay on disk) and resume it (queued again, from those bytes), also after an error (a retry).

Slots: at most ``capacity`` files move at once, over every transfer. A slot that frees goes to the waiting
file of the highest priority, then of the transfer queued first, then the first of its files. A file that
holds a slot keeps it to its end: a higher priority never cuts one short, it takes the next free slot.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

from mesh.errors import PeerError

#: Named priorities; any integer in [MIN_PRIORITY, MAX_PRIORITY] is one too (higher goes first).
LOW, NORMAL, HIGH = -10, 0, 10
PRIORITIES = {"low": LOW, "normal": NORMAL, "high": HIGH}
MIN_PRIORITY, MAX_PRIORITY = -100, 100

#: state -> {what happens: the state it leads to}. Anything else is INVALID_TRANSFER_STATE.
TRANSITIONS: dict[str, dict[str, str]] = {
    "queued": {"start": "running", "pause": "paused", "cancel": "cancelled", "finish": "done", "fail": "error"},
    "running": {"wait": "queued", "pause": "paused", "cancel": "cancelled", "finish": "done", "fail": "error"},
    "paused": {"resume": "queued", "cancel": "cancelled"},
    "error": {"resume": "queued", "cancel": "cancelled"},
    "done": {},
    "cancelled": {},
}
STATES = tuple(TRANSITIONS)
#: States a transfer is over in (nothing moves; ``paused`` may still resume).
FINISHED = frozenset({"done", "error", "cancelled"})


class InvalidTransferState(PeerError):
    """Asked to pause, resume or cancel a transfer in a state that does not allow it (resume a done one)."""

    code = "INVALID_TRANSFER_STATE"


def parse_priority(value: object) -> int:
    """A priority as the API and the CLI take it: an integer in [-100, 100], ``low``, ``normal`` or ``high``
    (or its digits as text); None is ``normal``. INVALID_PARAMETER otherwise."""
    if value is None:
        return NORMAL
    if isinstance(value, str):
        if value.lower() in PRIORITIES:
            return PRIORITIES[value.lower()]
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise PeerError(f"priority must be low, normal, high or an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], "
                        f"not {value!r}", code="INVALID_PARAMETER")
    return value


def next_state(state: str, event: str) -> str:
    """The state ``event`` leads to from ``state``; INVALID_TRANSFER_STATE when it cannot happen there."""
    to = TRANSITIONS.get(state, {}).get(event)
    if to is None:
        raise InvalidTransferState(f"cannot {event} a transfer that is {state}")
    return to


K = TypeVar("K", bound=Hashable)


class Slots(Generic[K]):
    """At most ``capacity`` keys hold a slot at once; the rest wait in rank order (``ask``). Invariant: a key
    waits only while every slot is held."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a queue needs at least one slot")
        self.capacity = capacity
        self.holding: set[K] = set()
        self._waiting: dict[K, tuple[int, int, int]] = {}  # key -> its sort key
        self._heap: list[tuple[tuple[int, int, int], int, K]] = []  # lazy: stale entries are skipped
        self._ties = itertools.count()

    def ask(self, key: K, priority: int, transfer: int, file: int) -> bool:
        """``key`` wants a slot with this rank (``transfer``: the order its transfer was queued in, ``file``: its
        place in the transfer); True when it holds one now, else it waits until ``leave`` grants it."""
        if key in self.holding or key in self._waiting:
            raise ValueError(f"{key!r} already holds or waits for a slot")
        if len(self.holding) < self.capacity:
            self.holding.add(key)
            return True
        self._push(key, (-priority, transfer, file))
        return False

    def bump(self, key: K, priority: int) -> None:
        """Raise a waiting key's priority (someone more urgent waits on the same file); a lower one is kept."""
        rank = self._waiting.get(key)
        if rank is not None and -priority < rank[0]:
            self._push(key, (-priority, rank[1], rank[2]))

    def _push(self, key: K, rank: tuple[int, int, int]) -> None:
        self._waiting[key] = rank
        heapq.heappush(self._heap, (rank, next(self._ties), key))

    def leave(self, key: K) -> list[K]:
        """``key`` gives its slot back or stops waiting (done, failed, paused, cancelled); the keys that now
        hold the slots it freed."""
        self._waiting.pop(key, None)
        if key not in self.holding:
            return []
        self.holding.discard(key)
        granted = []
        while len(self.holding) < self.capacity and self._heap:
            rank, _, waiter = heapq.heappop(self._heap)
            if self._waiting.get(waiter) != rank:
                continue  # left already, or bumped (its newer entry is in the heap)
            del self._waiting[waiter]
            self.holding.add(waiter)
            granted.append(waiter)
        return granted

    @property
    def waiting(self) -> list[K]:
        """The waiting keys in the order they will get slots."""
        return sorted(self._waiting, key=lambda k: self._waiting[k])

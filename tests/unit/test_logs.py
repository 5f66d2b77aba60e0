"""Log throttling: a repeated bad message is logged once per window, with a count of what was held back."""

from __future__ import annotations

from mesh.logs import Throttle


def test_one_line_per_key_per_window_with_the_count_held_back() -> None:
    t = Throttle(every=10.0)
    assert t.allow(("p1", "BAD_SIGNATURE"), 0.0) == 0
    assert [t.allow(("p1", "BAD_SIGNATURE"), 0.1 * i) for i in range(1, 50)] == [None] * 49
    assert t.allow(("p1", "MALFORMED_MESSAGE"), 5.0) == 0  # another code is another key
    assert t.allow(("p2", "BAD_SIGNATURE"), 5.0) == 0  # and so is another peer
    assert t.allow(("p1", "BAD_SIGNATURE"), 10.0) == 49
    assert t.allow(("p1", "BAD_SIGNATURE"), 10.5) is None
    assert t.allow(("p1", "BAD_SIGNATURE"), 30.0) == 1


def test_the_table_stays_bounded_under_many_keys() -> None:
    t = Throttle(every=10.0, max_keys=100)
    for i in range(10_000):
        assert t.allow(i, float(i) / 1000) == 0
    assert len(t._last) == 100
    assert t.allow(9_999, 10.0) is None  # recent keys are still throttled

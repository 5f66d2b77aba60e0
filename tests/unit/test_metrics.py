"""The pieces behind ``GET /metrics`` and the console that need no peer: tallies stay bounded, histograms count
into the right buckets, the console's error list keeps this peer's warnings (repeats counted, not repeated), and
``meshnode status --watch`` draws a plan as a bar of its layers. The metrics of real peers:
tests/services/test_console_api.py."""

from __future__ import annotations

import logging

import pytest

from mesh.app.cli import BAR_WIDTH, plan_bar
from mesh.app.metrics import COLLAPSE_S, KEEP_ERRORS, ErrorLog
from mesh.tally import OTHER, Buckets, Tally


def test_a_tally_counts_per_label_set_and_stays_bounded() -> None:
    t = Tally(max_keys=3)
    t.add("llama", "ok")
    t.add("llama", "ok", n=4)
    t.add("gpt2", "failed")
    t.add("qwen", "ok")
    for i in range(100):  # a hundred made-up names: one more label set, whatever they are
        t.add(f"typo-{i}", "unavailable")
    assert t.get("llama", "ok") == 5 and t.get("gpt2", "failed") == 1
    assert t.get(OTHER, OTHER) == 100 and t.get("typo-7", "unavailable") == 0
    assert len(t.items()) == 4 and t.total() == 107
    t.add("llama", "ok")  # a label set it holds still counts as itself
    assert t.get("llama", "ok") == 6


def test_buckets_are_cumulative_with_an_infinite_last_one() -> None:
    b = Buckets((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 0.5, 7.0):
        b.observe(v)
    assert b.cumulative() == [(0.01, 2), (0.1, 3), (1.0, 5), (float("inf"), 6)]  # le: a value on a bound is in it
    assert b.count == 6 and b.sum == pytest.approx(8.065)
    for bad in ((), (1.0, 0.5), (0.1, 0.1)):
        with pytest.raises(ValueError):
            Buckets(bad)


def record(msg: str, *, level: int = logging.WARNING, created: float = 1000.0, **extra: str) -> logging.LogRecord:
    r = logging.makeLogRecord({"msg": msg, "levelno": level, "levelname": logging.getLevelName(level),
                               "created": created, **extra})
    return r


def test_the_error_list_keeps_this_peers_warnings_and_counts_repeats() -> None:
    log = ErrorLog("me")
    log.handle(record("rejected gossip", event="rejected", code="BAD_SIGNATURE", peer="p1", node_id="me"))
    log.handle(record("not mine", event="rejected", code="BAD_SIGNATURE", peer="p1", node_id="another peer"))
    log.handle(record("just info", level=logging.INFO, event="started"))  # below WARNING: not an error
    log.handle(record("disk full", level=logging.ERROR, created=1001.0, event="store_unreadable", code="STORE_IO"))
    log.handle(record("rejected again", created=1005.0, event="rejected", code="BAD_SIGNATURE", peer="p1",
                      node_id="me"))
    entries = log.view()
    assert [(e["code"], e["count"], e["message"]) for e in entries] == [
        ("STORE_IO", 1, "disk full"), ("BAD_SIGNATURE", 2, "rejected again")]  # the repeat moved to the newest
    assert entries[0]["level"] == "error" and entries[1]["time"] == 1005.0
    log.handle(record("much later", created=1005.0 + COLLAPSE_S + 1, event="rejected", code="BAD_SIGNATURE",
                      peer="p1", node_id="me"))
    assert len(log.view()) == 3  # past the collapse window: a new entry
    for i in range(3 * KEEP_ERRORS):
        log.handle(record(f"peer {i}", event="rejected", code="BAD_SIGNATURE", peer=f"p{i}"))
    assert len(log.view()) == KEEP_ERRORS and log.view()[-1]["message"] == f"peer {3 * KEEP_ERRORS - 1}"


def test_a_plan_bar_gives_each_stage_its_share_of_the_width() -> None:
    assert plan_bar([("a", 0, 2), ("b", 2, 4), ("c", 4, 7)], 7, width=14) == [("a", 4), ("b", 4), ("c", 6)]
    assert plan_bar([("a", 0, 33)], 33) == [("a", BAR_WIDTH)]
    tiny = plan_bar([("a", 0, 1), ("b", 1, 100)], 100, width=10)  # one layer of a hundred still shows
    assert tiny == [("a", 1), ("b", 9)]
    many = plan_bar([(f"n{i}", i, i + 1) for i in range(60)], 60, width=20)
    assert len(many) == 60 and all(n >= 1 for _, n in many)  # more stages than characters: one each
    assert plan_bar([], 10) == []

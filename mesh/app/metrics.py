"""What a peer tells about itself while it runs: ``GET /metrics`` (Prometheus text format), and the live parts of
the console (``GET /api/console``): throughput over the last minutes and the errors as they happen.

Every value is read from the node's own services when asked (a custom collector: the peers by status, the
coordinator's term, the sessions per stage from the membership and the stage host; tokens, requests, steps, hops
and failovers from the driver's tallies; bytes from the transfer server and fetcher; refusals from the node and
its gate), so the services keep plain counts (``mesh.tally``) and nothing here runs on their paths. Each
``Telemetry`` has its own ``CollectorRegistry``: several peers in one process never share one. Labels are
bounded: status, model (ids the mesh plans, else "other"), outcome, direction, code (the table's codes); never a
session or a peer id.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.tally import Buckets, Tally
from mesh.wire import NodeStatus

if TYPE_CHECKING:
    from mesh.app.node import Node

__all__ = ["CONTENT_TYPE_LATEST", "ErrorLog", "Metrics", "Series", "Telemetry"]

#: One throughput sample per this many seconds; the console's charts are at most this far behind.
SAMPLE_EVERY_S = 1.0
#: Samples kept: five minutes of throughput (the charts' "last minutes").
SERIES_POINTS = 300
#: Errors kept for the console (the log lines behind them are rate-limited already: one per peer and code
#: every 10 s); a repeat of a kept entry's (event, code, peer) within ``COLLAPSE_S`` of its last one is
#: counted on that entry, which moves to the top, rather than added.
KEEP_ERRORS = 100
COLLAPSE_S = 60.0
#: Transfer events the console lists as errors.
TRANSFER_ERRORS = frozenset({"failed", "attempt_failed", "manifest_refused"})


def _histogram(name: str, doc: str, b: Buckets) -> HistogramMetricFamily:
    buckets = [("+Inf" if le == float("inf") else repr(le), n) for le, n in b.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=b.sum)


def _counter(name: str, doc: str, labels: list[str], tally: Tally) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in tally.items():
        family.add_metric(list(key), n)
    return family


class Metrics:
    """The node's metrics as Prometheus families, collected when scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, CPU seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def rejected(self) -> Tally:
        """Gossip the node refused (forged, malformed, stale plans) and what its gate refused, by code."""
        out = Tally()
        gate = self.node.gate
        for source in (self.node.rejected, *((gate.refusals,) if gate is not None else ())):
            for key, n in source.items():
                out.add(*key, n=n)
        return out

    def collect(self) -> Iterator[Metric]:
        node = self.node
        driver = node.driver
        peers = GaugeMetricFamily("meshnode_peers", "Peers in this peer's membership table (itself included), by "
                                  "status", labels=["status"])
        statuses = collections.Counter(m.status for m in node.core.membership.members())
        for status in NodeStatus:
            peers.add_metric([status.value], statuses[status])
        yield peers
        lead = node.core.leadership
        yield GaugeMetricFamily("meshnode_coordinator_term", "The term of the coordinator this peer follows",
                                value=lead.term)
        sessions = GaugeMetricFamily("meshnode_stage_sessions", "Activation sessions open on this peer's stages",
                                     labels=["model"])
        for model, loaded in sorted(node.stages.loaded.items()):
            sessions.add_metric([model], len(loaded.sessions))
        yield sessions
        yield _counter("meshnode_tokens_generated", "Tokens this peer's driver generated (stop tokens not counted)",
                       ["model"], driver.tokens)
        yield _counter("meshnode_requests", "Generation requests at this peer's driver, by outcome (ok, failed, "
                       "unavailable, cancelled)", ["model", "outcome"], driver.requests)
        yield _histogram("meshnode_step_seconds", "Time from sending a step to having its token", driver.step_seconds)
        yield _histogram("meshnode_hop_seconds", "A step's time outside the stages' compute, per hop of its route",
                         driver.hop_seconds)
        yield CounterMetricFamily("meshnode_failovers", "Route attempts that failed (each one fails over, or ends a "
                                  "request no route can cure)", value=driver.failovers)
        moved = CounterMetricFamily("meshnode_transfer_bytes", "Shard and model-file bytes received from holders "
                                    "(in) and served to peers (out)", labels=["direction"])
        moved.add_metric(["in"], node.fetcher.received_bytes)
        moved.add_metric(["out"], node.shard_server.sent_bytes)
        yield moved
        yield _counter("meshnode_rejected", "Gossip, admissions and joins refused here, by code", ["code"],
                       self.rejected())
        runtime = node.runtime()
        yield GaugeMetricFamily("meshnode_trio_tasks", "Trio tasks of this process", value=runtime["tasks"])
        yield GaugeMetricFamily("meshnode_connections", "Peers connected to this one", value=runtime["connections"])


class Series:
    """Throughput over the last minutes, one sample per ``SAMPLE_EVERY_S``: tokens per second of this peer's
    driver, and the mean step and per-hop time of the tokens in that second (None when there were none)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.points: collections.deque[dict[str, Any]] = collections.deque(maxlen=SERIES_POINTS)
        self._last: tuple[float, int, float, int, float, int] | None = None

    def sample(self, now: float, wall: float) -> None:
        d = self.node.driver
        here = (now, d.tokens.total(), d.step_seconds.sum, d.step_seconds.count, d.hop_seconds.sum,
                d.hop_seconds.count)
        last, self._last = self._last, here
        if last is None or now <= last[0]:
            return
        steps, hops = here[3] - last[3], here[5] - last[5]
        self.points.append({
            "t": round(wall, 3),
            "tokens_per_s": round((here[1] - last[1]) / (now - last[0]), 3),
            "step_ms": round((here[2] - last[2]) / steps * 1000, 3) if steps else None,
            "hop_ms": round((here[4] - last[4]) / hops * 1000, 4) if hops else None,
        })

    def view(self) -> list[dict[str, Any]]:
        return list(self.points)


class ErrorLog(logging.Handler):
    """The warnings and errors this peer logs (rejected gossip, refused admissions, failed loads, API errors),
    kept for the console. Records of another peer of this process (``node_id`` not this one) are left out."""

    def __init__(self, node_id: str) -> None:
        super().__init__(logging.WARNING)
        self.node_id = node_id
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP_ERRORS)

    def emit(self, record: logging.LogRecord) -> None:
        owner = getattr(record, "node_id", None)
        if record.levelno < self.level or (owner is not None and owner != self.node_id):
            return
        event, code, peer = (str(getattr(record, k, "") or "") for k in ("event", "code", "peer"))
        same = next((e for e in self.entries if (e["event"], e["code"], e["peer"]) == (event, code, peer)), None)
        if same is not None and record.created - same["time"] < COLLAPSE_S:
            self.entries.remove(same)
            same |= {"time": round(record.created, 3), "count": same["count"] + 1,
                     "message": record.getMessage()[:500]}
            self.entries.append(same)
            return
        self.entries.append({"time": round(record.created, 3), "level": record.levelname.lower(), "event": event,
                             "code": code, "peer": peer, "message": record.getMessage()[:500], "count": 1})

    def view(self) -> list[dict[str, Any]]:
        self.acquire()  # records arrive from worker threads too
        try:
            return [dict(e) for e in self.entries]
        finally:
            self.release()


class Telemetry:
    """One peer's metrics registry, throughput series and error list; ``run`` samples and listens to the log
    for as long as the API serves."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.metrics = Metrics(node)
        self.series = Series(node)
        self.errors = ErrorLog(node.node_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        root = logging.getLogger()
        root.addHandler(self.errors)
        try:
            task_status.started()
            while True:
                self.series.sample(trio.current_time(), time.time())
                await trio.sleep(SAMPLE_EVERY_S)
        finally:
            root.removeHandler(self.errors)

    def error_view(self) -> list[dict[str, Any]]:
        """The last errors, newest first: log entries and failed transfer attempts."""
        transfers = [{"time": ev["time"], "level": "warning", "event": f"transfer_{ev['event']}",
                      "code": str(ev.get("code", "")), "peer": str(ev.get("peer", "")),
                      "message": f"{ev['model']}: {ev.get('file', '')} {ev.get('message', '')}".strip()[:500],
                      "count": 1}
                     for ev in self.node.fetcher.events if ev["event"] in TRANSFER_ERRORS]
        both = sorted([*self.errors.view(), *transfers[-KEEP_ERRORS:]], key=lambda e: e["time"], reverse=True)
        return both[:KEEP_ERRORS]

    def console(self) -> dict[str, Any]:
        """Everything the console shows, in one consistent snapshot (``GET /api/console``)."""
        node = self.node
        plans = node.plans.view()
        plans["plans"] = [{k: v for k, v in p.items() if k != "envelope"} for p in plans["plans"]]
        return {
            "self": node.node_id,
            "time": round(time.time(), 3),
            "nodes": node.nodes(),
            "plans": plans,
            "serving": node.serving(),
            "served": [r.model for r in node.driver.served()],
            "transfers": [t.snapshot() for t in node.fetcher.transfers.values()],
            "series": self.series.view(),
            "errors": self.error_view(),
            "runtime": node.runtime(),
        }

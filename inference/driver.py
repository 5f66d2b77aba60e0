"""The generation driver: any peer can run one. It turns a prompt into tokens through the mesh.

Per session: open the route of the model's current plan (a stream to stage 0, or stage 0 in this process
when it is here), send the prompt as step 0 (prefill), then one token per step; the last stage samples
and sends each token straight back here. Per token that is one hop per stage and nothing more.

Failover: a step fails when a stage reports an error, a hop's stream breaks, the plan moves to other
stages, a stage stalls (no token for ``STALL_AFTER`` and a route peer does not answer a ping), or no token
comes within ``step_timeout``. The driver then names the route's peers to the coordinator (``report``),
which pings them and covers an unresponsive one's range at once, without waiting for heartbeats to time
out. With a replica pipeline ready
(one the session has not seen fail), the session moves there at once and the report goes to the
coordinator in the background (a bounded queue, ``reporting``); the stall check is then shorter
(``REPLICA_STALL_AFTER``). A refusal no route can cure (a wrong dtype or shape, a
bad request) fails the request at once. Otherwise the driver waits (up to ``recovery_timeout`` from the
first failure, however many routes fail meanwhile) for a route whose stages are all ready — the
coordinator's next epoch, with the replacement's stage loaded — and replays the generation with its
original step structure (the prompt, then one step per token so far, sent pipelined), which rebuilds every
stage's KV cache bit for bit in every weight format. Sampling is seeded per position
(``inference.sampling``), so greedy and seeded runs continue exactly as if nothing had happened. With no
working route in time the request ends with ``GENERATION_FAILED``; it never hangs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import trio

from coordinator.plans import PlanBook
from inference import protocol
from inference.frames import MAX_TOKENS, Frame
from inference.protocol import ACTIVATIONS_PROTOCOL, Route
from inference.results import Results
from inference.sampling import Sampling
from inference.sessions import new_session_id
from inference.tokenizer import load_tokenizer
from mesh.config import InferenceConfig
from mesh.errors import NotFoundError, PeerError
from mesh.ids import ModelRef, NodeId, Span, StageKey
from mesh.ports import Library, MeshView, Offload, Streams
from mesh.tally import OTHER, Buckets, Tally
from mesh.wire import NodeStatus

log = logging.getLogger(__name__)
MAX_FAILOVERS = 8
#: A step without its token for this long (or ``STALL_STEPS`` times the median of the session's last
#: ``STALL_WINDOW`` decode steps, if more) makes the driver ping the route's peers: one that does not answer in
#: ``STALL_PING`` s has hung. The median, not the slowest: one step slowed by a busy host must not push the
#: check past the heartbeat timeout (a ping of a live peer costs a few bytes; only its silence fails a step).
STALL_AFTER = 1.0
STALL_STEPS = 8
STALL_WINDOW = 8
STALL_PING = 0.5
#: With another ready pipeline (a replica) to move to, a stall is judged sooner: moving costs a replay, not
#: a wait for the coordinator's next epoch, so a hung peer is left after ``REPLICA_STALL_AFTER`` (or
#: ``STALL_STEPS`` typical steps) and a ping of ``REPLICA_STALL_PING``.
REPLICA_STALL_AFTER = 0.3
REPLICA_STALL_PING = 0.25
#: How often a step's wait looks at its hops' connections (a killed peer's connection drops at once).
CUT_POLL = 0.05
#: Failed routes waiting to be reported to the coordinator while the session already runs on a replica.
REPORT_QUEUE = 8
#: Upper bounds (seconds) of the step and per-hop histograms: a step of a tiny model on one peer takes ~1 ms, a
#: 70B stage over Wi-Fi seconds; a hop on one host ~0.1 ms, across a busy LAN tens of ms.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Refusals no other route can cure (the request or the pipeline is wrong, not a peer): fail at once.
PERMANENT = frozenset({"BAD_DTYPE", "BAD_SHAPE", "BAD_VALUES", "BAD_FRAME", "CONTEXT_TOO_LONG", "INVALID_PARAMETER",
                       "UNSUPPORTED_QUANTIZATION", "SHARD_FORMAT_MISMATCH"})


def least_loaded(routes: Sequence[Route], loads: Sequence[Sequence[tuple[int, float | None]]],
                 mine: Sequence[int]) -> Route:
    """The route a new session waits least on: each stage serves its sessions in turn, so one more waits
    about ``(sessions + 1) * step`` there, summed over the route's stages. A stage's sessions are the larger
    of what its peer gossiped (every driver's, as of its last heartbeat) and this driver's own on that route
    now (``mine``: exact, and newer than any heartbeat). A step not measured yet counts as the mean measured
    one (1 ms when none is). Ties go to the plan's order."""
    known = [ms for route in loads for _, ms in route if ms]
    default = sum(known) / len(known) if known else 1.0

    def wait(i: int) -> float:
        return sum((max(n, mine[i]) + 1) * (ms or default) for n, ms in loads[i])

    return routes[min(range(len(routes)), key=lambda i: (wait(i), i))]


class ModelNotServed(PeerError):
    """The mesh has no ready route for the model yet (planning or loading); storage's ModelNotAvailable is
    the same code for a store that lacks it."""

    code = "MODEL_NOT_AVAILABLE"


class GenerationFailed(PeerError):
    code = "GENERATION_FAILED"


class MeshBusy(PeerError):
    """Every pipeline slot and queue place for the model is taken; ``retry_after``: seconds to wait."""

    code = "MESH_BUSY"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Admission:
    """One model at this driver: at most ``slots`` generations at once (the slots per pipeline times the
    plan's pipelines, so it follows the replicas), at most ``queue`` waiting, woken in order (a parking lot);
    ``seconds`` is the recent mean generation time."""

    slots: int
    queue: int
    active: int = 0
    waiting: int = 0
    seconds: float = 1.0
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def full(self) -> bool:
        return self.active >= self.slots and self.waiting >= self.queue

    async def enter(self) -> None:
        if self.active >= self.slots or self.waiting:
            self.waiting += 1
            try:
                while True:
                    await self.lot.park()
                    if self.active < self.slots:
                        break
            except BaseException:
                self.lot.unpark()  # a cancelled waiter passes its wake-up on (the woken one checks again)
                raise
            finally:
                self.waiting -= 1
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        self.lot.unpark()

    def retry_after(self) -> int:
        """Whole seconds until a queue place is likely free: the queue ahead over the slots, per generation."""
        return max(1, math.ceil((self.waiting + 1) / self.slots * self.seconds))


class RouteFailed(Exception):
    """One attempt over one route failed; the driver fails over."""

    def __init__(self, code: str, message: str, node: str = "") -> None:
        super().__init__(message)
        self.code, self.node = code, node


@dataclass(frozen=True, slots=True)
class Request:
    model: str  # "id" or "id@revision"
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    index: int  # 0 for the first generated token
    stop: bool  # a stop token (not part of the text)
    epoch: tuple[int, int]
    replayed: bool  # the first token after a failover
    compute_ms: tuple[float, ...]  # per stage, this step
    step_ms: float  # from sending the step to having its token
    logits: torch.Tensor | None = None


class LocalStages(Protocol):
    """The stages on this peer, as a driver sees them (``StageHost``)."""

    def ready(self) -> tuple[str, ...]: ...

    def step_times(self) -> dict[str, float]: ...

    def active_sessions(self) -> dict[str, int]: ...

    def open_local(self, first: Frame) -> trio.MemorySendChannel[Frame]: ...


class Driver:
    def __init__(self, config: InferenceConfig, offline_after: float, mesh: MeshView, plans: PlanBook,
                 library: Library, streams: Streams, local: LocalStages, results: Results, *,
                 requested: Callable[[], list[str]], offload: Offload,
                 ping: Callable[[NodeId, float], Awaitable[float]] | None = None,
                 report: Callable[[list[NodeId], list[NodeId]], Awaitable[None]] | None = None,
                 connected: Callable[[], set[NodeId]] | None = None) -> None:
        self.config, self.offline_after, self.mesh, self.plans = config, offline_after, mesh, plans
        self.library, self.streams, self.local, self.requested, self.offload = (library, streams, local, requested,
                                                                                offload)
        self.results = results  # where the last stage's answers to our sessions arrive
        self._ping, self._report = ping, report  # a hung-peer check; failed routes to the coordinator
        self._connected = connected  # the peers this one has a connection to (a dead one's drops at once)
        self._admission: dict[str, Admission] = {}  # model -> its pipeline's slots and queue here
        self._on_route: dict[tuple[Span, ...], int] = {}  # a pipeline's hops -> sessions this driver runs on it
        self._tokenizers: dict[tuple[str, str], Any] = {}
        self._tokenizer_lock = trio.Lock()
        # Failed routes to report while their sessions go on elsewhere (``reporting`` sends them), bounded.
        self._reports, self._report_queue = trio.open_memory_channel[tuple[Route, list[NodeId]]](REPORT_QUEUE)
        self.failovers = 0
        self.to_replica = 0  # failovers that moved straight to another ready pipeline
        self.generations = 0
        # What GET /metrics exports (read at scrape time): tokens per model, requests per model and outcome
        # (ok | failed | unavailable | cancelled), each token's step time and its time per hop.
        self.tokens, self.requests = Tally(), Tally()
        self.step_seconds, self.hop_seconds = Buckets(STEP_BUCKETS), Buckets(HOP_BUCKETS)

    # ---- routes -----------------------------------------------------------------------------------

    @staticmethod
    def _key(model: str, revision: str, span: Span, compute: str) -> str:
        return str(StageKey.make(model, revision, span.start, span.end, compute))

    def _stage_ready(self, node_id: NodeId, key: str) -> bool:
        if node_id == self.mesh.node_id:
            return key in self.local.ready()
        m = self.mesh.membership.get(node_id)
        return m is not None and m.status in (NodeStatus.READY, NodeStatus.DEGRADED) and key in m.info.stages

    def status(self, spec: str) -> dict[str, Any]:
        """The model's current plan and which of its stages are ready (404 when there is no plan)."""
        model, revision = ModelRef.of(spec)
        held = self.plans.current.get(model)
        if held is None or (revision is not None and held.plan.revision != revision):
            raise NotFoundError(f"no plan for {spec} in this mesh (POST /api/model to serve it)", code="NO_PLAN")
        plan = held.plan
        stages = [{"node_id": a.node, "layers": [a.start, a.end],
                   "ready": self._stage_ready(a.node, self._key(model, plan.revision, a, plan.compute_dtype))}
                  for a in plan.assignments]
        return {"model": model, "revision": plan.revision, "term": plan.term, "epoch": plan.epoch,
                "compute_dtype": plan.compute_dtype,
                "ready": all(s["ready"] for s in stages), "stages": stages}

    def routes(self, spec: str) -> list[Route]:
        """The current plan's ready routes for ``spec``: each pipeline (replicas too) whose stages are all
        loaded on live peers, in the plan's order."""
        model, revision = ModelRef.of(spec)
        held = self.plans.current.get(model)
        if held is None or (revision is not None and held.plan.revision != revision):
            return []
        plan = held.plan
        return [Route(model, plan.revision, (plan.term, plan.epoch), hops, plan.compute_dtype)
                for hops in plan.all_spans()
                if all(self._stage_ready(h.node, self._key(model, plan.revision, h, plan.compute_dtype))
                       for h in hops)]

    def route(self, spec: str, avoid: tuple[Span, ...] | None = None) -> Route | None:
        """The least loaded ready route for ``spec`` (``least_loaded``: what each stage's peer gossips of its
        sessions and step time, and the sessions this driver runs on it), another than ``avoid`` when there is
        one; None when none is ready."""
        ready = self.routes(spec)
        return self._least_loaded([r for r in ready if r.hops != avoid] or ready)

    def _least_loaded(self, ready: list[Route]) -> Route | None:
        """``least_loaded`` of ``ready`` by what its stages' peers gossip and this driver's own sessions."""
        if len(ready) <= 1:
            return ready[0] if ready else None
        return least_loaded(ready, [[self._load(r, h) for h in r.hops] for r in ready],
                            [self._on_route.get(r.hops, 0) for r in ready])

    def _load(self, route: Route, hop: Span) -> tuple[int, float | None]:
        """What ``hop``'s peer last said of the stage: sessions it serves and its decode step, ms (None:
        not measured yet)."""
        key = self._key(route.model, route.revision, hop, route.compute)
        if hop.node == self.mesh.node_id:
            return self.local.active_sessions().get(key, 0), self.local.step_times().get(key)
        m = self.mesh.membership.get(hop.node)
        if m is None:
            return 0, None
        return m.info.sessions.get(key, 0), m.info.step_ms.get(key)

    def served(self) -> list[Route]:
        """Every model with a ready route (what ``/v1/models`` lists)."""
        return [r for m in sorted(self.plans.current) if (r := self.route(m)) is not None]

    def _left_route(self, hops: tuple[Span, ...]) -> None:
        left = self._on_route.get(hops, 0) - 1
        if left > 0:
            self._on_route[hops] = left
        else:
            self._on_route.pop(hops, None)  # bounded by the routes with sessions running

    def _watched(self, route: Route) -> set[NodeId]:
        """The first and last stage's peers (the two this driver talks to) it is connected to now."""
        up = self._connected() if self._connected is not None else set()
        return {n for n in (route.hops[0].node, route.hops[-1].node) if n != self.mesh.node_id and n in up}

    def _cut(self, watched: set[NodeId]) -> NodeId | None:
        """One of ``watched`` whose connection has gone since (a killed process's drops at once, long before
        its heartbeats time out)."""
        if self._connected is None or not watched:
            return None
        up = self._connected()
        return next((n for n in watched if n not in up), None)

    def _broken(self, route: Route) -> bool:
        """A stage peer of ``route`` is offline, or the plan moved on and its new route is ready (a route
        that still works is kept while the new plan's stages load)."""
        held = self.plans.current.get(route.model)
        if held is None or route.hops not in held.plan.all_spans():
            newer = self.route(route.model)
            if newer is not None and newer.hops != route.hops:
                return True
        for h in route.hops:
            if h.node == self.mesh.node_id:
                continue
            m = self.mesh.membership.get(h.node)
            if m is None or m.status == NodeStatus.OFFLINE:
                return True
        return False

    def require(self, spec: str) -> Route:
        route = self.route(spec)
        if route is not None:
            return route
        self.requests.add(self._label(spec), "unavailable")  # a request refused here never reaches generate
        model = ModelRef.of(spec).model
        if model in self.plans.current or model in {ModelRef.of(s).model for s in self.requested()}:
            raise ModelNotServed(f"{spec} is not ready: its stages are still being planned or loaded "
                                    "(GET /api/model shows which)")
        raise NotFoundError(f"the mesh does not serve {spec} (POST /api/model to serve it)", code="UNKNOWN_MODEL")

    # ---- generating -------------------------------------------------------------------------------

    def _label(self, spec: str) -> str:
        """A model's metrics label: its id when the mesh plans or was asked to serve it, else ``OTHER`` (a
        caller's typo must not become a label)."""
        model = ModelRef.of(spec).model
        return model if model in self.plans.current or model in {ModelRef.of(s).model for s in self.requested()} \
            else OTHER

    def _measured(self, tok: Token, route: Route) -> None:
        """A token's share of the metrics: its step, and the step's time outside the stages' compute per hop
        (driver to stage 0, stage to stage, last stage back: one more hop than stages)."""
        if not tok.stop:
            self.tokens.add(route.model)
        self.step_seconds.observe(tok.step_ms / 1000)
        self.hop_seconds.observe(max(0.0, tok.step_ms - sum(tok.compute_ms)) / 1000 / (len(route.hops) + 1))

    def admission(self, spec: str) -> Admission:
        model = ModelRef.of(spec).model
        if model not in self._admission:  # bounded: only models with a plan or a serve request get here
            self._admission[model] = Admission(self.config.max_pipeline_sessions, self.config.max_queued_requests)
        adm = self._admission[model]
        held = self.plans.current.get(model)
        adm.slots = self.config.max_pipeline_sessions * (len(held.plan.pipelines) if held is not None else 1)
        for _ in range(adm.slots - adm.active):  # more pipelines than before: let waiters in
            adm.lot.unpark()
        return adm

    def check_capacity(self, spec: str) -> None:
        """MESH_BUSY (429, ``retry_after``) when a new request for ``spec`` could neither run nor wait now."""
        adm = self.admission(spec)
        if adm.full():
            self.requests.add(self._label(spec), "busy")
            log.warning("refused a generation of %s: %d running, %d waiting (the most allowed)", spec, adm.active,
                        adm.waiting, extra={"event": "mesh_busy", "code": "MESH_BUSY", "model": spec,
                                            "node_id": self.mesh.node_id})
            raise MeshBusy(f"{spec}: {adm.active} generations running and {adm.waiting} waiting here, the most "
                           f"allowed; retry in {adm.retry_after()}s", adm.retry_after())

    @contextlib.asynccontextmanager
    async def _slot(self, spec: str) -> AsyncIterator[None]:
        """A pipeline slot for one generation, waiting in the bounded queue for one (MESH_BUSY past it)."""
        self.check_capacity(spec)
        adm = self.admission(spec)
        await adm.enter()
        began = trio.current_time()
        try:
            yield
        finally:
            adm.leave()
            adm.seconds += 0.2 * (trio.current_time() - began - adm.seconds)

    async def generate(self, req: Request) -> AsyncIterator[Token]:
        """Tokens as they come (the last one may be a stop token), failing over as needed. A refusal that
        no other route can cure (``PERMANENT``) fails the request at once; otherwise the generation waits
        for a working route at most ``recovery_timeout`` from its first failure until it has a token again,
        however many routes fail in between. Each request counts once in ``requests`` with its outcome."""
        outcome: str | None = "failed"
        tokens = self._generate(req)
        try:
            async with self._slot(req.model):
                async for tok in tokens:
                    yield tok
            outcome = "ok"
        except GeneratorExit:
            outcome = "ok"  # the caller stopped reading: it had what it wanted (a stop string)
            raise
        except trio.Cancelled:
            outcome = "cancelled"  # the client went away
            raise
        except (ModelNotServed, NotFoundError, MeshBusy):
            outcome = None  # counted where it was refused (require: unavailable; check_capacity: busy)
            raise
        finally:
            if outcome is not None:
                self.requests.add(self._label(req.model), outcome)
            await tokens.aclose()

    async def _generate(self, req: Request) -> AsyncIterator[Token]:
        inf = self.config
        if not req.prompt:
            raise PeerError("the prompt has no tokens", code="INVALID_PARAMETER")
        if len(req.prompt) + 1 > MAX_TOKENS:
            raise PeerError(f"the prompt has {len(req.prompt)} tokens; at most {MAX_TOKENS - 1}",
                            code="CONTEXT_TOO_LONG")
        route = self.require(req.model)
        self.generations += 1
        produced: list[int] = []
        failures: list[str] = []
        left: set[tuple[Span, ...]] = set()  # pipelines this generation failed on (not moved back to at once)
        deadline: float | None = None  # set by a failure, cleared by the next token
        while True:
            attempt = self._attempt(route, req, produced, replayed=bool(failures))
            try:
                async for tok in attempt:
                    produced.append(tok.id)
                    deadline = None
                    self._measured(tok, route)
                    yield tok
                return
            except RouteFailed as err:
                self.failovers += 1
                failures.append(f"{err.code} at {err.node[-8:] or '?'}")
                if err.code in PERMANENT:
                    log.error("generation on %s epoch %s refused: %s %s; no other route can cure it",
                              route.model, route.epoch, err.code, err,
                              extra={"event": "generation_refused", "code": err.code, "model": route.model,
                                     "node_id": self.mesh.node_id, "peer": err.node})
                    raise GenerationFailed(f"{err.code}: {err}") from None
                left.add(route.hops)
                replica = self._replica(req.model, left)
                log.warning("generation on %s epoch %s failed after %d tokens: %s %s; failing over to %s",
                            route.model, route.epoch, len(produced), err.code, err,
                            "a replica" if replica else "the coordinator's next route",
                            extra={"event": "failover", "code": err.code, "model": route.model,
                                   "node_id": self.mesh.node_id, "peer": err.node,
                                   "to": "replica" if replica else "coordinator"})
                if len(failures) > MAX_FAILOVERS:
                    raise GenerationFailed(f"gave up after {len(failures)} failed routes: {'; '.join(failures)}") \
                        from None
                if deadline is None:
                    deadline = trio.current_time() + inf.recovery_timeout
                silent = [NodeId(err.node)] if err.code == "PEER_UNRESPONSIVE" else []
                if replica is not None:  # move now; the coordinator hears of it in the background
                    self.to_replica += 1
                    self._report_later(route, silent)
                    route = replica
                    continue
                await self._tell_coordinator(route, silent)
                route = await self._await_route(req.model, route, deadline, failures)
            finally:
                await attempt.aclose()  # a caller that stops early frees the route's sessions now, not at GC

    def _replica(self, spec: str, failed: Collection[tuple[Span, ...]]) -> Route | None:
        """The least loaded ready pipeline of the plan other than the ``failed`` ones, on peers that are not
        offline (None: none; then the coordinator must cover the failed range)."""
        return self._least_loaded(self._spares(spec, failed))

    def _spares(self, spec: str, failed: Collection[tuple[Span, ...]]) -> list[Route]:
        """The plan's ready pipelines other than the ``failed`` ones, on peers that are not offline."""
        return [r for r in self.routes(spec) if r.hops not in failed and not self._broken(r)]

    def _report_later(self, route: Route, silent: list[NodeId]) -> None:
        """Queue ``route``'s failure for ``reporting`` (full queue: logged and left to the heartbeats)."""
        try:
            self._reports.send_nowait((route, silent))
        except trio.WouldBlock:
            log.warning("%d failed routes already wait to be reported; the coordinator's heartbeats will see "
                        "this one", REPORT_QUEUE, extra={"event": "report_dropped",
                                                          "node_id": self.mesh.node_id})

    async def reporting(self) -> None:
        """Report queued failed routes to the coordinator, one at a time (a task of the peer's nursery)."""
        async for route, silent in self._report_queue:
            await self._tell_coordinator(route, silent)

    async def _tell_coordinator(self, route: Route, silent: list[NodeId]) -> None:
        """Name the failed route's other peers to the coordinator, and those of them this peer just pinged in
        vain (bounded: a dead or hung coordinator costs at most ``STALL_PING`` + 1 s; then heartbeats decide)."""
        peers = [h.node for h in route.hops if h.node != self.mesh.node_id]
        if self._report is None or not peers:
            return
        with trio.move_on_after(STALL_PING + 1.0):
            try:
                await self._report(peers, silent)
            except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                log.info("could not report the failed route to the coordinator: %s", err,
                         extra={"event": "report_failed", "code": getattr(err, "code", "STREAM_CLOSED"),
                                "node_id": self.mesh.node_id})

    async def _hung(self, route: Route, deadline: float = STALL_PING) -> str | None:
        """The first route peer that does not answer a ping within ``deadline`` s (None: all answer)."""
        if self._ping is None:
            return None
        silent: list[str] = []
        ping = self._ping

        async def check(node: NodeId) -> None:
            try:
                await ping(node, deadline)
            except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                silent.append(node)

        async with trio.open_nursery() as nursery:
            for h in route.hops:
                if h.node != self.mesh.node_id:
                    nursery.start_soon(check, h.node)
        return silent[0] if silent else None

    async def _await_route(self, spec: str, failed: Route, deadline: float, failures: list[str]) -> Route:
        """A ready route other than ``failed`` (or ``failed`` again once its peers have had time to be
        declared dead and have not been), before ``deadline``."""
        now = trio.current_time()
        same_after = now + self.offline_after + 1.0
        timeout = self.config.recovery_timeout
        while True:
            route = self.route(spec, avoid=failed.hops)  # a replica, when the plan has one, at once
            if route is not None and not self._broken(route) and (
                    route.hops != failed.hops or trio.current_time() >= same_after):
                return route
            if trio.current_time() >= deadline:
                raise GenerationFailed(f"no working route for {spec} within {timeout}s after a failure "
                                       f"({'; '.join(failures)}); peers left: "
                                       f"{len(self.mesh.membership.live())}")
            await trio.sleep(0.1)

    async def _attempt(self, route: Route, req: Request, produced: list[int], *, replayed: bool
                       ) -> AsyncIterator[Token]:
        """One session over ``route``. After a failover (``produced`` not empty) the session first replays
        the generation with the original step structure — the prompt as step 0, then one step per token
        already produced — sent pipelined (each stage works on step k while the next works on step k-1, so
        it costs about one pass of the slowest stage per token, not a round trip each). A prefill of N tokens
        does not compute bit-identically to N single steps in bf16 or int8, so only the same steps rebuild
        the same KV caches, and the next token is the one the uninterrupted run would have produced."""
        me = self.mesh.node_id
        session = new_session_id(me)
        step_timeout = self.config.step_timeout
        self._on_route[route.hops] = self._on_route.get(route.hops, 0) + 1
        with contextlib.ExitStack() as counted, self.results.waiting(session, route) as results:
            counted.callback(self._left_route, route.hops)
            async with contextlib.AsyncExitStack() as stack:
                send = await self._upstream(stack, route)
                first = {**route.to_wire(), "driver": me, "sampling": req.sampling.to_wire()}
                inputs = [list(req.prompt), *([t] for t in produced)]  # step k's input
                position = 0
                frames = []
                for step, ids in enumerate(inputs):
                    frames.append(Frame("tokens", session, step, position, torch.tensor([ids], dtype=torch.int64),
                                        first if step == 0 else {}))
                    position += len(ids)
                step = first_new = len(inputs) - 1  # the step whose token comes next
                t0 = time.perf_counter()
                if produced:
                    await self._replay(send, frames, results, route, produced, step_timeout)
                else:
                    await send(frames[0])
                recent: collections.deque[float] = collections.deque(maxlen=STALL_WINDOW)  # decode steps, s
                watched = self._watched(route)
                while len(produced) < req.max_tokens:
                    typical = statistics.median(recent) if recent else 0.0  # a stall is judged against it
                    result = await self._wait(results, route, step, step_timeout, typical, watched)
                    token = result.extra.get("token")
                    if type(token) is not int or token < 0:
                        raise RouteFailed("BAD_RESULT", f"the last stage answered token {token!r}", route.nodes[-1])
                    timings = result.extra.get("compute_ms")
                    tok = Token(token, len(produced), token in req.stop_ids, route.epoch,
                                replayed and step == first_new, tuple(timings) if isinstance(timings, list) else (),
                                (time.perf_counter() - t0) * 1000, result.tensor)
                    if step > first_new:
                        recent.append(tok.step_ms / 1000)
                    yield tok
                    if tok.stop or len(produced) >= req.max_tokens:  # the caller appended it
                        break
                    step += 1
                    t0 = time.perf_counter()
                    await send(Frame("tokens", session, step, position, torch.tensor([[token]], dtype=torch.int64)))
                    position += 1
                with contextlib.suppress(RouteFailed):
                    await send(Frame("end", session, step + 1, position))  # free every stage's cache now

    async def _replay(self, send: Callable[[Frame], Awaitable[None]], frames: list[Frame],
                      results: trio.MemoryReceiveChannel[Frame], route: Route, produced: list[int],
                      timeout: float) -> None:
        """Send every replay step without waiting, while reading the results of the steps whose tokens the
        caller already has (each must be the same token: greedy and seeded sampling are deterministic)."""
        failed: list[RouteFailed] = []
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            async def pump() -> None:
                try:
                    for frame in frames:
                        await send(frame)
                except RouteFailed as err:
                    failed.append(err)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(pump)
            try:
                for k, want in enumerate(produced):
                    got = (await self._wait(results, route, k, timeout)).extra.get("token")
                    if got != want:  # a kernel that is not deterministic here: say so, keep the user's text
                        log.error("replay step %d gave token %r, the generation had %d", k, got, want,
                                  extra={"event": "replay_diverged", "model": route.model,
                                         "node_id": self.mesh.node_id})
            except RouteFailed as err:
                failed.append(err)
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        log.info("replayed %d steps on epoch %s in %.3fs", len(frames), route.epoch, time.perf_counter() - t0,
                 extra={"event": "replayed", "model": route.model, "node_id": self.mesh.node_id})

    async def _upstream(self, stack: contextlib.AsyncExitStack, route: Route) -> Callable[[Frame], Awaitable[None]]:
        first = route.hops[0].node
        if first == self.mesh.node_id:
            holder: list[trio.MemorySendChannel[Frame]] = []

            async def local(frame: Frame) -> None:
                try:
                    if not holder:
                        holder.append(self.local.open_local(frame))
                        stack.push_async_callback(holder[0].aclose)
                    else:
                        await holder[0].send(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise RouteFailed("STAGE_GONE", "the local stage ended the session", first) from None
            return local
        try:
            stream = await stack.enter_async_context(self.streams.open_stream(first, ACTIVATIONS_PROTOCOL))
        except PeerError as err:
            raise RouteFailed(err.code, f"cannot open the first stage: {err}", first) from None

        async def remote(frame: Frame) -> None:
            try:
                await protocol.send(stream, frame)
            except PeerError as err:
                raise RouteFailed(err.code, f"sending to the first stage failed: {err}", first) from None
        return remote

    async def _wait(self, results: trio.MemoryReceiveChannel[Frame], route: Route, step: int, timeout: float,
                    typical: float = 0.0, watched: set[NodeId] | None = None) -> Frame:
        """The result of ``step``. Past ``max(STALL_AFTER, STALL_STEPS * typical)`` without it (``typical``: a
        recent decode step's time; and again each time that passes) the route's peers are pinged: a silent one
        fails the step as PEER_UNRESPONSIVE."""
        start = trio.current_time()
        deadline = start + timeout
        spare = bool(self._spares(route.model, {route.hops}))  # leaving costs only a replay
        stall = max(REPLICA_STALL_AFTER if spare else STALL_AFTER, STALL_STEPS * typical)
        ping = REPLICA_STALL_PING if spare else STALL_PING
        check_at = start + stall
        while True:
            with trio.move_on_after(CUT_POLL):
                frame = await results.receive()
                if frame.kind == "error":
                    code, message = frame.extra.get("code"), frame.extra.get("message")
                    raise RouteFailed(str(code)[:64], str(message)[:500], str(frame.extra.get("node", ""))[:64])
                if frame.step == step:
                    return frame
                raise RouteFailed("BAD_RESULT", f"result for step {frame.step} while waiting for {step}",
                                  route.nodes[-1])
            if trio.current_time() >= deadline:
                raise RouteFailed("STEP_TIMEOUT", f"no token within {timeout}s", "")
            if (cut := self._cut(watched or set())) is not None:
                raise RouteFailed(code="PEER_DISCONNECTED", message=f"the connection to {cut} is gone", node=cut)
            if trio.current_time() >= check_at:
                hung = await self._hung(route, ping)
                if hung is not None:
                    waited = trio.current_time() - start
                    raise RouteFailed(code="PEER_UNRESPONSIVE", node=hung,
                                      message=f"no token for {waited:.1f}s and {hung} does not answer a ping")
                check_at = trio.current_time() + stall
            if self._broken(route):
                raise RouteFailed("ROUTE_CHANGED", "the plan moved to other stages or a stage peer went offline", "")

    # ---- tokenizer --------------------------------------------------------------------------------

    async def model_files(self, route: Route) -> Path:
        manifest, _ = await self.library.manifest(route.model, route.revision)
        folder, _ = await self.library.ensure(manifest, [])
        return folder

    async def tokenizer(self, route: Route) -> Any:
        """The model's tokenizer (files fetched from a holder if needed); TOKENIZER_UNAVAILABLE without one."""
        key = (route.model, route.revision)
        async with self._tokenizer_lock:
            if key not in self._tokenizers:
                folder = await self.model_files(route)
                self._tokenizers[key] = await self.offload(load_tokenizer, folder)
        tok = self._tokenizers[key]
        if tok is None:
            raise PeerError(f"{route.model} has no tokenizer: send token ids as the prompt",
                            code="TOKENIZER_UNAVAILABLE")
        return tok

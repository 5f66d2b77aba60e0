"""The plans of a running peer: the trio driver around ``PlanBook`` (what it believes) and ``Controller``
(what it decides when it coordinates).

Tasks (children of the peer's nursery):
    receive     - signed plans from the plans topic into the book; refusals logged with their code
    coordinate  - while this peer is the coordinator: for each model it keeps a plan for, decide
                  (initial plan, reassignment, re-issue under a new term, improvement on joins), sign,
                  publish; republish the current plans every ``republish_interval`` for late joiners

Suspects: a driver whose route failed names the route's peers (``check_suspects``, here or over
``SUSPECT_PROTOCOL`` from another peer); the coordinator pings each one in a current plan with a short
deadline, and one that does not answer counts as offline for planning at once (the next epoch is issued
now, not when its heartbeats time out) until a heartbeat of it arrives after the failed ping. A driver
cannot make the coordinator drop a peer that answers.

Planning runs in a worker thread (a 1,000-peer mesh takes tens of milliseconds), never on the event loop.
The layers of a model come from its signed manifest: this peer's store, or else a peer that holds it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import cbor2
import trio

from coordinator import planner, search
from coordinator.control import Controller, Decision, Worker, capped_claims
from coordinator.planner import Layer
from coordinator.plans import MAX_STAGES, Held, NodeSummary, Plan, PlanBook, Verdict, make_plan, open_plan, seal_plan
from coordinator.search import Links
from mesh.config import Config
from mesh.errors import DecodeError, MeshError, NotFoundError, PeerError
from mesh.ids import ModelRef, NodeId, Span, StageKey, check_spans, keep_ref
from mesh.logs import Throttle
from mesh.ports import Clock, Gossip, Library, MeshView, Offload, Signer
from mesh.transport import GossipMessage
from mesh.wire import PLANS_TOPIC, NodeStatus, loads_cbor
from storage import formats
from storage.manifest import Manifest

log = logging.getLogger(__name__)


#: How long an unpinned model id ("tiny", not "tiny@rev") keeps the revision it resolved to before a plan exists.
RESOLVE_TTL = 30.0
#: Per-token dispatch cost of a shard in blocks (``Layer.calls``): a block runs attention and an MLP, ~a dozen
#: kernels; an embedding lookup, a norm or a head is one or two.
CALLS = {"block": 1.0}
#: A peer a driver reports must answer a ping within this many seconds, or it counts as offline for planning;
#: one whose heartbeats this peer already misses (``degraded``) counts at once: the report is a second signal.
SUSPECT_PING = 0.5
#: Drivers report a failed route's peers to the coordinator on this protocol (one CBOR map each way).
SUSPECT_PROTOCOL = "/meshnode/suspect/1"
MAX_SUSPECT_REPORT = 4096  # bytes: a model id and a route's peers
#: A measured step time moves a peer's speed estimate by at most this factor either way.
MAX_SCALE = 8.0


class NotCoordinator(PeerError):
    code = "NOT_COORDINATOR"


def planner_layers(manifest: Manifest, context_tokens: int, compute: str | None = None) -> list[Layer]:
    """The planner's view of a model: one layer per shard (embedding, blocks, norm, head) in pipeline
    order; FLOPs per token at ``context_tokens`` of context; memory = weights as loaded for ``compute``
    (default: the manifest's compute dtype) + KV cache for that context, in that dtype."""
    compute = compute or manifest.compute
    by_name = {s.name: s for s in manifest.shards}
    out = []
    for s in manifest.shards:
        weights, kv = s.memory_bytes, s.kv_bytes_per_token
        if compute != manifest.compute:  # float tensors and the KV cache change size with the compute dtype
            own = s if s.tensors or not s.tied_to else by_name[s.tied_to]
            weights = formats.loaded_bytes([(t.name, t.dtype, t.shape) for t in own.tensors], compute)
            kv = kv * formats.COMPUTE_ITEMSIZE[compute] // formats.COMPUTE_ITEMSIZE[manifest.compute]
        # What a token streams: a block's or head's weights through its kernel (compact formats their own,
        # float ones as loaded in the compute dtype), the KV cache at memory speed; an embedding one row.
        kernel = s.format if s.format in ("int8", "int4") else compute
        if s.kind == "head":
            kernel += "-wide"  # a vocabulary of outputs over the hidden size: its own measured speed
        streamed = 0 if s.kind == "embedding" else weights
        out.append(Layer(s.index, float(s.flops_base + s.flops_per_context * context_tokens),
                         weights + kv * context_tokens, read_bytes=streamed + kv * context_tokens,
                         calls=CALLS.get(s.kind, 0.1), reads=((kernel, streamed), ("", kv * context_tokens))))
    return out


def overhead_of(measured_us: Mapping[str, float], compute: str) -> float:
    """A peer's gossiped per-block dispatch time (µs per compute dtype) in ``compute``, seconds (0: unknown)."""
    return measured_us.get(compute, 0.0) / 1e6


#: How a refused gossip message is reported (the root's rate-limited log of rejections).
Reject = Callable[[PeerError, str], None]


class PlanService:
    def __init__(self, config: Config, mesh: MeshView, gossip: Gossip, signer: Signer, library: Library, *,
                 reject: Reject, on_plan: Callable[[], None], now: Clock, offload: Offload,
                 ping: Callable[[NodeId, float], Awaitable[float]] | None = None) -> None:
        self.config, self.mesh, self.gossip, self.signer, self.library = config, mesh, gossip, signer, library
        self._reject, self._on_plan, self.now, self.offload = reject, on_plan, now, offload
        co = config.coordinator
        self.book = PlanBook()
        self.controller = Controller(threshold=co.reassign_threshold, objective=co.objective,
                                     replicas=0 if co.replicas == "auto" else int(co.replicas))
        self.models: list[str] = []  # specs: "id" or "id@revision", one per model id
        for spec in co.models:
            self._keep(spec)
        self.errors: dict[str, dict[str, Any]] = {}  # model -> the last planning error, cleared by a plan
        self._layers: dict[tuple[str, str, str], list[Layer]] = {}  # (model, revision, compute) -> layers
        self._throttle = Throttle(every=10.0)
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._latest: dict[str, tuple[str, float]] = {}  # unpinned model -> (revision found, when)
        self._ping = ping
        self.suspects: dict[NodeId, float] = {}  # peer -> when a ping of it failed (offline for planning)
        self._checking: set[NodeId] = set()  # pings in flight (one per peer however many drivers report)

    # ---- receiving ---------------------------------------------------------------------------------

    def accept_gossip(self, msg: GossipMessage) -> bool:
        """Topic validator: forged, malformed or oversize plans are neither delivered nor relayed."""
        return msg.sender == self.mesh.node_id or self._open(msg) is not None

    def _open(self, msg: GossipMessage) -> Plan | None:
        """The verified plan, or None after logging why it was refused."""
        try:
            return open_plan(msg.data)
        except PeerError as err:
            self._reject(err, msg.sender)
        except Exception:  # a decoder bug must not take down pubsub or the receive loop: refuse, log, go on
            log.exception("plan from %s could not be read", msg.sender,
                          extra={"event": "rejected", "code": "INTERNAL", "peer": msg.sender})
        return None

    async def receive(self) -> None:
        async with self.gossip.subscribe(PLANS_TOPIC) as messages:
            async for msg in messages:
                if msg.sender == self.mesh.node_id or (plan := self._open(msg)) is None:
                    continue
                self._judge(plan, self.book.offer(Held(plan, msg.data), self.mesh.leadership), msg.sender)

    def _judge(self, plan: Plan, verdict: Verdict, sender: str) -> None:
        where = {"model": plan.model_id, "term": plan.term, "epoch": plan.epoch, "coordinator": plan.coordinator,
                 "node_id": self.mesh.node_id}
        if verdict.accepted:
            self._on_plan()
            stages = ", ".join(f"{a.node[-6:]}[{a.start},{a.end})" for a in plan.assignments)
            log.info("plan for %s: term %d epoch %d (%s) %s", plan.model_id, plan.term, plan.epoch,
                     plan.reason or "-", stages, extra={"event": "plan_accepted", "reason": plan.reason, **where})
        elif verdict.code in ("STALE_TERM", "NOT_COORDINATOR", "STALE_EPOCH"):
            held = self._throttle.allow((sender, verdict.code), self.now())
            if held is not None:
                log.warning("ignored plan for %s from %s: %s (term %d epoch %d)", plan.model_id, sender,
                            verdict.code, plan.term, plan.epoch,
                            extra={"event": "plan_ignored", "code": verdict.code, "peer": sender, **where})

    def on_leadership_changed(self) -> None:
        for plan, verdict in self.book.retry(self.mesh.leadership):
            self._judge(plan, verdict, plan.coordinator)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ---- coordinating ------------------------------------------------------------------------------

    def is_coordinator(self) -> bool:
        view = self.mesh
        return view.leadership.coordinator == view.node_id and view.status in (NodeStatus.READY, NodeStatus.DEGRADED)

    async def coordinate(self) -> None:
        co = self.config.coordinator
        last_publish = -float("inf")
        while True:
            with trio.move_on_after(self.config.membership.heartbeat_interval / 4):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self.is_coordinator():
                continue
            for spec in self.specs():
                await self._coordinate_model(spec)
            if self.now() - last_publish >= co.republish_interval:
                last_publish = self.now()
                await self._republish()

    def specs(self) -> list[str]:
        """What to keep a plan for: the configured or requested models, and every model the mesh has a
        plan for (a new coordinator takes over its predecessor's plans)."""
        specs = list(self.models)
        for m in sorted(self.mesh.membership.members(), key=lambda m: m.node_id):
            if m.status == NodeStatus.OFFLINE:
                continue
            for spec in m.info.serve_models:  # peers that asked the mesh to serve a model
                if ModelRef.of(spec).model not in {ModelRef.of(s).model for s in specs}:
                    specs.append(spec)
        models = {ModelRef.of(spec).model for spec in specs}
        inherited = [str(ModelRef(m, h.plan.revision)) for m, h in self.book.current.items() if m not in models]
        return [*specs, *inherited]

    async def _coordinate_model(self, spec: str, *, strict: bool = False) -> None:
        model, revision = ModelRef.of(spec)
        async with self._lock:  # the loop and API requests: one decision at a time, one epoch each
            try:
                held = self.book.current.get(model)
                # An unpinned model stays at the revision of its plan; without a plan, at the one found.
                revision = revision or (held.plan.revision if held is not None else self._resolved(model))
                layers, revision, compute = await self.layers(model, revision)
                self._latest[model] = (revision, self.now())
                current = held.plan if held is not None and held.plan.revision == revision else None
                workers = self.workers(model, revision, layers, compute)
                links = self.links()
                term = self.mesh.leadership.term
                decision = await self.offload(self.controller.decide, model, layers, workers, current, term,
                                              links)
                if current is not None and current.compute_dtype != compute and decision is None:
                    decision = await self.offload(  # replan in the new compute dtype
                        self.controller.decide, model, layers, workers, None, term, links)
                    if decision is not None:
                        decision = dataclasses.replace(decision, reason="compute")
                if decision is not None:
                    await self._issue(model, revision, layers, decision, compute=compute)
            except MeshError as err:
                self._error(model, err)
                if strict:
                    raise

    def _resolved(self, model: str) -> str | None:
        """The revision an unpinned model resolved to in the last 30 s (no manifest fetch per tick)."""
        found = self._latest.get(model)
        return found[0] if found is not None and self.now() - found[1] < RESOLVE_TTL else None

    def _error(self, model: str, err: MeshError) -> None:
        self.errors[model] = {**err.to_dict(), "at": time.time()}
        if self._throttle.allow(("plan", model, err.code, str(err)), self.now()) is not None:
            log.error("cannot plan %s: %s %s", model, err.code, err,
                      extra={"event": "plan_failed", "code": err.code, "model": model, "node_id": self.mesh.node_id})

    async def _issue(self, model: str, revision: str, layers: Sequence[Layer], d: Decision, *,
                     request_id: str = "", compute: str = "float32") -> Plan:
        lead = self.mesh.leadership
        if not self.is_coordinator():
            raise NotCoordinator(f"this peer is not the coordinator (term {lead.term}: {lead.coordinator})")
        plan = make_plan(layers, d.peers, d.split, model=model, revision=revision, term=lead.term,
                         epoch=self.book.next_epoch(model), coordinator=self.mesh.node_id, request_id=request_id,
                         reason=d.reason, reassigned=d.reassigned, issued_at=time.time(), nodes=self._summaries(),
                         compute_dtype=compute, objective=self.controller.objective, why=d.why,
                         replicas=d.replicas)
        envelope = seal_plan(plan, self.signer)
        verdict = self.book.offer(Held(plan, envelope), lead)
        assert verdict.accepted, verdict
        self.errors.pop(model, None)
        self._judge(plan, verdict, self.mesh.node_id)
        await self._publish(envelope)
        return plan

    async def _publish(self, envelope: bytes) -> None:
        with trio.move_on_after(self.config.membership.heartbeat_interval):
            await self.gossip.publish(PLANS_TOPIC, envelope)

    async def _republish(self) -> None:
        term = self.mesh.leadership.term
        for held in list(self.book.current.values()):
            if held.plan.coordinator == self.mesh.node_id and held.plan.term == term:
                await self._publish(held.envelope)

    # ---- suspects ----------------------------------------------------------------------------------

    def suspected(self, node: NodeId) -> bool:
        """A ping of ``node`` failed and no heartbeat of it arrived since (then it is forgotten)."""
        at = self.suspects.get(node)
        if at is None:
            return False
        m = self.mesh.membership.get(node)
        if m is None or m.last_seen > at:
            del self.suspects[node]
            return False
        return True

    async def check_suspects(self, nodes: Sequence[NodeId], reporter: str,
                             unanswered: Collection[NodeId] = ()) -> list[NodeId]:
        """Ping each of ``nodes`` that is in a current plan (at once, ``SUSPECT_PING`` each); those that do not
        answer are suspects from now: the coordinating loop is woken to cover their ranges. One whose heartbeats
        are already missed here, or in ``unanswered`` (this peer's own driver pinged it in vain just now; a
        remote reporter's word is never taken for it), counts without another ping. Coordinator only
        (NOT_COORDINATOR otherwise). Returns the peers found unresponsive."""
        if not self.is_coordinator():
            lead = self.mesh.leadership
            raise NotCoordinator(f"this peer is not the coordinator (term {lead.term}: {lead.coordinator})")
        in_plans = {a.node for h in self.book.current.values() for p in h.plan.pipelines for a in p}
        todo = [n for n in dict.fromkeys(nodes) if n in in_plans and n != self.mesh.node_id
                and n not in self._checking and not self.suspected(n)]
        found: list[NodeId] = []

        async def check(node: NodeId) -> None:
            self._checking.add(node)
            try:
                m = self.mesh.membership.get(node)
                if m is not None and m.status == NodeStatus.DEGRADED:
                    raise PeerError("its heartbeats are missed here too (degraded)", code="PEER_UNRESPONSIVE")
                if node in unanswered and reporter == self.mesh.node_id:
                    raise PeerError("it did not answer this peer's driver's ping", code="PEER_UNRESPONSIVE")
                assert self._ping is not None
                await self._ping(node, SUSPECT_PING)
            except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                self.suspects[node] = self.now()
                found.append(node)
                log.warning("peer %s is unresponsive (%s reported a failed route): %s; covering its ranges now",
                            node, reporter, err,
                            extra={"event": "suspect_confirmed", "peer": node, "reporter": reporter,
                                   "node_id": self.mesh.node_id})
            finally:
                self._checking.discard(node)

        if self._ping is not None and todo:
            async with trio.open_nursery() as nursery:
                for node in todo:
                    nursery.start_soon(check, node)
        if found:
            self._wake.set()
        return found

    async def on_suspect_stream(self, stream: Any) -> None:
        """``SUSPECT_PROTOCOL``: ``{"nodes": [id, ...]}`` from a driver; answers ``{"unresponsive": [...]}``
        (or ``{"error": code}``). Malformed reports are refused with MALFORMED_MESSAGE."""
        raw = loads_cbor(await stream.receive_frame(MAX_SUSPECT_REPORT), MAX_SUSPECT_REPORT)
        nodes = raw.get("nodes") if isinstance(raw, dict) else None
        if not (isinstance(nodes, list) and 0 < len(nodes) <= MAX_STAGES
                and all(isinstance(n, str) and 0 < len(n) <= 128 for n in nodes)):
            raise DecodeError("a suspect report is {\"nodes\": [node id, ...]} with at most "
                              f"{MAX_STAGES} ids")
        try:
            found = await self.check_suspects([NodeId(n) for n in nodes], reporter=stream.peer)
            answer: dict[str, Any] = {"unresponsive": list(found)}
        except NotCoordinator:
            answer = {"error": NotCoordinator.code}
        await stream.send_frame(cbor2.dumps(answer))

    # ---- inputs ------------------------------------------------------------------------------------

    async def layers(self, model: str, revision: str | None) -> tuple[list[Layer], str, str]:
        """(planner layers, revision, compute dtype) of ``model`` (at ``revision``, or the version found) from
        its signed manifest (``Library.manifest``: this peer's store, else a holder), counted in the
        compute dtype a plan would use now (``compute_for``). MODEL_NOT_AVAILABLE when nobody has it."""
        manifest, _ = await self.library.manifest(model, revision)  # (kept there once it has a revision)
        compute = self.compute_for(manifest)
        key = (model, manifest.revision, compute)
        if key not in self._layers:
            self._layers[key] = planner_layers(manifest, self.config.coordinator.context_tokens, compute)
        return self._layers[key], manifest.revision, compute

    def compute_for(self, manifest: Manifest) -> str:
        """The compute dtype of a plan for ``manifest``: ``--compute-dtype`` if set; else bf16 for compact
        weights when every live peer runs them fast in bf16 (``storage.formats.plan_compute`` over their
        gossiped features), fp32 otherwise. One dtype per plan: no pipeline mixes them."""
        wanted = self.config.inference.compute_dtype
        if wanted != "auto":
            return wanted
        return formats.plan_compute(manifest.formats,
                                    [m.info.features_supported for m in self.mesh.membership.live()])

    def _flops(self) -> dict[str, float]:
        """Each member's compute claim as the planner believes it (``control.capped_claims``)."""
        return capped_claims({m.node_id: (m.info.compute_flops, m.info.hardware.cpu_cores)
                              for m in self.mesh.membership.members()})

    def workers(self, model: str, revision: str, layers: Sequence[Layer] = (), compute: str = "float32"
                ) -> list[Worker]:
        """Every member as the controller sees it, its speed model in ``compute`` (the plan's dtype)."""
        entry = str(ModelRef(model, revision))
        hop = self.config.coordinator.hop_ms / 1000
        gpu_only = self.config.membership.require_gpu
        flops = self._flops()
        scales = self._scales(model, revision, layers, flops)
        return [Worker(m.node_id, flops[m.node_id], m.info.layer_memory_bytes,
                       NodeStatus.OFFLINE if self.suspected(m.node_id) else m.status,
                       m.info.accept_public_jobs and not (gpu_only and not m.info.hardware.gpus),
                       entry in m.info.installed_models, hop, m.info.memory_bandwidth, scales.get(m.node_id, 1.0),
                       overhead_of(m.info.layer_overhead_us, compute), tuple(sorted(m.info.kernel_bandwidth.items())))
                for m in self.mesh.membership.members()]

    def _scales(self, model: str, revision: str, layers: Sequence[Layer], flops: dict[str, float]) -> dict[str, float]:
        """node -> measured decode step time over the speed model's estimate, for the peers serving the
        current plan of ``model`` (their gossiped ``step_ms`` for that very stage), within ``MAX_SCALE``."""
        held = self.book.current.get(model)
        if held is None or held.plan.revision != revision or not layers:
            return {}
        plan, pos, out = held.plan, {x.index: i for i, x in enumerate(layers)}, {}
        for a in plan.assignments:
            m = self.mesh.membership.get(a.node)
            key = str(StageKey.make(model, revision, a.start, a.end, plan.compute_dtype))
            if m is None or not (ms := m.info.step_ms.get(key)) or a.start not in pos or a.end - 1 not in pos:
                continue
            peer = planner.Peer(a.node, flops.get(a.node, 0.0), 0, bandwidth=m.info.memory_bandwidth,
                                overhead_s=overhead_of(m.info.layer_overhead_us, plan.compute_dtype),
                                kernels=tuple(sorted(m.info.kernel_bandwidth.items())))
            estimate = search.build(layers, [(peer, pos[a.start], pos[a.end - 1] + 1)], Links()).stages[0].compute_s
            if 0 < estimate < float("inf"):
                out[a.node] = min(max(ms / 1000 / estimate, 1 / MAX_SCALE), MAX_SCALE)
        return out

    def links(self) -> Links:
        """The measured link matrix: every member's gossiped RTTs (``NodeInfo.links``), one-way = RTT / 2;
        a pair measured from both ends counts the smaller."""
        pairs: dict[tuple[str, str], float] = {}
        for m in self.mesh.membership.members():
            if m.status == NodeStatus.OFFLINE:
                continue
            for other, ms in m.info.links.items():
                key = (min(m.node_id, other), max(m.node_id, other))
                pairs[key] = min(pairs.get(key, float("inf")), ms / 2000)
        return Links(pairs)

    def _summaries(self) -> dict[str, NodeSummary]:
        hop_ms = self.config.coordinator.hop_ms
        out = {}
        flops = self._flops()
        for m in self.mesh.membership.members():
            a = m.arrivals
            reliability = a.count / (a.count + a.missed) if a.count else 1.0
            out[m.node_id] = NodeSummary(m.node_id, flops[m.node_id], m.info.layer_memory_bytes,
                                         m.info.hardware.load, hop_ms, round(reliability, 4))
        return out

    # ---- API ---------------------------------------------------------------------------------------

    def view(self, model: str | None = None) -> dict[str, Any]:
        lead = self.mesh.leadership
        plans = {m: h for m, h in self.book.current.items() if model is None or m == model}
        if model is not None and not plans and model not in self.errors:
            raise NotFoundError(f"no plan for {model!r} on this peer", code="NO_PLAN")
        return {
            "coordinator": lead.coordinator, "term": lead.term, "self": self.mesh.node_id,
            "models": self.models,
            "plans": [h.plan.view() | {"envelope": h.envelope.hex()} for h in plans.values()],
            "errors": {m: e for m, e in self.errors.items() if model is None or m == model},
        }

    async def request_plan(self, spec: str) -> dict[str, Any]:
        """Keep a plan for ``spec`` from now on and plan it at once (coordinator only)."""
        if not self.is_coordinator():
            lead = self.mesh.leadership
            raise NotCoordinator(f"ask the coordinator: {lead.coordinator} (term {lead.term})")
        model = ModelRef.of(spec).model
        try:
            await self._coordinate_model(spec, strict=True)
        except MeshError:
            self.errors.pop(model, None)  # not kept: a mistyped id must not be retried forever
            raise
        self._keep(spec)
        return self.view(model)

    def _keep(self, spec: str) -> None:
        self.models = keep_ref(self.models, spec)

    async def reassign_request(self, failed: Sequence[str], current_splits: Any, request_id: str,
                               model: str | None) -> dict[str, Any]:
        """``POST /api/reassign-node``: cover the ranges of ``failed`` in ``current_splits`` (the seeds'
        shape: ``[{"layer_range": [s, e), "assigned_node": id}, ...]``), keeping every other range. When this
        peer coordinates and the splits are its current plan's, the result is published as the next epoch."""
        if model is None:
            if len(self.book.current) != 1:
                raise PeerError("\"model\" is required when the mesh has no single current plan",
                                code="MISSING_PARAMETER")
            model = next(iter(self.book.current))
        held = self.book.current.get(model)
        revision = held.plan.revision if held is not None else None
        layers, revision, compute = await self.layers(model, revision)
        stages = parse_splits(current_splits, layers)
        workers = self.workers(model, revision, layers, compute)
        alive = {w.node_id for w in workers if w.alive}
        # Stage peers the table knows are offline or draining count as failed too.
        gone = set(failed) | {n for n, _, _ in stages if n not in alive and any(w.node_id == n for w in workers)}
        by_id = {w.node_id: w.peer(layers) for w in workers}
        unknown = [n for n, _, _ in stages if n not in by_id and n not in gone]
        if unknown:
            raise PeerError(f"unknown peers in current_splits: {', '.join(unknown)}", code="UNKNOWN_NODE")
        # A failed peer the table no longer knows is costed like the average peer of the plan.
        known = [by_id[n].flops for n, _, _ in stages if n in by_id] or [1.0]
        hop = self.config.coordinator.hop_ms / 1000
        for n, _, _ in stages:
            by_id.setdefault(n, planner.Peer(n, sum(known) / len(known), 0, hop))
        current = planner.split_of(layers, [(by_id[n], s, e) for n, s, e in stages])
        decision = await self.offload(functools.partial(
            self.controller.cover, layers, workers, current, gone, reason="request", links=self.links()))
        published = None
        asked = tuple(Span(n, layers[s].index, layers[e - 1].index + 1) for n, s, e in stages)
        if held is not None and self.is_coordinator():
            async with self._lock:  # still the current plan once the loop lets go?
                if self.book.current.get(model) is held and held.plan.spans() == asked:
                    published = await self._issue(model, revision, layers, decision, request_id=request_id,
                                                  compute=compute)
        plan = published or make_plan(layers, decision.peers, decision.split, model=model, revision=revision,
                                      request_id=request_id, reason=decision.reason,
                                      reassigned=decision.reassigned, nodes=self._summaries(), compute_dtype=compute,
                                      objective=self.controller.objective, why=decision.why)
        view = plan.view()
        return {"request_id": request_id, "model": model, "new_splits": view["model_split_plan"]["splits"],
                "reassigned_nodes": list(decision.reassigned), "replanned": decision.reason == "replan",
                "fallback_nodes": view["fallback_nodes"], "published": published is not None,
                "term": plan.term, "epoch": plan.epoch}


def parse_splits(raw: Any, layers: Sequence[Layer]) -> list[Span]:
    """The seeds' splits (layer indices) → spans of layer *positions*, contiguous over every layer."""
    if not isinstance(raw, list) or not raw:
        raise PeerError("current_splits: expected a non-empty list", code="INVALID_PLAN_INPUT")
    pos = {layer.index: i for i, layer in enumerate(layers)}
    out = []
    for i, row in enumerate(raw):
        node = row.get("assigned_node") if isinstance(row, dict) else None
        rng = row.get("layer_range") if isinstance(row, dict) else None
        if not isinstance(node, str) or not node or not (isinstance(rng, list) and len(rng) == 2
                                                         and all(type(x) is int for x in rng)):
            raise PeerError(f"current_splits[{i}]: need assigned_node and layer_range [start, end)",
                            code="INVALID_PLAN_INPUT")
        start, end = rng
        if start not in pos or (end - 1) not in pos:
            raise PeerError(f"current_splits[{i}]: layer_range {rng} is outside the model's layers",
                            code="INVALID_PLAN_INPUT")
        out.append(Span(node, pos[start], pos[end - 1] + 1))
    check_spans(out, len(layers), code="INVALID_PLAN_INPUT", what="current_splits")
    return out

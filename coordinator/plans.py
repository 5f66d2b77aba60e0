"""Plans: what the coordinator decided, as every peer holds it. Pure; no I/O.

A ``Plan`` names a model version, the term of the coordinator that made it and an epoch, and the stages
in pipeline order: a half-open layer range per peer, with the fallback that takes the range if its peer
drops. Plans travel on the plans topic as signed envelopes (kind ``plan``). A ``PlanBook`` decides what
this peer believes:

- a plan counts only when its signer is the coordinator it names (PLAN_SIGNER_MISMATCH otherwise), and
  only from the coordinator of the term this peer follows (``NOT_COORDINATOR`` / ``STALE_TERM``);
- per model, a plan replaces the current one only with a higher ``(term, epoch)``; anything else is stale
  (``STALE_EPOCH``) or the same plan published again (``DUPLICATE``; coordinators republish so late
  joiners learn the plan);
- a plan of a term this peer has not seen claimed yet (or of its term while it follows nobody) is kept
  aside, per model and claimant, and offered again once it follows that term: a plan that outruns its
  coordinator's claim is not lost, and a rogue's far-future plan cannot push it out.

Epochs only grow per model, across terms as well: a new coordinator continues from the highest epoch
it has accepted. What the book keeps is bounded by the models the mesh plans (current) and
``MAX_PENDING``; plans it ignores leave no trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2

from coordinator import planner
from coordinator.election import Leadership
from mesh.errors import DecodeError, PeerError
from mesh.identity import Identity, node_id_for_key
from mesh.ids import Span, check_spans
from mesh.wire import MAX_GOSSIP_MESSAGE, open_envelope, scalar_map, seal, versioned
from storage.formats import COMPUTE_DTYPES

T = TypeVar("T")
PLAN = "plan"
PLAN_VERSION = 1
MAX_STAGES = 1024
MAX_REPLICAS = 64  # pipelines of one model besides the first
MAX_PENDING = 64  # plans of a future term kept aside, one per (model, claimant)


class PlanSignerMismatch(PeerError):
    code = "PLAN_SIGNER_MISMATCH"


@dataclass(frozen=True, slots=True)
class NodeSummary:
    """A selected peer as the coordinator saw it when planning."""

    node_id: str
    flops: float
    memory_bytes: int
    load: float = 0.0
    latency_ms: float = 0.0
    reliability: float = 1.0


@dataclass(frozen=True, slots=True)
class Assignment(Span):
    """A ``Span`` of layer *indices* (half-open) in a plan, with its costs and the peer that takes it over."""

    memory_bytes: int
    flops: float  # per token
    time_s: float  # compute + hop, per token
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    model_id: str
    revision: str
    term: int
    epoch: int
    coordinator: str
    total_layers: int
    assignments: tuple[Assignment, ...]
    nodes: tuple[NodeSummary, ...]
    bottleneck_s: float
    communication_overhead_s: float = 0.0
    request_id: str = ""
    reason: str = ""  # initial | reassign | replan | term | improve | request
    reassigned: tuple[str, ...] = ()
    issued_at: float = 0.0  # the coordinator's wall clock; informational
    compute_dtype: str = "float32"  # every stage computes in it and sends activations in it (no mixed pipeline)
    objective: str = ""  # what the planner minimised: latency | throughput ("" from a reassignment's patch)
    # The plan explains itself (``coordinator.search.why``): objective, exact, ms_per_token, tokens_per_s,
    # bound, runner_up_ms, ...; empty when the planner gave none (a reassignment keeps survivors' ranges).
    why: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    # More pipelines of the same model (replicas), each over all layers, on peers of no other pipeline;
    # drivers spread sessions over ``pipelines`` (the assignments first).
    replicas: tuple[tuple[Assignment, ...], ...] = ()

    @property
    def pipelines(self) -> tuple[tuple[Assignment, ...], ...]:
        return (self.assignments, *self.replicas)

    def all_spans(self) -> tuple[tuple[Span, ...], ...]:
        """Each pipeline's spans (a route's hops equal one of them)."""
        return tuple(tuple(a.span for a in p) for p in self.pipelines)

    @property
    def latency_s(self) -> float:
        return sum(a.time_s for a in self.assignments)

    @property
    def version(self) -> tuple[int, int]:
        return (self.term, self.epoch)

    def spans(self) -> tuple[Span, ...]:
        """The assignments as plain spans (node and layer indices): equal to a route's hops for this plan."""
        return tuple(a.span for a in self.assignments)

    def split(self, layers: Sequence[planner.Layer], pipeline: int = 0) -> planner.Split:
        """A pipeline of the plan (the first: its assignments) as a planner Split over ``layers`` (positions,
        not indices)."""
        pos = {layer.index: i for i, layer in enumerate(layers)}
        stages = []
        for a in self.pipelines[pipeline]:
            if a.start not in pos or (a.end - 1) not in pos:
                raise PeerError(f"layer range [{a.start}, {a.end}) is outside the model's layers",
                                code="INVALID_PLAN_INPUT")
            stages.append(planner.Stage(a.node, pos[a.start], pos[a.end - 1] + 1, a.flops, a.memory_bytes,
                                        a.time_s))
        return planner.Split(tuple(stages), max((s.time_s for s in stages), default=0.0))

    def view(self, tokens: int = 1) -> dict[str, Any]:
        """The seeds' plan shape (what ``/api/plan`` and ``meshnode plan`` print)."""
        splits = [{"layer_range": [a.start, a.end], "assigned_node": a.node,
                   "memory_requirement_mb": round(a.memory_bytes / 2**20, 3), "compute_requirement": a.flops,
                   "stage_time_s": a.time_s} for a in self.assignments]
        return {
            "request_id": self.request_id,
            "model": self.model_id,
            "revision": self.revision,
            "term": self.term,
            "epoch": self.epoch,
            "coordinator": self.coordinator,
            "reason": self.reason,
            "reassigned_nodes": list(self.reassigned),
            "issued_at": self.issued_at,
            "compute_dtype": self.compute_dtype,
            "objective": self.objective,
            "why": dict(self.why),
            "selected_nodes": [{"node_id": n.node_id,
                                "capabilities": {"flops": n.flops, "memory_bytes": n.memory_bytes},
                                "current_load": n.load, "latency_ms": n.latency_ms, "reliability": n.reliability}
                               for n in self.nodes],
            "model_split_plan": {
                "total_layers": self.total_layers,
                "splits": splits,
                "bottleneck_s": self.bottleneck_s,
                "communication_overhead": self.communication_overhead_s,
                "estimated_inference_time": self.latency_s,
            },
            # Pipelined decoding of one sequence is latency-bound: each token passes every stage in turn.
            "estimated_total_time": self.latency_s * tokens,
            "fallback_nodes": [{"layer_range": [a.start, a.end], "node_id": a.fallback} for a in self.assignments],
            # Every pipeline of the model, this plan's splits first: each serves whole sessions.
            "replicas": [{"splits": [{"layer_range": [a.start, a.end], "assigned_node": a.node,
                                      "stage_time_s": a.time_s} for a in p],
                          "latency_s": sum(a.time_s for a in p)} for p in self.pipelines],
        }


def make_plan(layers: Sequence[planner.Layer], peers: Sequence[planner.Peer], split: planner.Split, *,
              model: str = "", revision: str = "", term: int = 0, epoch: int = 0, coordinator: str = "",
              request_id: str = "", reason: str = "", reassigned: Sequence[str] = (), issued_at: float = 0.0,
              nodes: dict[str, NodeSummary] | None = None, compute_dtype: str = "float32", objective: str = "",
              why: Mapping[str, str | int | float | bool | None] | None = None,
              replicas: Sequence[planner.Split] = ()) -> Plan:
    """A Plan from a planner Split (and more pipelines, ``replicas``): layer positions become layer indices,
    every range of the first gets a fallback among the peers of no pipeline (``planner.fallback_for``),
    ``nodes`` adds load/latency/reliability to the selected peers."""
    by_id = {q.node_id: q for q in peers}
    nodes = nodes or {}
    taken = {s.node for r in replicas for s in r.stages}
    spare = [q for q in peers if q.node_id not in taken]
    assignments = tuple(
        Assignment(s.node, layers[s.start].index, layers[s.end - 1].index + 1, s.bytes, s.flops, s.time_s,
                   planner.fallback_for(s, split, spare))
        for s in split.stages)
    more = tuple(tuple(Assignment(s.node, layers[s.start].index, layers[s.end - 1].index + 1, s.bytes, s.flops,
                                  s.time_s, None) for s in r.stages) for r in replicas)
    summaries = tuple(
        nodes.get(s.node, NodeSummary(s.node, by_id[s.node].flops, by_id[s.node].memory_bytes,
                                      latency_ms=by_id[s.node].link_s * 1000))
        for s in split.stages)
    return Plan(
        model_id=model, revision=revision, term=term, epoch=epoch, coordinator=coordinator,
        total_layers=len(layers), assignments=assignments, nodes=summaries, bottleneck_s=split.bottleneck_s,
        communication_overhead_s=sum(by_id[s.node].link_s for s in split.stages[:-1]),
        request_id=request_id, reason=reason, reassigned=tuple(reassigned), issued_at=issued_at,
        compute_dtype=compute_dtype, objective=objective,
        why={k: v for k, v in (why or {}).items() if v is not None}, replicas=more,
    )


# ---- wire ----------------------------------------------------------------------------------------


def encode_plan(p: Plan) -> bytes:
    return cbor2.dumps({
        "version": PLAN_VERSION, "model_id": p.model_id, "revision": p.revision, "term": p.term, "epoch": p.epoch,
        "coordinator": p.coordinator, "total_layers": p.total_layers,
        "assignments": [[a.node, a.start, a.end, a.memory_bytes, a.flops, a.time_s, a.fallback]
                        for a in p.assignments],
        "nodes": [[n.node_id, n.flops, n.memory_bytes, n.load, n.latency_ms, n.reliability] for n in p.nodes],
        "bottleneck_s": p.bottleneck_s, "communication_overhead_s": p.communication_overhead_s,
        "request_id": p.request_id, "reason": p.reason, "reassigned": list(p.reassigned),
        "issued_at": p.issued_at, "compute_dtype": p.compute_dtype, "objective": p.objective, "why": dict(p.why),
        "replicas": [[[a.node, a.start, a.end, a.memory_bytes, a.flops, a.time_s, a.fallback] for a in r]
                     for r in p.replicas],
    })


def seal_plan(p: Plan, identity: Identity) -> bytes:
    if p.coordinator != identity.node_id:
        raise ValueError("a plan is signed by the coordinator it names")
    return seal(PLAN, encode_plan(p), identity)


def open_plan(data: bytes) -> Plan:
    """Verify and decode a signed plan: MESSAGE_TOO_LARGE, MALFORMED_MESSAGE, BAD_SIGNATURE,
    UNKNOWN_MESSAGE_KIND, UNSUPPORTED_VERSION or PLAN_SIGNER_MISMATCH on any defect."""
    env = open_envelope(data, limit=MAX_GOSSIP_MESSAGE)
    if env.kind != PLAN:
        raise DecodeError(f"expected a plan, got {env.kind!r}", code="UNKNOWN_MESSAGE_KIND")
    plan = decode_plan(env.payload)
    signer = node_id_for_key(env.public_key)
    if signer != plan.coordinator:
        raise PlanSignerMismatch(f"plan names coordinator {plan.coordinator} but is signed by {signer}")
    return plan


def _row(kinds: str, make: Callable[..., T]) -> Callable[[Any, str], T]:
    """An array item reader: a row of ``len(kinds)`` fields checked by ``_typed``, built with ``make``."""
    def item(row: Any, where: str) -> T:
        if not isinstance(row, list) or len(row) != len(kinds):
            raise DecodeError(f"{where}: expected an array of {len(kinds)} fields")
        return make(*_typed(row, kinds, where))
    return item


def _typed(row: list[Any], kinds: str, where: str) -> list[Any]:
    """Check each field: t text, i non-negative integer, f finite non-negative number, o optional text."""
    out = []
    for j, (v, k) in enumerate(zip(row, kinds, strict=True)):
        if k == "f" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v) if -(2**63) < v < 2**63 else math.inf  # a bignum would overflow float()
        ok = {"t": isinstance(v, str) and 0 < len(v) <= 256,
              "o": v is None or (isinstance(v, str) and 0 < len(v) <= 256),
              "i": isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
              "f": isinstance(v, float) and 0 <= v < math.inf}[k]
        if not ok:
            raise DecodeError(f"{where}[{j}]: bad value {str(v)[:40]}")
        out.append(v)
    return out


def decode_plan(payload: bytes) -> Plan:
    r = versioned(payload, "plan", PLAN_VERSION)
    assignments = r.array("assignments", _row("tiiiffo", Assignment), limit=MAX_STAGES, required=True)
    nodes = r.array("nodes", _row("tfifff", NodeSummary), limit=MAX_STAGES, required=True)
    total = r.integer("total_layers")
    check_spans(assignments, total, error=DecodeError, what="plan.assignments")
    term, epoch = r.integer("term"), r.integer("epoch")
    if term < 1 or epoch < 1:
        raise DecodeError("plan.term and plan.epoch start at 1")
    reassigned = r.array("reassigned", lambda x, where: _typed([x], "t", where)[0], limit=MAX_STAGES)
    compute = r.text("compute_dtype", "float32")
    if compute not in COMPUTE_DTYPES:
        raise DecodeError(f"plan.compute_dtype: {compute!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    objective = r.text("objective", "")
    if objective not in ("", "latency", "throughput"):
        raise DecodeError(f"plan.objective: {objective!r} is not latency or throughput")
    replicas = r.array("replicas", lambda x, where: _pipeline(x, where, total), limit=MAX_REPLICAS)
    seen = [a.node for p in (assignments, *replicas) for a in p]
    if len(seen) != len(set(seen)):
        raise DecodeError("plan.replicas: a peer is in two pipelines")
    return Plan(
        model_id=r.text("model_id"), revision=r.text("revision"), term=term, epoch=epoch,
        coordinator=r.text("coordinator"), total_layers=total, assignments=assignments, nodes=nodes,
        bottleneck_s=_typed([r.number("bottleneck_s")], "f", "plan.bottleneck_s")[0],
        communication_overhead_s=_typed([r.number("communication_overhead_s", 0.0)], "f", "plan.overhead")[0],
        request_id=r.text("request_id", ""), reason=r.text("reason", ""), reassigned=reassigned,
        issued_at=r.number("issued_at", 0.0), compute_dtype=compute, objective=objective,
        why=scalar_map(r.raw("why", {}), "plan.why"), replicas=replicas,
    )


def _pipeline(raw: Any, where: str, total: int) -> tuple[Assignment, ...]:
    """One replica pipeline: assignment rows covering every layer once."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_STAGES:
        raise DecodeError(f"{where}: expected a list of 1 to {MAX_STAGES} assignments")
    out = tuple(_row("tiiiffo", Assignment)(row, f"{where}[{i}]") for i, row in enumerate(raw))
    check_spans(out, total, error=DecodeError, what=where)
    return out


# ---- what this peer believes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    plan: Plan
    envelope: bytes  # as signed by the coordinator, for republishing and for anyone to verify


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    code: str  # ACCEPTED, NOT_COORDINATOR, STALE_TERM, STALE_EPOCH, DUPLICATE, PENDING
    previous: Plan | None = None


@dataclass
class PlanBook:
    current: dict[str, Held] = field(default_factory=dict)  # model id -> plan
    # (model, coordinator) -> a plan of a term this peer does not follow yet
    pending: dict[tuple[str, str], Held] = field(default_factory=dict)
    max_epoch: dict[str, int] = field(default_factory=dict)  # highest epoch accepted per model, any term

    def offer(self, held: Held, leadership: Leadership) -> Verdict:
        """Take a verified plan (``open_plan``) if it comes from the coordinator this peer follows and is
        newer than the one held for its model."""
        plan = held.plan
        if plan.term > leadership.term or (plan.term == leadership.term and leadership.coordinator is None):
            key = (plan.model_id, plan.coordinator)  # per claimant: a rogue's plan cannot push out the real one
            pend = self.pending.get(key)
            if pend is None or pend.plan.version < plan.version:
                self.pending.pop(key, None)
                if len(self.pending) >= MAX_PENDING:  # bounded: unknown model ids cannot fill memory
                    del self.pending[next(iter(self.pending))]
                self.pending[key] = held
            return Verdict(False, "PENDING")
        if plan.term < leadership.term:
            return Verdict(False, "STALE_TERM")
        if plan.coordinator != leadership.coordinator:
            return Verdict(False, "NOT_COORDINATOR")
        cur = self.current.get(plan.model_id)
        # Two peers alone at start may each elect themselves in the same term and plan; once they follow one
        # coordinator, its plan replaces the other's whatever the epochs (else both keep their own forever).
        if cur is not None and cur.plan.coordinator == plan.coordinator and cur.plan.version >= plan.version:
            return Verdict(False, "DUPLICATE" if cur.plan.version == plan.version else "STALE_EPOCH")
        self.current[plan.model_id] = held
        self.max_epoch[plan.model_id] = max(self.max_epoch.get(plan.model_id, 0), plan.epoch)
        return Verdict(True, "ACCEPTED", None if cur is None else cur.plan)

    def retry(self, leadership: Leadership) -> list[tuple[Plan, Verdict]]:
        """Offer again the plans kept aside, now that the leadership changed; those of a term now
        decided for another coordinator are dropped."""
        out = []
        for key, held in list(self.pending.items()):
            plan = held.plan
            if plan.term < leadership.term or (plan.term == leadership.term and leadership.coordinator is not None):
                del self.pending[key]
                if plan.coordinator == leadership.coordinator and plan.term == leadership.term:
                    out.append((plan, self.offer(held, leadership)))
        return out

    def next_epoch(self, model: str) -> int:
        return self.max_epoch.get(model, 0) + 1

"""Distinct id types so a peer id is never passed where a model id is expected; the one shape of a layer
range assigned to a node (``Span``) with its one validator (``check_spans``), and the one name of a ready
stage (``StageKey``). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NewType

from mesh.errors import DecodeError, MeshError, PeerError

#: A libp2p peer id in its base58 text form (``12D3KooW...`` for ed25519 keys).
NodeId = NewType("NodeId", str)
#: A model identifier as users type it (``smollm2-135m-instruct``, ``org/repo``).
ModelId = NewType("ModelId", str)


@dataclass(frozen=True)
class ModelRef:
    """A model and, optionally, one revision of it: ``"id"`` or ``"id@revision"``. The one place that text
    is built (``str``) and read (``of``); gossip advertises installed models as ``id@revision``."""

    model: str
    revision: str | None = None

    @classmethod
    def of(cls, text: str) -> ModelRef:
        """``"id"`` → (id, None); ``"id@revision"`` → (id, revision). Never raises: validation (an empty id,
        a length limit) is the caller's, which knows the error to give."""
        model, _, revision = text.partition("@")
        return cls(model, revision or None)

    def __str__(self) -> str:
        return f"{self.model}@{self.revision}" if self.revision else self.model

    def __iter__(self) -> Iterator[str | None]:  # model, revision = ModelRef.of(text)
        return iter((self.model, self.revision))

    def matches(self, entry: str) -> bool:
        """Whether ``entry`` (an ``id@revision``) is this model, at this revision when one is given."""
        other = ModelRef.of(entry)
        return other.model == self.model and (self.revision is None or other.revision == self.revision)


def keep_ref(specs: list[str], spec: str) -> list[str]:
    """``specs`` with ``spec`` replacing any spec of the same model id (one plan per model: two revisions of
    one id would take turns replacing each other's plan)."""
    model = ModelRef.of(spec).model
    return [s for s in specs if ModelRef.of(s).model != model] + [spec]


@dataclass(frozen=True, slots=True)
class Span:
    """Layers ``[start, end)`` of a model, assigned to ``node``: one stage of a pipeline. The plan's
    ``Assignment``, the planner's ``Stage`` (both add costs) and a route's hops (this type) are spans;
    ``check_spans`` is the one check that a sequence of them is a pipeline."""

    node: str
    start: int  # half-open [start, end)
    end: int

    def __iter__(self) -> Iterator[str | int]:  # node, start, end = span (subclasses too: only these three)
        return iter((self.node, self.start, self.end))

    @property
    def span(self) -> Span:
        """Only the node and range (a plain ``Span``, comparable across Assignment, Stage and a route's hops)."""
        return self if type(self) is Span else Span(self.node, self.start, self.end)


def check_spans(spans: Sequence[Span], total: int | None = None, *, error: type[MeshError] = PeerError,
                code: str | None = None, what: str = "stages") -> None:
    """That ``spans`` is a pipeline: at least one span, every range non-empty, contiguous from layer 0
    (no gap, no overlap), ending at ``total`` when given, and no node twice. Otherwise raises
    ``error(message, code=code)`` (``code`` None keeps the class's own), its message naming ``what`` and
    the offending index, so each caller keeps its error code: DecodeError for a plan, FrameError for a
    route, PeerError with INVALID_PLAN_INPUT for planner input."""

    def fail(message: str) -> MeshError:
        return error(message, code=code)

    if not spans:
        raise fail(f"{what}: expected at least one stage")
    at = 0
    for i, s in enumerate(spans):
        if s.end <= s.start:
            problem = "is empty"
        elif s.start != at:
            problem = ("does not start at layer 0" if i == 0 else
                       f"leaves a gap after layer {at}" if s.start > at else
                       f"overlaps the range before it, which ends at {at}")
        else:
            at = s.end
            continue
        raise fail(f"{what}[{i}]: range [{s.start}, {s.end}) {problem}; ranges must be non-empty and "
                   "contiguous from layer 0")
    if total is not None and at != total:
        raise fail(f"{what} cover {at} layers, not {total}")
    seen: set[str] = set()
    for i, s in enumerate(spans):
        if s.node in seen:
            raise fail(f"{what}[{i}]: node {s.node[:64]!r} appears twice")
        seen.add(s.node)


@dataclass(frozen=True, slots=True)
class StageKey:
    """How a ready stage is named in gossip (``NodeInfo.stages``): ``model@revision:start:end:dtype``.
    The one place that text is built (``str``) and read (``of``); the format is the wire's, unchanged."""

    ref: ModelRef
    start: int
    end: int
    compute: str = "float32"

    @classmethod
    def of(cls, text: str) -> StageKey:
        """The key ``str`` gave; DecodeError (MALFORMED_MESSAGE) for any other text. The model ref may hold
        ``:`` and ``@`` (read from the right: the last three fields are numbers and a dtype name)."""
        parts = text.rsplit(":", 3)
        if len(parts) != 4:
            raise DecodeError(f"stage key {text[:80]!r}: expected model@revision:start:end:dtype")
        ref, start, end, compute = parts
        if not (ref and start.isdigit() and start.isascii() and end.isdigit() and end.isascii() and compute
                and str(int(start)) == start and str(int(end)) == end):
            raise DecodeError(f"stage key {text[:80]!r}: expected model@revision:start:end:dtype")
        return cls(ModelRef.of(ref), int(start), int(end), compute)

    @classmethod
    def make(cls, model: str, revision: str | None, start: int, end: int, compute: str = "float32") -> StageKey:
        """The key of a stage of ``model`` at ``revision`` (an empty revision is none, as in ``ModelRef``)."""
        return cls(ModelRef(model, revision or None), start, end, compute)

    def __str__(self) -> str:
        return f"{self.ref}:{self.start}:{self.end}:{self.compute}"

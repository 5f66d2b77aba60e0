"""Distinct id types so a peer id is never passed where a model id is expected."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NewType

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

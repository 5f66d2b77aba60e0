"""Choosing the next token from the last stage's logits: greedy, temperature, top-k, top-p, seed.

Sampling is a pure function of (logits, parameters, position): the random draw for the token at
position ``p`` comes from a generator seeded with ``(seed, p)``. A generation that is replayed after a
failover (same prefix, same seed) therefore draws the same tokens again, and a seeded request gives the
same text on any route through the mesh.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from mesh.errors import PeerError

MAX_TOP_K = 1 << 20


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0
    logits: bool = False  # the last stage also returns the last position's logits

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise PeerError(f"temperature must be in [0, 100], got {self.temperature}", code="INVALID_PARAMETER")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise PeerError(f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}", code="INVALID_PARAMETER")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise PeerError(f"top_p must be in (0, 1], got {self.top_p}", code="INVALID_PARAMETER")
        if not 0 <= self.seed < 2**63:
            raise PeerError(f"seed must be in [0, 2^63), got {self.seed}", code="INVALID_PARAMETER")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_wire(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed,
                "logits": self.logits}

    @classmethod
    def from_wire(cls, raw: Any) -> Sampling:
        """Parameters from a frame header; anything malformed is a PeerError (``BAD_FRAME``)."""
        if not isinstance(raw, dict):
            raise PeerError("sampling: expected a map", code="BAD_FRAME")
        try:
            temperature, top_p = raw.get("temperature", 0.0), raw.get("top_p", 1.0)
            top_k, seed, logits = raw.get("top_k", 0), raw.get("seed", 0), raw.get("logits", False)
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (temperature, top_p)):
                raise PeerError("sampling: temperature and top_p must be numbers", code="BAD_FRAME")
            if type(top_k) is not int or type(seed) is not int or type(logits) is not bool:
                raise PeerError("sampling: top_k and seed must be integers, logits a boolean", code="BAD_FRAME")
            return cls(float(temperature), top_k, float(top_p), seed, logits)
        except PeerError as err:
            raise PeerError(str(err), code="BAD_FRAME") from None


def _generator(seed: int, position: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample(logits: torch.Tensor, s: Sampling, position: int) -> int:
    """The token for ``position`` from a 1-D logits vector."""
    if s.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / s.temperature
    if 0 < s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest set reaching top_p; a set whose mass is top_p up to float32 rounding reaches it
        # (a sum of 0.9 computes as 0.8999999 with some CPUs' softmax kernels).
        drop = probs.cumsum(-1) - probs >= s.top_p - 1e-6
        scores = scores.scatter(0, order[drop], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=_generator(s.seed, position)))

"""One model from the local store in this process: no mesh, no peer. The single-process reference that users
and tests compare the mesh with (``meshnode generate --local``): the same ``Stage`` code over every layer,
the same kernels and compute dtype, the same step structure as the driver (the prompt as one step, then one
token per step) and the same sampling, so a mesh's greedy tokens must equal these.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.sampling import Sampling, sample
from inference.stage import Stage, dtype_of, verified_loader
from inference.tokenizer import load_tokenizer, stop_ids
from mesh.errors import LocalError
from storage.formats import plan_compute
from storage.store import Store


@dataclass
class Result:
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False  # ended by a stop token (which is not in token_ids)


class Session:
    """One sequence's KV cache: ``feed`` runs the next tokens and returns the last position's logits."""

    def __init__(self, stage: Stage) -> None:
        self.stage, self.cache, self.position = stage, stage.new_cache(), 0

    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.int64)
        positions = torch.arange(self.position, self.position + x.shape[1]).unsqueeze(0)
        logits = self.stage.forward(x, positions, self.cache)
        self.position += x.shape[1]
        return logits[0, -1].float()  # [V]


class LocalModel:
    def __init__(self, store: Store, model: str, *, revision: str | None = None,
                 compute_dtype: str | None = None) -> None:
        t0 = time.perf_counter()
        self.manifest, _ = store.manifest(model, revision)
        self.folder = store.registry.model_dir(model, self.manifest.revision)
        config = json.loads((self.folder / "config.json").read_text())
        if compute_dtype is None:  # what a plan over this one machine would choose
            from mesh.hardware import bf16_features

            compute_dtype = plan_compute(self.manifest.formats, [bf16_features()])
        self.compute = compute_dtype
        with torch.no_grad():
            self.stage = Stage(config, self.manifest.shards, 0, len(self.manifest.shards),
                               verified_loader(store.registry.shard_dir), dtype=dtype_of(self.compute))
        self.tokenizer = load_tokenizer(self.folder)
        self.stop_ids = self.tokenizer.meshnode_stop_ids if self.tokenizer is not None else stop_ids(self.folder)
        self.load_s = time.perf_counter() - t0

    def session(self) -> Session:
        return Session(self.stage)

    def generate(self, prompt: Sequence[int], max_tokens: int, *, sampling: Sampling | None = None,
                 stop: bool = True) -> Result:
        """Tokens after ``prompt`` (greedy unless ``sampling`` says otherwise); ends at a stop token when
        ``stop``. The draw for each position is seeded as on the mesh (``inference.sampling``)."""
        if not prompt:
            raise LocalError("the prompt has no tokens", code="INVALID_PARAMETER")
        sampling = sampling or Sampling()
        session, out, stopped = self.session(), [], False
        ids = list(prompt)
        t0 = time.perf_counter()
        first = t0
        with torch.no_grad():
            while len(out) < max_tokens:
                logits = session.feed(ids)
                token = sample(logits, sampling, session.position)
                if not out and not stopped:
                    first = time.perf_counter()
                if stop and token in self.stop_ids:
                    stopped = True
                    break
                out.append(token)
                ids = [token]
        end = time.perf_counter()
        decode = end - first
        steps = len(out) - 1 + (1 if stopped else 0)
        return Result(out, len(prompt), {
            "ttft_ms": round((first - t0) * 1000, 3), "total_ms": round((end - t0) * 1000, 3),
            "decode_tokens_per_s": round(steps / decode, 3) if steps > 0 and decode > 0 else None,
            "load_s": round(self.load_s, 3), "compute_dtype": self.compute,
            "weights": "+".join(self.manifest.formats)}, stopped)

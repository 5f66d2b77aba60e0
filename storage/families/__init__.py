"""Model family adapters: one module per family, each saying how its tensors group into layers, how a stage
is built and run from its shards, and how its GGUF files map onto transformers' names (``base.Family``).
Adding a family is adding a module here and listing it in ``FAMILIES``; nothing else names a model type."""

from __future__ import annotations

from typing import Any

from storage.families.base import Architecture, Family, UnsupportedArchitecture
from storage.families.gemma2 import Gemma2
from storage.families.gemma3 import Gemma3
from storage.families.gpt2 import Gpt2
from storage.families.llama import Llama
from storage.families.mistral import Mistral
from storage.families.phi3 import Phi3
from storage.families.qwen2 import Qwen2
from storage.families.qwen3 import Qwen3
from storage.families.qwen_moe import QwenMoe

FAMILIES: tuple[Family, ...] = (Llama(), Mistral(), Qwen2(), Qwen3(), Gemma2(), Gemma3(), Phi3(), QwenMoe(), Gpt2())
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
BY_GGUF_ARCH = {a: f for f in FAMILIES for a in f.gguf_archs}
SUPPORTED = tuple(sorted(BY_MODEL_TYPE))

__all__ = ["FAMILIES", "SUPPORTED", "Architecture", "Family", "UnsupportedArchitecture", "by_name", "family_of"]


def family_of(config: dict[str, Any]) -> Family:
    """The adapter of a transformers config (``model_type``); UNSUPPORTED_ARCHITECTURE names those there are."""
    model_type = config.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    return BY_MODEL_TYPE[model_type]


def by_name(name: str) -> Family:
    """The adapter called ``name`` (an ``Architecture.family``)."""
    return next(f for f in FAMILIES if f.name == name)

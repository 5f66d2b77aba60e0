"""Mistral: the Llama layout with a sliding window over every layer (``sliding_window``; None: full). Its
blocks run directly only without a window; a windowed stage runs transformers' own layers and keeps a
sliding cache (``DynamicCache`` from the stage's config)."""

from __future__ import annotations

from typing import ClassVar

from storage.families.base import Family


class Mistral(Family):
    name = "mistral"
    model_types = ("mistral",)
    causal_lm: ClassVar[dict[str, str]] = {"mistral": "MistralForCausalLM"}
    gguf_archs = ("mistral",)
    llama_blocks = True

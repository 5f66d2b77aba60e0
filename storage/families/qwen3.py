"""Qwen 3 (dense): the Llama layout with an RMS norm on each head's queries and keys (``q_norm``, ``k_norm``
[D]) and an explicit ``head_dim``; run by transformers' own layers."""

from __future__ import annotations

from typing import ClassVar

from storage.families.base import Family


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    causal_lm: ClassVar[dict[str, str]] = {"qwen3": "Qwen3ForCausalLM"}
    gguf_archs = ("qwen3",)
    gguf_blocks: ClassVar[dict[str, str]] = {**Family.gguf_blocks, "attn_q_norm": "self_attn.q_norm",
                                             "attn_k_norm": "self_attn.k_norm"}

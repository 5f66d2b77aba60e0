"""Gemma 3 (text, ``gemma3_text``): Gemma 2's layout and scaling, plus q/k norms, local (sliding) and global
layers by ``sliding_window_pattern`` with their own rope (local ``rope_local_base_freq``, global scaled), and
sdpa-capable attention (no attention soft-capping). GGUF files say ``gemma3``; transformers reads them as
``gemma3_text``."""

from __future__ import annotations

from typing import ClassVar

from storage.families.base import Family
from storage.families.gemma2 import Gemma2


class Gemma3(Gemma2):
    name = "gemma3"
    model_types = ("gemma3_text",)
    causal_lm: ClassVar[dict[str, str]] = {"gemma3_text": "Gemma3ForCausalLM"}
    gguf_archs = ("gemma3",)
    gguf_blocks: ClassVar[dict[str, str]] = {**Gemma2.gguf_blocks, "attn_q_norm": "self_attn.q_norm",
                                             "attn_k_norm": "self_attn.k_norm"}
    gguf_globals: ClassVar[dict[str, str]] = Family.gguf_globals

"""Llama (1, 2, 3.x with its rope scaling; SmolLM): the default layout of ``base.Family``; its blocks (as Mistral's
and Qwen2's) are Llama's arithmetic, which ``inference.blocks`` runs directly when every layer attends fully."""

from __future__ import annotations

from typing import Any, ClassVar

from storage.families.base import Family


class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    causal_lm: ClassVar[dict[str, str]] = {"llama": "LlamaForCausalLM"}
    gguf_archs = ("llama",)
    llama_blocks = True

    def gguf_permuted_heads(self, gguf_arch: str, name: str, metadata: dict[str, Any]) -> int | None:
        # transformers' LlamaTensorProcessor: llama.cpp interleaved each head's rotary halves in q and k
        if gguf_arch != "llama" or not (".attn_q." in name or ".attn_k." in name):
            return None
        heads, kv_heads = (metadata.get(f"llama.attention.head_count{s}") for s in ("", "_kv"))
        if heads is None or kv_heads is None:
            return None
        return heads if ".attn_q." in name else kv_heads

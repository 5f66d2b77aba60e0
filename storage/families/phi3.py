"""Phi-3 / 3.5 / 4-mini: the Llama layout with q, k and v fused in one matrix (``qkv_proj`` [(n + 2m) D, H])
and gate and up fused (``gate_up_proj`` [2I, H]), as its checkpoints store them: each is one ``nn.Linear``,
quantized as a whole."""

from __future__ import annotations

from typing import ClassVar

from storage.families.base import Family


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    causal_lm: ClassVar[dict[str, str]] = {"phi3": "Phi3ForCausalLM"}
    gguf_archs = ("phi3",)
    gguf_blocks: ClassVar[dict[str, str]] = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}

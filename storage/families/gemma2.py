"""Gemma 2: embeddings scaled by sqrt(H) on the first stage only; RMS norms of (1 + w) before and after both
attention and MLP (the family's own norm modules, also the final one); attention logits soft-capped, which
sdpa cannot do (transformers marks the model ``_supports_sdpa = False``: stages run eager attention); every
other layer a sliding window; the head's logits soft-capped too: logits = cap * tanh(logits / cap).
GGUF files store the norms as 1 + w (transformers subtracts 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from storage.families.base import Family

if TYPE_CHECKING:
    import torch


class Gemma2(Family):
    name = "gemma2"
    model_types = ("gemma2",)
    causal_lm: ClassVar[dict[str, str]] = {"gemma2": "Gemma2ForCausalLM"}
    gguf_archs = ("gemma2",)
    gguf_blocks: ClassVar[dict[str, str]] = {
        **Family.gguf_blocks, "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

    def architecture(self, config: dict[str, Any]) -> Any:
        return super().architecture({"tie_word_embeddings": True, **config})  # Gemma ties by default

    def embed_scale(self, cfg: Any) -> float | None:
        return cfg.hidden_size ** 0.5

    def logits(self, cfg: Any, x: torch.Tensor) -> torch.Tensor:
        import torch

        cap = getattr(cfg, "final_logit_softcapping", None)
        return x if cap is None else torch.tanh(x / cap) * cap

    def gguf_offset(self, name: str) -> float:
        return -1.0 if name.endswith("norm.weight") else 0.0

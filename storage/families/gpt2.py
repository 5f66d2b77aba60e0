"""GPT-2: learned absolute positions (``wpe`` [P, H]) added to the token embeddings (``wte`` [V, H]) on the
first stage only (later stages add zero), LayerNorm with bias (``ln_f``), blocks ``h.N`` with Conv1D
matrices (stored [in, out], so never quantized), the head tied to ``wte``."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from storage.families.base import Architecture, Family, UnsupportedArchitecture


class _ZeroPositions(nn.Module):
    """Stands in for ``wpe`` on the blocks of every stage (the first stage adds the positions itself)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden, self.dtype = hidden, dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*position_ids.shape, self.hidden), dtype=self.dtype)  # no upcast of bf16 stages


class Gpt2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    causal_lm: ClassVar[dict[str, str]] = {"gpt2": "GPT2LMHeadModel"}
    patterns = ((re.compile(r"(?:transformer\.)?w[tp]e\."), "embedding"),
                (re.compile(r"(?:transformer\.)?h\.(\d+)\."), "block"),
                (re.compile(r"(?:transformer\.)?ln_f\."), "norm"), (re.compile(r"lm_head\."), "head"))
    embedding_weights = ("transformer.wte.weight", "wte.weight")
    quantized_weights = False
    blocks_attr = "h"

    def architecture(self, config: dict[str, Any]) -> Architecture:
        hidden, heads = int(config["n_embd"]), int(config["n_head"])
        return Architecture(self.name, config["model_type"], hidden, int(config["n_layer"]), heads, heads,
                            hidden // heads, int(config["vocab_size"]), bool(config.get("tie_word_embeddings", True)))

    def embedding_names(self) -> tuple[str, ...]:
        return ("wte.weight",)

    def stage_config(self, cfg: Any, numbers: list[int]) -> None:
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitecture("GPT-2 models that scale attention by the layer index are not supported")
        cfg.n_layer = len(numbers)

    def strip(self, body: nn.Module, cfg: Any) -> tuple[nn.Module | None, nn.Module]:
        norm = body.ln_f
        body.wte = None
        body.wpe = _ZeroPositions(cfg.n_embd, cfg.dtype)
        body.ln_f = nn.Identity()
        return norm, body.h

    def norm_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("ln_f."): v for k, v in tensors.items() if k.startswith("ln_f.")}

    def embedding(self, tensors: dict[str, torch.Tensor], formats: dict[str, str], cfg: Any) -> nn.Module:
        return _Positions(tensors["wte.weight"].to(cfg.dtype), tensors["wpe.weight"].to(cfg.dtype))


class _Positions(nn.Module):
    """GPT-2's first stage: ids [B, T] -> wte[ids] + wpe[positions] [B, T, H]."""

    def __init__(self, wte: torch.Tensor, wpe: torch.Tensor) -> None:
        super().__init__()
        self.wte = nn.Embedding.from_pretrained(wte, freeze=True)
        self.wpe = nn.Embedding.from_pretrained(wpe, freeze=True)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(positions)

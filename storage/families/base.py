"""What every model family adapter says, and the defaults: a decoder-only transformer laid out as transformers'
Llama is (``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``). A family overrides only
where it differs; the stage (``inference.stage``), the layer metadata (``storage.metadata``) and the GGUF
importer (``storage.gguf``) ask the adapter and hold no family branch of their own.

A stage for blocks ``numbers`` of a model with hidden size H is the family's own base model (``AutoModel``)
built on the meta device with ``len(numbers)`` blocks, renumbered from 0:

    first stage:   ids [B, T]  -> embed (the family's scale, if any)           -> h [B, T, H]
    every stage:   h -> its blocks (attention of each block's own layer type)  -> h
    norm stage:    h -> the family's final norm module                         -> h
    head stage:    h[:, -1:] -> lm_head (or the tied embedding) -> logits()    -> [B, 1, V]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from inference.qlinear import QuantEmbedding
from mesh.errors import LocalError
from storage.formats import MIN, QUANTIZED, SCALE


class UnsupportedArchitecture(LocalError):
    code = "UNSUPPORTED_ARCHITECTURE"


@dataclass(frozen=True, slots=True)
class Architecture:
    family: str  # the adapter's name: "llama", "gemma2", "qwen_moe", "gpt2", ...
    model_type: str  # transformers' model_type
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0  # experts per MoE block (0: a dense model)
    active_experts: int = 0  # experts each token runs through


#: Layer kinds in pipeline order.
KINDS = ("embedding", "block", "norm", "head")


class Family:
    """The decoder-only default (the Llama layout). Subclasses set ``name``, ``model_types`` and
    ``causal_lm`` and override what their family does differently."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    causal_lm: ClassVar[dict[str, str]] = {}  # model_type -> the transformers class of the whole model
    # -- layers: (regex, kind) in match order; a block pattern's group 1 is its number
    patterns: ClassVar[tuple[tuple[re.Pattern[str], str], ...]] = (
        (re.compile(r"model\.embed_tokens\."), "embedding"), (re.compile(r"model\.layers\.(\d+)\."), "block"),
        (re.compile(r"model\.norm\."), "norm"), (re.compile(r"lm_head\."), "head"))
    embedding_weights: ClassVar[tuple[str, ...]] = ("model.embed_tokens.weight",)
    #: The weight matrices ``--weights int4`` keeps in int8 (llama.cpp's 4-bit mixes keep these 8-bit).
    eight_bit: ClassVar[frozenset[str]] = frozenset({"model.embed_tokens.weight", "lm_head.weight"})
    quantized_weights: ClassVar[bool] = True  # whether int8/int4 shards can run at all
    blocks_attr: ClassVar[str] = "layers"  # the base model's list of blocks
    llama_blocks: ClassVar[bool] = False  # its blocks are Llama's arithmetic (``runs_directly``)
    #: GGUF: ``general.architecture`` values of this family's files, and tensor names -> transformers names
    gguf_archs: ClassVar[tuple[str, ...]] = ()
    gguf_globals: ClassVar[dict[str, str]] = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                                              "output": "lm_head"}
    gguf_blocks: ClassVar[dict[str, str]] = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}
    gguf_ignored: ClassVar[tuple[str, ...]] = ("rope_freqs.weight",)  # llama 3's rope factors: from the config

    # ---- metadata ---------------------------------------------------------------------------------

    def architecture(self, config: dict[str, Any]) -> Architecture:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return Architecture(self.name, config["model_type"], hidden, int(config["num_hidden_layers"]), heads,
                            int(config.get("num_key_value_heads") or heads),
                            int(config.get("head_dim") or hidden // heads), int(config["vocab_size"]),
                            bool(config.get("tie_word_embeddings", False)))

    def active_fraction(self, arch: Architecture, tensor: str) -> float:
        """The share of a block's tensor that one token's compute touches (1 but for MoE experts)."""
        return 1.0

    def quantizable(self, name: str) -> bool:
        """Whether a 2-D ``*weight`` may be stored int8/int4 (it must be an ``nn.Linear`` or embedding)."""
        return True

    # ---- stages -----------------------------------------------------------------------------------

    def stage_config(self, cfg: Any, numbers: list[int]) -> None:
        """Shrink a whole model's config to the blocks ``numbers`` (renumbered from 0), in place: each kept
        block keeps its own layer type (sliding or full attention), not the first blocks' types."""
        types = getattr(cfg, "layer_types", None)
        cfg.num_hidden_layers = len(numbers)
        if types is not None:
            cfg.layer_types = [types[n] for n in numbers] if numbers else types[:1]

    def attention(self, model_class: type, low_precision: str, dtype: torch.dtype) -> str:
        """The attention implementation a stage runs: the family's own when sdpa would be wrong for it
        (Gemma 2's soft-capping is eager-only), else sdpa (bf16/fp16: sdpa on fp32 copies)."""
        if not getattr(model_class, "_supports_sdpa", True):
            return "eager"
        return "sdpa" if dtype == torch.float32 else low_precision

    def runs_directly(self, cfg: Any) -> bool:
        """Whether ``inference.blocks`` may run this config's blocks: a family whose blocks are Llama's
        arithmetic (``llama_blocks``), with no sliding window anywhere (what ``inference.blocks`` implements)."""
        if not self.llama_blocks:
            return False
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
            return False
        return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))

    def strip(self, body: nn.Module, cfg: Any) -> tuple[nn.Module | None, nn.Module]:
        """Take the base model apart: (its final norm module, its list of blocks). What a stage does not run
        is removed; buffers the meta device left empty (rotary frequencies) are rebuilt on the CPU."""
        norm = body.norm
        body.embed_tokens = None
        body.norm = nn.Identity()
        if hasattr(body, "rotary_emb"):
            body.rotary_emb = type(body.rotary_emb)(config=cfg)
        return norm, getattr(body, self.blocks_attr)

    def norm_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("norm."): v for k, v in tensors.items() if k.startswith("norm.")}

    def embed_scale(self, cfg: Any) -> float | None:
        """What the first stage multiplies embeddings by (Gemma: sqrt(H)); later stages never do."""
        return None

    def embedding(self, tensors: dict[str, torch.Tensor], formats: dict[str, str], cfg: Any) -> nn.Module:
        """The first stage's embedding: ids [B, T], positions [B, T] -> [B, T, H]."""
        name = self.embedding_names()[0]
        fmt = formats.get(name, "float32")
        if fmt in QUANTIZED:
            table: nn.Module = QuantEmbedding(fmt, tensors[name], tensors[name + SCALE], tensors.get(name + MIN),
                                              cfg.dtype)
        else:
            table = nn.Embedding.from_pretrained(tensors[name].to(cfg.dtype), freeze=True,
                                                 padding_idx=cfg.pad_token_id)
        return TokenEmbedding(table, self.embed_scale(cfg))

    def embedding_names(self) -> tuple[str, ...]:
        return tuple(n.removeprefix("model.") for n in self.embedding_weights)

    def head_names(self) -> tuple[str, ...]:
        """The head's weight, then the tied embedding's."""
        return ("lm_head.weight", *self.embedding_names())

    def logits(self, cfg: Any, x: torch.Tensor) -> torch.Tensor:
        """The last stage's logits from the head's output (Gemma 2: soft-capped)."""
        return x

    def load_blocks(self, blocks: nn.Module, local: dict[str, torch.Tensor], formats: dict[str, str],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Install what the generic loader cannot (MoE experts), consuming those tensors; the rest is
        returned for the quantized-linear swap and ``load_state_dict``."""
        return local

    def run(self, body: nn.Module, h: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """A stage's blocks on hidden states h [B, T, H] through the family's own base model."""
        return body(inputs_embeds=h, position_ids=positions, cache=cache, use_cache=True).last_hidden_state

    # ---- GGUF -------------------------------------------------------------------------------------

    def gguf_name(self, name: str) -> str | None:
        """The transformers name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight");
        None when transformers has no parameter for it."""
        base, dot, suffix = name.rpartition(".")
        if not dot or suffix not in ("weight", "bias"):
            return None
        if base in self.gguf_globals:
            return f"{self.gguf_globals[base]}.{suffix}"
        if (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base)) and m[2] in self.gguf_blocks:
            return f"model.layers.{m[1]}.{self.gguf_blocks[m[2]]}.{suffix}"
        return None

    def gguf_parts(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        """What a GGUF tensor of HF-order ``shape`` holds in the checkpoint layout: (transformers name, shape) of
        each part, the parts being equal consecutive slices of its data, each of whole rows (a part's last
        dimension is the tensor's: quantized blocks are never cut). The default: a vector or matrix is one part,
        named by ``gguf_name``; None when transformers has no parameter for it, or it has more dimensions."""
        hf = self.gguf_name(name)
        return None if hf is None or len(shape) > 2 else [(hf, shape)]

    def gguf_config(self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Set in ``config`` (transformers' config of a GGUF file) what transformers left at its defaults though
        the file's tensors (transformers name -> shape) say it; a note for people per change."""
        return []

    def gguf_permuted_heads(self, gguf_arch: str, name: str, metadata: dict[str, Any]) -> int | None:
        """Heads of the rotary row permutation llama.cpp applied to this tensor (transformers undoes it for
        ``llama`` files only), or None."""
        return None

    def gguf_offset(self, name: str) -> float:
        """What transformers adds to a GGUF tensor on load (Gemma's norms are stored as 1 + w: -1)."""
        return 0.0


class TokenEmbedding(nn.Module):
    """ids [B, T] -> table[ids] [B, T, H], times the family's scale in the compute dtype (as Gemma's
    ``ScaledWordEmbedding``: the scale rounded to the weights' dtype first)."""

    def __init__(self, table: nn.Module, scale: float | None) -> None:
        super().__init__()
        self.table, self.scale = table, scale

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.table(ids)
        return h if self.scale is None else h * torch.tensor(self.scale).to(h.dtype)

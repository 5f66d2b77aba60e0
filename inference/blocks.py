"""The Llama family's decoder blocks run directly: the same weights and the same arithmetic as transformers'
``LlamaDecoderLayer`` (llama, mistral and qwen2 without sliding windows: ``Family.runs_directly``), without
its per-layer Python machinery (module wrappers, deprecation shims, mask construction per step), which cost
more than the int8 matmuls themselves on a decode step of SmolLM2 here.

One block, for hidden states h [B, T, H], heads n, kv heads m, head size D, intermediate size I:

    x = rms_norm(h) * w_in                                   [B, T, H]
    q, k, v = x Wq, x Wk, x Wv                               [B, n|m, T, D]   (one fused matmul when quantized)
    q, k = q cos + rot(q) sin, k cos + rot(k) sin            rotary, cos/sin from the family's rotary module
    k, v = cat(cache, k), cat(cache, v)                      [B, m, past+T, D]
    h = h + sdpa(q, k, v) Wo                                 causal; GQA inside sdpa
    x = rms_norm(h) * w_post
    h = h + (act(x Wg) * x Wu) Wd                            [B, T, H]  (gate and up fused when quantized)

Every step is transformers' own arithmetic (``rms_norm`` is ``LlamaRMSNorm`` bit for bit in every dtype, the
attention call is transformers' ``sdpa_attention_forward``), so a float32 stage equals the transformers model
bit for bit; the tests check it. In bf16 the stage differs from transformers only where it says so: attention
on fp32 copies (``inference.stage``) and fused quantized matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.qlinear import fused


class KVCache:
    """One session's keys and values on one stage: per block, [B, kv heads, positions, D]."""

    def __init__(self, blocks: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * blocks
        self.values: list[torch.Tensor | None] = [None] * blocks

    def get_seq_length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else int(k.shape[2])

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[i], self.values[i]
        # (as transformers' DynamicLayer: the first step's keys are a contiguous copy, later ones concatenated)
        k = k.contiguous() if old_k is None else torch.cat([old_k, k], dim=-2)
        v = v.contiguous() if old_v is None else torch.cat([old_v, v], dim=-2)
        self.keys[i], self.values[i] = k, v
        return k, v


@dataclass
class _Block:
    attn: nn.Module  # the family's attention module: its projections, scaling and GQA groups
    qkv: nn.Module | None  # q, k and v fused (quantized formats), else None
    sizes: tuple[int, int, int]
    gate_up: nn.Module | None
    intermediate: int
    mlp: nn.Module
    eps_in: float
    w_in: torch.Tensor
    eps_post: float
    w_post: torch.Tensor


class Blocks:
    """A stage's decoder blocks (the layers of the family's base model built in ``inference.stage``)."""

    def __init__(self, body: nn.Module) -> None:
        from transformers import AttentionInterface

        self.rotary = body.rotary_emb
        self.attention = AttentionInterface().get_interface(body.config._attn_implementation, None)
        self.blocks = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = fused([a.q_proj, a.k_proj, a.v_proj])
            gate_up = fused([m.gate_proj, m.up_proj])
            self.blocks.append(_Block(
                a, qkv, (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features), gate_up,
                m.gate_proj.out_features, m,
                layer.input_layernorm.variance_epsilon, layer.input_layernorm.weight,
                layer.post_attention_layernorm.variance_epsilon, layer.post_attention_layernorm.weight))
            if qkv is not None:  # the fused copy replaces the three (their memory is freed)
                a.q_proj = a.k_proj = a.v_proj = None
            if gate_up is not None:
                m.gate_proj = m.up_proj = None

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, t, _ = h.shape
        past = cache.get_seq_length()
        cos, sin = self.rotary(h, positions)  # [B, T, D] in h's dtype
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = None
        if t > 1 and past:  # a chunk after cached positions: position past+i sees keys 0..past+i
            mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)[None, None]
        for i, blk in enumerate(self.blocks):
            a = blk.attn
            x = rms_norm(h, blk.w_in, blk.eps_in)
            if blk.qkv is not None:
                q, k, v = blk.qkv(x).split(blk.sizes, dim=-1)
            else:
                q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            q = q.view(b, t, -1, a.head_dim).transpose(1, 2)  # [B, n, T, D]
            k = k.view(b, t, -1, a.head_dim).transpose(1, 2)  # [B, m, T, D]
            v = v.view(b, t, -1, a.head_dim).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            k, v = cache.update(i, k, v)
            out, _ = self.attention(a, q, k, v, mask, dropout=0.0, scaling=a.scaling)  # [B, T, n, D]
            h = h + a.o_proj(out.reshape(b, t, -1).contiguous())
            x = rms_norm(h, blk.w_post, blk.eps_post)
            m = blk.mlp
            if blk.gate_up is not None:
                gate, up = blk.gate_up(x).split(blk.intermediate, dim=-1)
            else:
                gate, up = m.gate_proj(x), m.up_proj(x)
            h = h + m.down_proj(m.act_fn(gate) * up)
        return h


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` exactly, in fewer ops: normalised in fp32, rounded to the stage's dtype, then scaled
    (one fused ``F.rms_norm`` in bf16 rounds once instead of twice, and flipped SmolLM2's int4 answer to the
    capital-of-France question, a near tie, from "Paris")."""
    return weight * F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

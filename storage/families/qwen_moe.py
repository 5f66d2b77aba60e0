"""Qwen 2 MoE and Qwen 3 MoE: the Llama layout whose MLP is a mixture of E experts, K of them per token
(Qwen 2 MoE adds a shared expert with a sigmoid gate). Checkpoints save each expert apart; transformers 5
modules hold them fused, and this adapter owns the mapping:

    checkpoint   mlp.experts.e.gate_proj.weight [I, H], .up_proj [I, H], .down_proj [H, I]   for e < E
    module       mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I]
    router       mlp.gate.weight [E, H]: a bare parameter, not an nn.Linear (kept in float)

Memory counts every expert; speed counts the K active ones (``active_fraction``). Quantized experts (int8,
int4) run through ``QuantExperts``: transformers' routing loop over the int8/int4 kernels of each expert.
A stage renumbers its blocks from 0, so which blocks are sparse (``mlp_only_layers``, ``decoder_sparse_step``,
by global index) is rewritten to the stage's own indices.

GGUF files (llama.cpp's qwen2moe, qwen3moe) hold a block's experts as 3-D tensors ``ffn_{gate,up,down}_exps``
[E, N, K] in HF order, expert e's N rows contiguous: ``gguf_parts`` names each expert's slice as the checkpoint
does, so the importer reads one expert's rows as one matrix (quantized rows as they are)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from inference.qlinear import linear
from storage.families.base import Architecture, Family
from storage.formats import MIN, QUANTIZED, SCALE

EXPERT = re.compile(r"(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def sparse(cfg: Any, index: int) -> bool:
    """Whether block ``index`` (global) of the whole model is a mixture of experts (transformers' rule)."""
    return (index not in cfg.mlp_only_layers and cfg.num_experts > 0
            and (index + 1) % cfg.decoder_sparse_step == 0)


class QwenMoe(Family):
    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe")
    causal_lm: ClassVar[dict[str, str]] = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    gguf_archs = ("qwen2moe", "qwen3moe")
    gguf_blocks: ClassVar[dict[str, str]] = {
        **Family.gguf_blocks, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # Qwen 3 MoE
        "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # the router; Qwen 2 MoE's
        "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",  # shared
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}  # expert, and its gate: [H] in GGUF, [1, H] here
    #: GGUF's expert tensors, [E, N, K] in HF order (expert e's N rows contiguous) -> each expert's matrix
    gguf_experts: ClassVar[dict[str, str]] = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                                              "ffn_down_exps": "down_proj"}
    #: Sizes transformers 5.24 does not read from a GGUF file (``expert_feed_forward_length``,
    #: ``expert_shared_feed_forward_length``: it keeps its defaults, 1408 and 5632 for qwen2_moe) -> the tensor
    #: whose row count is that size
    gguf_sizes: ClassVar[dict[str, str]] = {"moe_intermediate_size": ".mlp.experts.0.gate_proj.weight",
                                            "shared_expert_intermediate_size": ".mlp.shared_expert.gate_proj.weight"}

    def architecture(self, config: dict[str, Any]) -> Architecture:
        arch = super().architecture(config)
        return Architecture(**{**{f: getattr(arch, f) for f in arch.__slots__},
                               "experts": int(config.get("num_experts") or config["num_local_experts"]),
                               "active_experts": int(config["num_experts_per_tok"])})

    def active_fraction(self, arch: Architecture, tensor: str) -> float:
        return arch.active_experts / arch.experts if ".mlp.experts." in tensor else 1.0

    def quantizable(self, name: str) -> bool:
        return not name.endswith(".mlp.gate.weight")  # the router: a bare parameter

    def stage_config(self, cfg: Any, numbers: list[int]) -> None:
        moe = [sparse(cfg, n) for n in numbers]
        super().stage_config(cfg, numbers)
        cfg.decoder_sparse_step = 1
        cfg.mlp_only_layers = [i for i, is_moe in enumerate(moe) if not is_moe]

    def gguf_parts(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        if (m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)) and m[2] in self.gguf_experts:
            if len(shape) != 3:
                return None
            return [(f"model.layers.{m[1]}.mlp.experts.{e}.{self.gguf_experts[m[2]]}.weight", shape[1:])
                    for e in range(shape[0])]
        parts = super().gguf_parts(name, shape)
        if parts and len(shape) == 1 and parts[0][0].endswith(".mlp.shared_expert_gate.weight"):
            return [(parts[0][0], (1, shape[0]))]  # an nn.Linear(H, 1), as transformers expands it
        return parts

    def gguf_config(self, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
        notes = []
        for key, suffix in self.gguf_sizes.items():
            rows = {shape[0] for name, shape in shapes.items() if name.endswith(suffix)}
            if len(rows) == 1 and config.get(key) != (size := rows.pop()):
                notes.append(f"{key} {size} from the tensors (transformers read {config.get(key)})")
                config[key] = size
        return notes

    def load_blocks(self, blocks: nn.Module, local: dict[str, torch.Tensor], formats: dict[str, str],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
        rest = dict(local)
        experts: dict[int, dict[int, dict[str, str]]] = {}  # block -> expert -> gate/up/down -> tensor name
        for name in local:
            if m := EXPERT.match(name):
                experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = name.removesuffix(".weight")
        for block, by_expert in experts.items():
            module = blocks[block].mlp.experts
            order = [by_expert[e] for e in range(len(by_expert))]
            names = [n[w] for n in order for w in ("gate", "up", "down")]
            if any(formats.get(n + ".weight") in QUANTIZED for n in names):
                blocks[block].mlp.experts = QuantExperts(module, order, rest, formats, dtype)
            else:
                w = {n: rest.pop(n + ".weight").to(dtype) for n in names}
                module.gate_up_proj = torch.nn.Parameter(torch.stack([torch.cat([w[n["gate"]], w[n["up"]]])
                                                                      for n in order]), requires_grad=False)
                module.down_proj = torch.nn.Parameter(torch.stack([w[n["down"]] for n in order]),
                                                      requires_grad=False)
            for n in names:
                for suffix in (".weight", ".weight" + SCALE, ".weight" + MIN):
                    rest.pop(n + suffix, None)
        return rest


class QuantExperts(nn.Module):
    """transformers' eager experts loop (``Qwen2MoeExperts.forward``) over each expert's int8/int4 kernels:
    gate [I, H], up [I, H], down [H, I]; x [tokens, H]."""

    def __init__(self, module: nn.Module, order: list[dict[str, str]], tensors: dict[str, torch.Tensor],
                 formats: dict[str, str], dtype: torch.dtype) -> None:
        super().__init__()

        def one(name: str) -> nn.Module:
            w = name + ".weight"
            return linear(formats.get(w, "float32"), tensors, w, None, dtype)

        self.num_experts, self.act_fn = len(order), module.act_fn
        self.gate, self.up, self.down = (nn.ModuleList(one(n[w]) for n in order) for w in ("gate", "up", "down"))

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, token = torch.where(mask[e])
            xs = x[token]
            y = self.down[e](self.act_fn(self.gate[e](xs)) * self.up[e](xs)) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

"""Linear layers and embeddings over the compact shard formats (``storage.formats``), with torch's own CPU
kernels for weight-only quantized matmuls. Activations are in the stage's compute dtype (bf16 is what the
kernels are fast with on CPUs that do bf16; fp32 works everywhere, slower).

    Int8Linear    y[m, n] = sum_k x[m, k] * q[n, k] * scale[n]          aten._weight_int8pack_mm
    Int4Linear    y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[g, n] + z[g, n])   aten._weight_int4pack_mm_for_cpu
                  with the stored w = q * scale + min, so s = scale and z = min + 8 * scale per group g

The int4 kernel takes its own tiled layout (``_convert_weight_to_int4pack_for_cpu``), built at load time
from the stored nibbles in blocks of rows, so the transient copy stays small.
"""

from __future__ import annotations

import torch
from torch import nn

from storage.formats import GROUP
from storage.quantize import unpack_int4

#: Rows of one tile of the int4 kernel's layout (measured: layouts of 64-row multiples concatenate into the
#: layout of the whole; 32-row pieces do not).
INT4_TILE_ROWS = 64
#: Rows converted to the int4 kernel layout at a time (whole tiles).
PACK_ROWS = 2048
#: Byte alignment the kernels' vector loads need (torch's own allocations have it; tensors read from a
#: safetensors file sit at the file's offsets: an int8 weight at offset 40 mod 64 crashed the AVX512
#: ``_weight_int8pack_mm`` with SIGSEGV).
ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on an ``ALIGN``-byte boundary (copied only when it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", aligned(q))  # [N, K] int8
        self.register_buffer("scale", aligned(scale.to(dtype)))  # [N]
        self.register_buffer("bias", None if bias is None else aligned(bias.to(dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.q, self.scale)
        y = y.reshape(*shape[:-1], self.out_features)  # [..., N]
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    def __init__(self, w: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int) -> None:
        """``w``: the kernel's tiled layout; ``scales_and_zeros``: [K/32, N, 2] in the compute dtype."""
        super().__init__()
        self.out_features, self.in_features = scales_and_zeros.shape[1], in_features
        self.register_buffer("w", w)
        self.register_buffer("scales_and_zeros", aligned(scales_and_zeros))
        self.register_buffer("bias", None if bias is None else aligned(bias))

    @classmethod
    def from_stored(cls, packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> Int4Linear:
        """From the shard format: nibbles [N, K/2], scale and min [N, K/32]."""
        n, half = packed.shape
        tiles = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(packed[r:r + PACK_ROWS]).to(torch.int32), 1) for r in range(0, n, PACK_ROWS)]
        s = scale.float().t()  # [K/32, N]
        z = mn.float().t() + 8.0 * s
        return cls(torch.cat(tiles) if len(tiles) > 1 else tiles[0], torch.stack([s, z], dim=-1).to(dtype),
                   None if bias is None else bias.to(dtype), 2 * half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.w, GROUP,
                                                       self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """Token embeddings stored int8 or int4: only the rows looked up are dequantized."""

    def __init__(self, fmt: str, weight: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.fmt, self.dtype = fmt, dtype
        self.register_buffer("weight", weight)  # int8 [V, H] or packed int4 [V, H/2]
        self.register_buffer("scale", scale)  # [V] or [V, H/32]
        self.register_buffer("mn", mn)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.fmt == "int8":
            rows = self.weight[flat].float() * self.scale[flat].float()[:, None]  # [T, H]
        else:
            q = unpack_int4(self.weight[flat]).float()  # [T, H]
            t, h = q.shape
            assert self.mn is not None
            rows = (q.reshape(t, h // GROUP, GROUP) * self.scale[flat].float()[..., None]
                    + self.mn[flat].float()[..., None]).reshape(t, h)
        return rows.to(self.dtype).reshape(*ids.shape, -1)


def linear(fmt: str, t: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None,
           dtype: torch.dtype) -> nn.Module:
    """The module for weight ``name`` (``...weight``) stored in ``fmt`` among the tensors ``t``."""
    w = t[name]
    if fmt == "int8":
        return Int8Linear(w, t[name + "_scale"], bias, dtype)
    if fmt == "int4":
        return Int4Linear.from_stored(w, t[name + "_scale"], t[name + "_min"], bias, dtype)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(aligned(w.to(dtype)), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(aligned(bias.to(dtype)), requires_grad=False)
    return layer


def fused(layers: list[nn.Module]) -> nn.Module | None:
    """One quantized linear computing ``layers`` side by side (their outputs concatenated), or None unless
    all are int8 or all int4 over the same input. Each output row is its own dot product with its own
    scales, so the fused rows are the separate layers' rows; one call instead of several saves the per-call
    cost, which dominates small decode matmuls. Float layers are never fused (float32 stays transformers'
    arithmetic exactly)."""
    kind = type(layers[0])
    if kind not in (Int8Linear, Int4Linear) or any(type(m) is not kind for m in layers):
        return None
    if len({m.in_features for m in layers}) != 1 or len({m.bias is None for m in layers}) != 1:
        return None
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    if kind is Int8Linear:
        return Int8Linear(torch.cat([m.q for m in layers]), torch.cat([m.scale for m in layers]), bias,
                          layers[0].scale.dtype)
    if any(m.out_features % INT4_TILE_ROWS for m in layers):  # the layout concatenates in whole tiles only
        return None
    return Int4Linear(torch.cat([m.w for m in layers]), torch.cat([m.scales_and_zeros for m in layers], dim=1),
                      bias, layers[0].in_features)

"""Turning float weight matrices into the shard formats of ``storage.formats`` (and back, for tests and
for ``--weights float32`` of a quantized source). Torch on the CPU, one tensor at a time.
"""

from __future__ import annotations

import torch

from storage.formats import GROUP, MIN, SCALE

#: torch dtype of each float format and of its safetensors name.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                      torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale float32 [N]): symmetric, one scale per output row."""
    return quantize_int8_(w.float().clone() if w.dtype == torch.float32 else w.float())


def quantize_int8_(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8`` computed in place on a float32 [N, K] tensor the caller owns (no temporaries)."""
    lo, hi = torch.aminmax(w, dim=1)
    scale = (torch.maximum(-lo, hi) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # = |w|.amax / 127
    return w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float (K a multiple of 32) -> (packed uint8 [N, K/2], scale f16 [N, K/32], min f16 [N, K/32]):
    asymmetric per group of 32, ``w ≈ q * scale + min`` with q in [0, 15]. q is computed from the fp16
    scale and min actually stored, so dequantizing reproduces what was chosen."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 needs the input size to be a multiple of {GROUP}, got {k}")
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    mn = lo.to(torch.float16)
    s = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    q = torch.round((g - mn.float()[..., None]) / s[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scale, mn


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 values 0..15 -> [N, K/2]: low nibble holds the even column."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15."""
    n, half = packed.shape
    out = torch.empty((n, half * 2), dtype=torch.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out


def dequantize(fmt: str, weight: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 matrix a quantized weight stands for."""
    if fmt == "int8":
        return weight.float() * scale.float()[:, None]
    q = unpack_int4(weight).float()
    n, k = q.shape
    assert mn is not None
    g = q.reshape(n, k // GROUP, GROUP) * scale.float()[..., None] + mn.float()[..., None]
    return g.reshape(n, k)


def encode_weight(name: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors of weight ``name`` in format ``fmt`` (a float format or int8/int4)."""
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return {name: q, name + SCALE: scale}
    if fmt == "int4":
        packed, scale, mn = quantize_int4(w)
        return {name: packed, name + SCALE: scale, name + MIN: mn}
    return {name: w.to(TORCH_DTYPES[fmt]).contiguous()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

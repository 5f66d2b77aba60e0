"""Activation frames: what travels stage to stage on ``/meshnode/activations/1``. Pure; no I/O.

A frame is a length-prefixed CBOR header followed by the tensor's raw little-endian bytes (no pickle,
never ``torch.load``)::

    header = {"v": 1, "kind": "tokens" | "hidden" | "result" | "end" | "error",
              "session": str, "step": int, "start": int (position of the first token),
              "dtype": "int64" | "float32" | "bfloat16" | "float16", "shape": [B, T] or [B, T, H],
              ...kind-specific fields}

The receiver checks everything before it touches a byte of payload: the kind, the session id, the dtype
(an allow-list), the shape (rank, every dimension ≥ 1, at most ``MAX_TOKENS`` per step, the hidden size
the stage expects) and that the payload is exactly ``prod(shape) * itemsize`` bytes. Positions are
explicit (``start``): a stage refuses a step that does not continue its cache (see ``inference.stage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cbor2
import torch

from mesh.errors import PeerError
from mesh.wire import versioned

FRAME_VERSION = 1
MAX_HEADER = 16 * 1024
MAX_TOKENS = 8192  # tokens in one step (a prefill chunk)
MAX_PAYLOAD = 256 * 2**20  # bytes of one tensor: 8k tokens x 8k hidden x fp32
KINDS = ("tokens", "hidden", "result", "end", "error")
DTYPES: dict[str, torch.dtype] = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class FrameError(PeerError):
    code = "BAD_FRAME"


@dataclass(frozen=True, slots=True)
class Frame:
    kind: str
    session: str
    step: int
    start: int  # position of the first token of this step
    tensor: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific, bounded scalars and short lists


def encode(frame: Frame) -> tuple[bytes, bytes]:
    """(header bytes, payload bytes) of a frame; the caller sends them as two length-prefixed parts."""
    header: dict[str, Any] = {"v": FRAME_VERSION, "kind": frame.kind, "session": frame.session, "step": frame.step,
                              "start": frame.start, **frame.extra}
    payload = b""
    if frame.tensor is not None:
        t = frame.tensor.detach().contiguous().cpu()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot send a {t.dtype} tensor")
        header["dtype"] = DTYPE_NAMES[t.dtype]
        header["shape"] = list(t.shape)
        payload = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return cbor2.dumps(header), payload


def decode_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The checked header and the payload size it announces (0 without a tensor)."""
    r = versioned(data, "frame", FRAME_VERSION, key="v", limit=MAX_HEADER)
    raw = r.fields
    kind = r.text("kind")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    session = r.text("session")
    if not session:
        raise FrameError("frame.session must not be empty")
    step, start = r.integer("step"), r.integer("start")
    if step < 0 or start < 0:
        raise FrameError("frame.step and frame.start must not be negative")
    size = 0
    if "dtype" in raw or "shape" in raw:
        dtype = r.text("dtype")
        if dtype not in DTYPES:
            raise FrameError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}", code="BAD_DTYPE")
        shape = raw.get("shape")
        if (not isinstance(shape, list) or not 2 <= len(shape) <= 3
                or not all(type(d) is int and 1 <= d <= 2**20 for d in shape)):
            raise FrameError(f"frame.shape must be [B, T] or [B, T, H] of positive sizes, got {shape!r}",
                             code="BAD_SHAPE")
        if shape[1] > MAX_TOKENS:
            raise FrameError(f"{shape[1]} tokens in one step; at most {MAX_TOKENS}", code="BAD_SHAPE")
        size = math.prod(shape) * DTYPES[dtype].itemsize
        if size > MAX_PAYLOAD:
            raise FrameError(f"tensor of {size} bytes exceeds {MAX_PAYLOAD}", code="MESSAGE_TOO_LARGE")
    return raw, size


def decode(header: dict[str, Any], payload: bytes) -> Frame:
    """A Frame from a header checked by ``decode_header`` and exactly its payload."""
    tensor = None
    if "dtype" in header:
        dtype, shape = DTYPES[header["dtype"]], header["shape"]
        if len(payload) != math.prod(shape) * dtype.itemsize:
            raise FrameError(f"payload of {len(payload)} bytes for a {header['dtype']} tensor of shape {shape}",
                             code="BAD_SHAPE")
        tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FrameError("activations contain NaN or infinity", code="BAD_VALUES")
    base = {"v", "kind", "session", "step", "start", "dtype", "shape"}
    return Frame(header["kind"], header["session"], header["step"], header["start"], tensor,
                 {k: v for k, v in header.items() if k not in base})


def expect(frame: Frame, *, kind: str, dtype: torch.dtype, rank: int, hidden: int | None = None) -> torch.Tensor:
    """The frame's tensor if it is what a stage expects (kind, dtype, rank, hidden size), else a FrameError."""
    t = frame.tensor
    if frame.kind != kind:
        raise FrameError(f"expected a {kind!r} frame, got {frame.kind!r}")
    if t is None:
        raise FrameError(f"a {kind!r} frame carries a tensor", code="BAD_SHAPE")
    if t.dtype != dtype:
        raise FrameError(f"expected {DTYPE_NAMES[dtype]}, got {DTYPE_NAMES[t.dtype]}", code="BAD_DTYPE")
    if t.dim() != rank or (hidden is not None and t.shape[-1] != hidden):
        want = f"[B, T, {hidden}]" if rank == 3 else "[B, T]"
        raise FrameError(f"expected shape {want}, got {list(t.shape)}", code="BAD_SHAPE")
    return t

"""Weight formats of shards: how a matrix is stored, how many bytes it takes once loaded. Pure; no I/O.

A shard is a safetensors file. Its float tensors are plain (``F32``, ``BF16``, ``F16``). A quantized weight
matrix ``X.weight`` of logical shape ``[N, K]`` (N outputs, K inputs) is stored as tensors beside it:

    int8  (per output channel)  X.weight       I8  [N, K]       w[n, k] = q[n, k] * scale[n]
                                X.weight_scale F32 [N]
    int4  (groups of 32 along K) X.weight      U8  [N, K/2]     byte j of row n: low nibble k = 2j, high 2j+1
                                X.weight_scale F16 [N, K/32]     w[n, k] = q[n, k] * scale[n, g] + min[n, g],
                                X.weight_min   F16 [N, K/32]     q in [0, 15], g = k // 32

Q4_0 and Q4_1 blocks of a GGUF are exactly this int4 (Q4_0: scale d, min -8d; Q4_1: scale d, min m); Q8_0's
blocks of 32 and the K-quants are requantized into it. The format of a shard is the set of formats of its
weight matrices (``"int4"``, ``"int4+int8"``, ``"bfloat16"``): the manifest records it and a stage refuses
a shard whose tensors say otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: What ``meshnode models add --weights`` accepts; ``auto`` keeps what the source ships.
WEIGHTS = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
FLOAT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
FLOAT_FORMATS = {v: k for k, v in FLOAT_DTYPES.items()}
QUANTIZED = ("int8", "int4")
#: Compute dtypes a plan may choose (fp16 arithmetic is not offered: most CPUs lack it, fp16 weights upcast).
COMPUTE_DTYPES = ("float32", "bfloat16")
GROUP = 32
SCALE, MIN = "_scale", "_min"  # suffixes of a quantized weight's companions: "X.weight_scale", "X.weight_min"
#: Bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
COMPUTE_ITEMSIZE = {"float32": 4, "bfloat16": 2}

TensorSpec = tuple[str, str, Sequence[int]]  # (name, safetensors dtype, stored shape)


class FormatError(ValueError):
    """The tensors of a shard do not form a valid format (caught and coded by callers)."""


def is_companion(name: str) -> bool:
    return name.endswith(".weight" + SCALE) or name.endswith(".weight" + MIN)


def weight_formats(tensors: Iterable[TensorSpec]) -> dict[str, str]:
    """Format of every weight matrix (a 2-D ``*.weight``), by name; FormatError when a quantized weight's
    companions are missing or have the wrong dtype or shape."""
    by_name = {name: (dtype, tuple(shape)) for name, dtype, shape in tensors}
    out: dict[str, str] = {}
    for name, (dtype, shape) in by_name.items():
        if is_companion(name):
            base = name[: -len(SCALE)] if name.endswith(SCALE) else name[: -len(MIN)]
            if base not in by_name:
                raise FormatError(f"{name} has no weight {base}")
            continue
        if not name.endswith("weight") or len(shape) != 2:
            continue
        scale, mn = by_name.get(name + SCALE), by_name.get(name + MIN)
        n, k = shape
        if dtype == "I8":
            if scale is None or mn is not None or scale != ("F32", (n,)):
                raise FormatError(f"{name}: an int8 weight needs {name}{SCALE} F32 [{n}] and nothing else")
            out[name] = "int8"
        elif dtype == "U8":
            groups = (2 * k) // GROUP
            want = ("F16", (n, groups))
            if scale != want or mn != want or (2 * k) % GROUP:
                raise FormatError(f"{name}: an int4 weight [{n}, {2 * k}] needs {name}{SCALE} and {name}{MIN} "
                                  f"F16 [{n}, {groups}]")
            out[name] = "int4"
        elif dtype in FLOAT_FORMATS:
            if scale is not None or mn is not None:
                raise FormatError(f"{name}: a {dtype} weight has no scales")
            out[name] = FLOAT_FORMATS[dtype]
        else:
            raise FormatError(f"{name}: weights of dtype {dtype} are not a known format")
    return out


def shard_format(tensors: Iterable[TensorSpec]) -> str:
    """The format a manifest records for a shard: its weight formats, sorted, joined by ``+``."""
    specs = list(tensors)
    formats = set(weight_formats(specs).values())
    if not formats:  # a norm shard: its vectors' dtype
        formats = {FLOAT_FORMATS.get(d, d.lower()) for _, d, _ in specs}
    return "+".join(sorted(formats))


def logical_shape(shape: Sequence[int], fmt: str | None) -> tuple[int, ...]:
    """The weight's shape as the model sees it (an int4 matrix stores two columns per byte)."""
    if fmt == "int4":
        return (shape[0], 2 * shape[1])
    return tuple(shape)


def params_of(tensors: Iterable[TensorSpec]) -> int:
    """Model parameters held by these tensors (scales and mins are not parameters)."""
    specs = list(tensors)
    formats = weight_formats(specs)
    return sum(math.prod(logical_shape(s, formats.get(n))) for n, _, s in specs if not is_companion(n))


def matmul_params(tensors: Iterable[TensorSpec]) -> int:
    specs = list(tensors)
    formats = weight_formats(specs)
    return sum(math.prod(logical_shape(s, formats.get(n))) for n, _, s in specs
               if not is_companion(n) and len(s) >= 2)


def loaded_bytes(tensors: Iterable[TensorSpec], compute: str) -> int:
    """Bytes these tensors take once a stage has loaded them for ``compute`` (``float32``/``bfloat16``):
    float tensors become the compute dtype, quantized weights stay as stored, their scales become the
    compute dtype (int4: one scale and one zero per group)."""
    size = COMPUTE_ITEMSIZE[compute]
    specs = list(tensors)
    formats = weight_formats(specs)
    total = 0
    for name, dtype, shape in specs:
        n = math.prod(shape)
        if is_companion(name):
            total += n * size
        elif formats.get(name) in QUANTIZED:
            total += n * DTYPE_BYTES[dtype]
        elif dtype in FLOAT_FORMATS:
            total += n * size
        else:
            total += n * DTYPE_BYTES[dtype]
    return total


def plan_compute(formats: Iterable[str], peers: Iterable[Iterable[str]]) -> str:
    """The compute dtype of a plan over peers with these gossiped features: bf16 when the model's formats
    call for it (``default_compute``) and every peer runs it fast — quantized weights need ``compute-bf16``
    (their kernels want bf16 activations), bf16 weights alone need ``bf16-hardware`` (without it a bf16
    matmul is slower than an fp32 one) — fp32 otherwise."""
    parts = {p for f in formats for p in f.split("+")}
    if default_compute(parts) != "bfloat16":
        return "float32"
    need = "compute-bf16" if parts & set(QUANTIZED) else "bf16-hardware"
    return "bfloat16" if all(need in set(f) for f in peers) else "float32"


def default_compute(formats: Iterable[str]) -> str:
    """The compute dtype a model's shard formats call for: bf16 when its weights are compact (bf16, int8,
    int4: their kernels want bf16 activations; fp16 matrices beside them are converted), fp32 when any
    weight is fp32 or every weight is fp16 (fp16 is upcast: CPUs have no fp16 arithmetic)."""
    parts = {p for f in formats for p in f.split("+")}
    compact = parts & {"bfloat16", "int8", "int4"}
    return "bfloat16" if compact and parts <= {"bfloat16", "int8", "int4", "float16"} else "float32"

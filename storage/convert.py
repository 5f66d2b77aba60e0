"""Converting a source's tensors into shards of the chosen weight format, one tensor at a time.

A source (a Hugging Face folder, a GGUF file) is a list of ``SourceTensor``: the tensor's name as
transformers knows it, its logical shape, its dtype in the source, the format ``auto`` keeps it in, and a
``read(fmt)`` that returns its stored tensors in a format (``storage.formats``). Nothing is read until a
shard is written, and each shard is written tensor by tensor, so converting a model of any size needs
memory for about one tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mesh.errors import LocalError
from storage.families import Family, by_name
from storage.formats import DTYPE_BYTES, FLOAT_DTYPES, FLOAT_FORMATS, GROUP, MIN, QUANTIZED, SCALE
from storage.metadata import Architecture, ModelMetadata, TensorInfo, group_layers, read_model_tensors
from storage.pieces import PIECE_SIZE
from storage.quantize import SAFETENSORS_DTYPES, TORCH_DTYPES, encode_weight, tensor_bytes
from storage.shards import Written, shard_bytes, write_produced_shard


@dataclass(frozen=True)
class SourceTensor:
    name: str  # e.g. "model.layers.3.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # logical shape, [out, in] for matrices
    source_dtype: str  # "BF16", "F32", "Q4_1", ...
    auto: str  # the format ``--weights auto`` stores it in: a float format, or int8/int4 for matrices
    read: Callable[[str], dict[str, torch.Tensor]]  # format -> the stored tensors (name -> tensor)
    exact: bool = True  # False when ``auto`` requantizes (Q8_0 -> int8 per channel, K-quants)


def choose(st: SourceTensor, weights: str, family: Family) -> str:
    """The format ``--weights`` gives one tensor: ``auto`` keeps the source's; a float format applies to
    every tensor; int8/int4 apply to the weight matrices the family can run quantized (int4 needs K % 32 == 0
    and N % 16 == 0, the CPU kernel's layout, else int8; the family's ``eight_bit`` matrices, the embedding
    and head, stay int8: measured on SmolLM2, an int4 embedding/head raised perplexity from 26.6 to 29.7, and
    llama.cpp's Q4_1 file keeps its embedding Q8_0); vectors keep their float dtype."""
    if weights == "auto":
        return st.auto
    if weights in FLOAT_DTYPES:
        return weights
    if not (len(st.shape) == 2 and st.name.endswith("weight") and family.quantizable(st.name)):
        return FLOAT_FORMATS.get(st.source_dtype, "float32")
    n, k = st.shape
    if weights == "int4" and (k % GROUP or n % 16 or st.name in family.eight_bit):
        return "int8"
    return weights


def stored(name: str, shape: tuple[int, ...], fmt: str) -> list[TensorInfo]:
    """The tensors a weight is stored as in format ``fmt`` (storage.formats), as header-only infos."""
    def info(n: str, dtype: str, s: tuple[int, ...]) -> TensorInfo:
        return TensorInfo(n, dtype, s, "", 0, math.prod(s) * DTYPE_BYTES[dtype], 0)

    if fmt == "int8":
        return [info(name, "I8", shape), info(name + SCALE, "F32", shape[:1])]
    if fmt == "int4":
        n, k = shape
        return [info(name, "U8", (n, k // 2)), info(name + SCALE, "F16", (n, k // GROUP)),
                info(name + MIN, "F16", (n, k // GROUP))]
    return [info(name, FLOAT_DTYPES[fmt], shape)]


def convert(tensors: list[SourceTensor], weights: str, arch: Architecture, shard_dir: Path,
            written_one: Callable[[int, int], None] = lambda done, total: None, *,
            reserve: Callable[[int], None] = lambda nbytes: None, piece_size: int = PIECE_SIZE,
            ) -> tuple[ModelMetadata, list[Written]]:
    """Write every layer's shard in the chosen format, one source tensor at a time; (metadata of the
    stored tensors, each layer's shard as written). ``reserve(bytes)`` is told what the shards will take
    before the first is written (it raises to refuse); ``written_one(done, total)`` after each shard."""
    family = by_name(arch.family)
    if weights in QUANTIZED and not family.quantized_weights:
        raise LocalError(f"{arch.model_type} weights can be stored as float32, bfloat16 or float16, not quantized",
                         code="UNSUPPORTED_QUANTIZATION")
    chosen = {st.name: (st, choose(st, weights, family)) for st in tensors}
    infos: dict[str, TensorInfo] = {}
    source_of: dict[str, str] = {}
    for st, fmt in chosen.values():
        for info in stored(st.name, st.shape, fmt):
            infos[info.name] = info
            source_of[info.name] = st.name
    meta = group_layers(arch, infos)
    reserve(sum(shard_bytes(layer.name, [infos[n] for n in layer.tensors]) for layer in meta.layers))
    pending: dict[str, torch.Tensor] = {}  # produced tensors waiting for their turn (a weight's scales)

    def produce(name: str) -> bytes:
        if name not in pending:
            st, fmt = chosen[source_of[name]]
            out = st.read(fmt)
            want = {i.name: i for i in stored(st.name, st.shape, fmt)}
            if set(out) != set(want):
                raise LocalError(f"{st.name}: conversion to {fmt} gave {sorted(out)}, expected {sorted(want)}",
                                 code="CONVERSION_FAILED")
            for n, t in out.items():
                if SAFETENSORS_DTYPES.get(t.dtype) != want[n].dtype or tuple(t.shape) != want[n].shape:
                    raise LocalError(f"{n}: conversion to {fmt} gave {t.dtype} {list(t.shape)}, expected "
                                     f"{want[n].dtype} {list(want[n].shape)}", code="CONVERSION_FAILED")
            pending.update(out)
        return tensor_bytes(pending.pop(name))

    written = []
    for layer in meta.layers:
        written.append(write_produced_shard(layer.name, [infos[n] for n in layer.tensors], produce, shard_dir,
                                            piece_size))
        written_one(len(written), len(meta.layers))
    return meta, written


def folder_tensors(folder: Path) -> list[SourceTensor]:
    """The tensors of a Hugging Face folder as conversion sources (each read on demand with safetensors)."""
    out = []
    for info in read_model_tensors(folder).values():
        if info.dtype not in FLOAT_FORMATS:
            raise LocalError(f"{info.name} is {info.dtype}: only float weights can be converted",
                             code="UNSUPPORTED_QUANTIZATION")
        out.append(SourceTensor(info.name, info.shape, info.dtype, FLOAT_FORMATS[info.dtype],
                                functools.partial(_read_folder_tensor, folder / info.file, info.name)))
    return out


def _read_folder_tensor(path: Path, name: str, fmt: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(name)
    if fmt in QUANTIZED:
        return encode_weight(name, t, fmt)
    return {name: t.to(TORCH_DTYPES[fmt]).contiguous()}

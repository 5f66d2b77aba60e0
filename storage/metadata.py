"""Layer metadata of a model read from safetensors headers only: no tensor is loaded, so a 70B model's
metadata takes milliseconds.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
data offsets) and the data. The ``safetensors`` library reads headers only through ``safe_open``, which
maps the whole file and refuses one whose data is absent (a header-only file describing 70B shapes, a
partial download); so the header is parsed here, with the format's limits checked strictly.

Tensors are grouped into ordered layers: embedding, each decoder block, final norm, head. Tied weights
are counted once (in the embedding); the head that uses them still needs them in memory to run.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import LocalError, PeerError
from storage import formats
from storage.families import Architecture, UnsupportedArchitecture, by_name, family_of
from storage.formats import DTYPE_BYTES

__all__ = ["Architecture", "UnsupportedArchitecture", "architecture", "group_layers", "layers_of"]

#: The safetensors format caps its JSON header at 100 MB.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class MalformedSafetensors(PeerError):
    code = "MALFORMED_SAFETENSORS"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # file name inside the model folder
    start: int  # data offsets relative to the end of the header
    end: int
    data_start: int  # where the file's tensor data begins (8 + header length)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and the free-form ``__metadata__`` of one safetensors file.
    MalformedSafetensors for anything the format does not allow."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MalformedSafetensors(f"{path.name}: shorter than the 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise MalformedSafetensors(f"{path.name}: header of {size} bytes exceeds {MAX_HEADER_BYTES}")
        raw = f.read(size)
    if len(raw) != size:
        raise MalformedSafetensors(f"{path.name}: header truncated ({len(raw)} of {size} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedSafetensors(f"{path.name}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MalformedSafetensors(f"{path.name}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedSafetensors(f"{path.name}: __metadata__ must map strings to strings")
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor(path.name, name, entry, 8 + size)
    return tensors, meta


def _tensor(file: str, name: str, entry: Any, data_start: int) -> TensorInfo:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise MalformedSafetensors(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise MalformedSafetensors(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise MalformedSafetensors(f"{where}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise MalformedSafetensors(f"{where}: data_offsets must be [start, end] with 0 <= start <= end")
    info = TensorInfo(name, dtype, tuple(shape), file, offsets[0], offsets[1], data_start)
    if info.nbytes != info.numel * DTYPE_BYTES[dtype]:
        raise MalformedSafetensors(f"{where}: {info.nbytes} bytes of data for {info.numel} x {dtype}")
    return info


def read_model_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder: ``model.safetensors``, or the files an index names."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedSafetensors(f"{INDEX_FILE}: not a safetensors index ({exc})") from None
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise LocalError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}", code="NO_WEIGHTS")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        if "/" in name or "\\" in name or name.startswith("."):
            raise MalformedSafetensors(f"{INDEX_FILE}: file name {name!r} leaves the model folder")
        for tname, info in read_header(folder / name)[0].items():
            if tname in tensors:
                raise MalformedSafetensors(f"tensor {tname!r} appears in two files")
            tensors[tname] = info
    return tensors


# ---- architectures -------------------------------------------------------------------------------


def architecture(config: dict[str, Any]) -> Architecture:
    """What the layer grouping and FLOP counts need from a transformers ``config.json`` (its family's adapter
    reads it)."""
    family = family_of(config)
    try:
        return family.architecture(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedArchitecture(f"config.json of a {config.get('model_type')} model lacks or garbles "
                                      f"{exc}") from None


# ---- layers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layer:
    index: int  # position in pipeline order
    name: str  # "embedding", "block.N", "norm", "head"
    kind: str  # "embedding" | "block" | "norm" | "head"
    tensors: tuple[str, ...]  # names stored in this layer's shard (tied weights: none for the head)
    params: int  # parameters stored here (tied weights counted once, in the embedding)
    bytes_by_dtype: dict[str, int]
    memory_bytes: int  # weight bytes needed to run the layer (tied weights included)
    kv_bytes_per_token: int  # KV cache per token of context (blocks only)
    tied_to: str | None = None
    # FLOPs per token = base + per_context * sequence_length (the attention term grows with context)
    flops_base: int = 0
    flops_per_context: int = 0
    format: str = ""  # the weight format of its matrices (storage.formats.shard_format)
    flops_base_all: int = 0  # flops_base if every expert of a MoE block ran (= flops_base for dense layers)

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def flops_per_token(self, batch_size: int = 1, sequence_length: int = 1) -> int:
        """FLOPs to push ``batch_size`` tokens through this layer, each attending to
        ``sequence_length`` positions: 2 per weight (multiply-add) plus QK^T and AV."""
        return batch_size * (self.flops_base + self.flops_per_context * sequence_length)


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    arch: Architecture
    layers: tuple[Layer, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)

    compute: str = "float32"  # the compute dtype its formats call for (memory and KV bytes are counted in it)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)


def with_companions(weight: TensorInfo, named: dict[str, TensorInfo]) -> list[TensorInfo]:
    """A weight and, when it is quantized, its scale and min tensors (they fix its logical shape)."""
    return [weight, *(named[n] for n in (weight.name + formats.SCALE, weight.name + formats.MIN) if n in named)]


def layers_of(folder: Path) -> ModelMetadata:
    """Layer metadata of a Hugging Face model folder (config.json + safetensors), headers only."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise LocalError(f"no config.json in {folder}", code="NO_CONFIG") from None
    except ValueError as exc:
        raise LocalError(f"config.json in {folder} is not JSON: {exc}", code="BAD_CONFIG") from None
    return group_layers(architecture(config), read_model_tensors(folder))


def group_layers(arch: Architecture, tensors: dict[str, TensorInfo]) -> ModelMetadata:
    family = by_name(arch.family)
    groups: dict[tuple[int, int], list[TensorInfo]] = {}  # (kind order, block number) -> tensors
    order = {"embedding": 0, "block": 1, "norm": 2, "head": 3}
    for info in tensors.values():
        for pattern, kind in family.patterns:
            if m := pattern.match(info.name):
                number = int(m.group(1)) if kind == "block" else 0
                groups.setdefault((order[kind], number), []).append(info)
                break
        else:
            raise UnsupportedArchitecture(f"tensor {info.name!r} does not belong to a known {arch.family} layer")
    blocks = sorted(n for k, n in groups if k == 1)
    if blocks != list(range(arch.layers)):
        raise UnsupportedArchitecture(f"config says {arch.layers} blocks, the weights hold blocks {blocks[:5]}...")
    if (0, 0) not in groups or (2, 0) not in groups:
        raise UnsupportedArchitecture("the weights lack the embedding or the final norm")
    embedding = next((tensors[n] for n in family.embedding_weights if n in tensors), None)
    if embedding is None:
        raise UnsupportedArchitecture("no token embedding weight found")

    def specs(infos: list[TensorInfo]) -> list[formats.TensorSpec]:
        return [(t.name, t.dtype, t.shape) for t in infos]

    try:
        layer_formats = {key: formats.shard_format(specs(infos)) for key, infos in groups.items()}
        matrix_formats = formats.weight_formats(specs(list(tensors.values()))).values()
    except formats.FormatError as exc:
        raise MalformedSafetensors(str(exc)) from None
    compute = formats.default_compute(matrix_formats)  # norms' vectors do not decide it
    kv_bytes = formats.COMPUTE_ITEMSIZE[compute]  # the KV cache is kept in the compute dtype
    layers: list[Layer] = []
    for (kind_order, number), infos in sorted(groups.items()):
        kind = next(k for k, v in order.items() if v == kind_order)
        infos.sort(key=lambda t: t.name)
        params = formats.params_of(specs(infos))
        by_dtype: dict[str, int] = {}
        for t in infos:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        name = f"block.{number}" if kind == "block" else kind
        base = per_context = kv = 0
        every = None
        if kind == "block":  # matmuls (biases and norms are noise); a MoE token runs its active experts only
            named = {t.name: t for t in infos}
            matmuls = {t.name: formats.matmul_params(specs(with_companions(t, named)))
                       for t in infos if not formats.is_companion(t.name)}
            every = 2 * sum(matmuls.values())
            base = round(2 * sum(p * family.active_fraction(arch, tensor) for tensor, p in matmuls.items()))
            per_context = 4 * arch.heads * arch.head_dim  # QK^T and AV, a multiply-add each
            kv = 2 * arch.kv_heads * arch.head_dim * kv_bytes
        elif kind == "head":
            base = 2 * params
        elif kind == "norm":
            base = 4 * arch.hidden
        layers.append(Layer(len(layers), name, kind, tuple(t.name for t in infos), params, by_dtype,
                            formats.loaded_bytes(specs(infos), compute), kv, flops_base=base,
                            flops_per_context=per_context, format=layer_formats[(kind_order, number)],
                            flops_base_all=base if every is None else every))
    if not any(layer.kind == "head" for layer in layers):
        if not arch.tied:
            raise UnsupportedArchitecture("no lm_head weight and the config does not tie it to the embedding")
        emb = next(layer for layer in layers if layer.kind == "embedding")
        emb_specs = specs(with_companions(embedding, tensors))  # the embedding matrix and its scales, not wpe
        vocab_params = math.prod(formats.logical_shape(embedding.shape,
                                                       formats.weight_formats(emb_specs).get(embedding.name)))
        layers.append(Layer(len(layers), "head", "head", (), 0, {}, formats.loaded_bytes(emb_specs, compute), 0,
                            tied_to="embedding", flops_base=2 * vocab_params, format=emb.format))
    return ModelMetadata(arch, tuple(layers), tensors, compute)

"""GGUF files as conversion sources: their tensors as ``SourceTensor``s in our shard formats, read one at a time.

The header is parsed here with explicit reads (no memory map), so opening a file costs its header only. Tensor
data is read with ``os.preadv`` a slice of rows at a time and converted slice by slice, so reading a tensor
needs memory for its stored result plus one slice (``CHUNK`` elements), whatever the file's size.

What ``--weights auto`` keeps (``storage.formats``; only 2-D matrices are ever quantized):

    F32, F16, BF16   the same float format
    Q4_0             int4, exact: per block of 32, scale d, min -8d (the same values; a zero may change sign)
    Q4_1             int4, exact: scale d, min m
    Q4_K             int4, the 4-bit values kept, per sub-block of 32 scale d*sc and min -dmin*m rounded to F16
    Q8_0, Q6_K       int8 per output channel, requantized (dequantized, then ``quantize_int8``)
    quantized 1-D    float32 (dequantized)

int4 needs K % 32 == 0 and N % 16 == 0 (the CPU kernel's layout), else the matrix becomes int8. Other GGUF
types are refused (``UNSUPPORTED_QUANTIZATION``) when the file is opened, before anything is written.

``read("float32")`` equals transformers' own GGUF load bit for bit: the same ``gguf.quants.dequantize``, the same
names, and for ``llama`` files the same reverse permutation of the q/k rows (llama.cpp interleaves the rotary
halves of each head). A permutation of output rows moves whole rows of blocks, so it applies to quantized rows
as well and keeps int4 exact.

A tensor the family adapter splits (``Family.gguf_parts``: MoE experts stored as one 3-D tensor [E, N, K] in HF
order) becomes one ``SourceTensor`` per part: a view of that part's consecutive rows (the same type, its own
offset), read and converted as any matrix is, so an expert's quantized rows are kept as they are. A quantized
matrix the family cannot run quantized (``Family.quantizable``: the MoE router) is dequantized to float32.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from mesh.errors import LocalError
from storage.convert import SourceTensor
from storage.families import BY_GGUF_ARCH, BY_MODEL_TYPE, Family
from storage.formats import FLOAT_DTYPES, GROUP, MIN, QUANTIZED, SCALE
from storage.quantize import TORCH_DTYPES, pack_int4, quantize_int4, quantize_int8_

Q = GGMLQuantizationType
GGUF_MAGIC = b"GGUF"
CHUNK = 1 << 23  # elements converted at a time (32 MiB as float32)
FLOAT_TYPES = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # types whose 4-bit values are kept as they are
SUPPORTED = (*FLOAT_TYPES, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)

# GGUF metadata value types: id -> struct format of a scalar (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def malformed(path: Path, why: str) -> LocalError:
    return LocalError(f"{path.name} is not a readable GGUF file: {why}", code="MALFORMED_GGUF")


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in the header."""

    name: str  # GGUF name, "blk.3.attn_q.weight"
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # HF order: [N, K] for a matrix (GGUF lists the fastest dimension first)
    offset: int  # absolute file offset of its data
    nbytes: int

    @property
    def row_bytes(self) -> int:  # bytes of one row of K elements
        return self.nbytes // (self.shape[0] if len(self.shape) == 2 else 1)


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays as ("array", item type id, count), never read
    tensors: list[GgufTensor]
    data_start: int
    file_size: int


class _HeaderReader:
    """Explicit little-endian reads of a GGUF header, every length checked against the file size."""

    def __init__(self, f: IO[bytes], path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise malformed(self.path, f"the header runs past the end of the file (at byte {self.f.tell()})")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise malformed(self.path, f"the header runs past the end of the file (at byte {self.f.tell()})")
        self.f.seek(n, os.SEEK_CUR)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise malformed(self.path, f"a string is not UTF-8 (at byte {self.f.tell()})") from exc

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:  # skipped: tokenizer vocabularies are read by transformers, not by us
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[itype]))
            elif itype == _STRING:
                for _ in range(count):
                    self.skip(self.scalar("<Q"))
            else:
                raise malformed(self.path, f"an array of unknown value type {itype}")
            return ("array", itype, count)
        raise malformed(self.path, f"unknown metadata value type {vtype}")


def read_header(path: Path) -> GgufHeader:
    """The metadata and tensor table of a GGUF file (v2 or v3, little-endian). Every tensor's data must lie
    inside the file; MALFORMED_GGUF otherwise. Tensor types are checked later (``open_gguf``)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _HeaderReader(f, path, size)
        if r.take(4) != GGUF_MAGIC:
            raise malformed(path, "no GGUF magic")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise malformed(path, f"version {version} (only 2 and 3, little-endian, are read)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        if n_tensors > size or n_kv > size:
            raise malformed(path, f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in {size} bytes")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        entries = []
        for _ in range(n_tensors):
            name, n_dims = r.string(), r.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise malformed(path, f"tensor {name} has {n_dims} dimensions")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            entries.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise malformed(path, f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-f.tell() // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, type_id, offset in entries:
        if name in seen:
            raise malformed(path, f"tensor {name} appears twice")
        seen.add(name)
        try:
            qtype = Q(type_id)
        except ValueError:
            raise LocalError(f"{path.name}: tensor {name} has GGUF type {type_id}, which this version does not "
                             f"know; supported: {', '.join(t.name for t in SUPPORTED)}",
                             code="UNSUPPORTED_QUANTIZATION") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if min(dims) < 1 or dims[0] % block:
            raise malformed(path, f"tensor {name} has impossible dimensions {dims} for {qtype.name}")
        nbytes = n // block * type_size
        start = data_start + offset
        if offset % alignment or start + nbytes > size:
            raise malformed(path, f"tensor {name} ({nbytes} bytes at {start}) does not lie inside the file "
                                  f"({size} bytes): truncated?")
        tensors.append(GgufTensor(name, qtype, tuple(reversed(dims)), start, nbytes))
    return GgufHeader(version, metadata, tensors, data_start, size)


def auto_format(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[str, bool]:
    """(the format ``--weights auto`` stores a tensor in, whether that mapping is exact)."""
    if qtype in FLOAT_TYPES:
        return FLOAT_TYPES[qtype], True
    if len(shape) != 2:
        return "float32", True  # a quantized vector: dequantized, as transformers does
    n, k = shape
    if qtype in INT4_TYPES and k % GROUP == 0 and n % 16 == 0:
        return "int4", qtype != Q.Q4_K
    return "int8", False


def row_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """transformers' reverse of llama.cpp's q/k permutation as row indices: out[r] = gguf_rows[perm[r]].
    llama.cpp stores each head's rows as (dim, 2) pairs; transformers reads them back as (2, dim)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(-1)


def _preadv(fd: int, buf: np.ndarray, offset: int) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def int4_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw rows of Q4_0/Q4_1/Q4_K blocks [R, row_bytes] -> (q uint8 [R, K] in 0..15, scale f16 [R, K/32],
    min f16 [R, K/32]) with w = q * scale + min. Exact for Q4_0 and Q4_1; Q4_K's scales are rounded to F16."""
    rows = raw.shape[0]
    if qtype == Q.Q4_K:
        blocks = raw.reshape(-1, 144)  # [B, 144]: d f16, dmin f16, 12 bytes of 6-bit scales/mins, 128 of nibbles
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [B, 8] each
        scale = (d * sc.astype(np.float32)).astype(np.float16)  # [B, 8]
        mn = (-(dmin * m.astype(np.float32))).astype(np.float16)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 15).reshape(rows, -1)  # 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1 (high)
    else:
        width = 18 if qtype == Q.Q4_0 else 20
        blocks = raw.reshape(-1, width)  # [B, width]: d f16, (Q4_1: m f16), 16 bytes of nibbles
        d = blocks[:, 0:2].copy().view(np.float16)  # [B, 1]
        if qtype == Q.Q4_0:  # w = (q - 8) * d
            scale, mn = d, (d.astype(np.float32) * -8).astype(np.float16)  # -8d is exact in f16
        else:  # w = q * d + m
            scale, mn = d, blocks[:, 2:4].copy().view(np.float16)
        qs = blocks[:, width - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).reshape(rows, -1)  # low nibbles: elements 0..15
    groups = q.shape[1] // GROUP
    return (torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(scale.reshape(rows, groups)),
            torch.from_numpy(mn.reshape(rows, groups)))


class GgufSource:
    """A GGUF file opened for conversion: ``config`` (transformers' config.json content), ``tensors`` (one
    ``SourceTensor`` per GGUF tensor, or per part of one the adapter splits, named as transformers names it),
    ``notes`` (the mapping, for people) and ``write_model_files`` (config and tokenizer). Use ``open_gguf``."""

    def __init__(self, path: Path, header: GgufHeader, config: dict[str, Any], family: Family,
                 parts: list[tuple[GgufTensor, str]], perms: dict[str, int], ignored: list[str],
                 offsets: dict[str, float]) -> None:
        self.path, self.header, self.config = path, header, config
        self._perm_heads = perms  # transformers name -> head count of its row permutation (llama q/k)
        self._offsets = offsets  # transformers name -> what transformers adds on load (Gemma's norms: -1)
        self.tensors: list[SourceTensor] = []
        for t, name in parts:  # a tensor of the file, or a part of one (an expert's rows), and its name
            auto, exact = auto_format(t.qtype, t.shape)
            if auto in QUANTIZED and not family.quantizable(name):
                auto, exact = "float32", True  # dequantized, as transformers does
            self.tensors.append(SourceTensor(name, t.shape, t.qtype.name, auto,
                                             functools.partial(self._read, t, name), exact))
        split = Counter(t.name for t, _ in parts)
        self.notes = self._notes(ignored)
        if stacked := {n: c for n, c in split.items() if c > 1}:
            self.notes.append(f"{len(stacked)} stacked tensors split into {sum(stacked.values())} matrices "
                              f"(one per expert), their rows read as stored")

    def _notes(self, ignored: list[str]) -> list[str]:
        def how(st: SourceTensor) -> str:
            if st.source_dtype not in ("F32", "F16", "BF16") and len(st.shape) != 2:
                return "dequantized vectors"
            return "exact" if st.exact else "requantized per channel" if st.auto == "int8" else "requantized"

        counts = Counter((st.source_dtype, st.auto, how(st)) for st in self.tensors)
        notes = [f"{dtype} -> {auto} ({kind}): {n} tensor{'s' if n != 1 else ''}"
                 for (dtype, auto, kind), n in sorted(counts.items())]
        small = [st.name for st in self.tensors if st.source_dtype in ("Q4_0", "Q4_1", "Q4_K") and st.auto == "int8"]
        if small:
            notes.append(f"int4 needs K % 32 == 0 and N % 16 == 0, so int8 for: {', '.join(small[:3])}"
                         + (f" and {len(small) - 3} more" if len(small) > 3 else ""))
        if self.config.get("tie_word_embeddings"):
            notes.append("no output.weight: the head is tied to model.embed_tokens.weight")
        if self._perm_heads:
            notes.append(f"q/k rows of {len(self._perm_heads)} tensors un-permuted (llama.cpp's rotary order)")
        if ignored:
            notes.append(f"ignored, as transformers does: {', '.join(ignored)}")
        return notes

    def write_model_files(self, folder: Path) -> None:
        """config.json and the tokenizer files (with the chat template) into ``folder``; reads no tensor."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        if "tokenizer.ggml.model" not in self.header.metadata:  # no tokenizer: the model takes token ids
            return
        try:
            tokenizer = _tokenizer(_identity(self.path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"{self.path.name}: transformers cannot read its tokenizer: {exc}",
                             code="MALFORMED_GGUF") from exc
        tokenizer.save_pretrained(folder)

    # -- reading tensors

    def _raw_rows(self, fd: int, t: GgufTensor, start: int, stop: int) -> np.ndarray:
        """Raw bytes of rows [start, stop) of a matrix (of the whole tensor for a vector): [rows, row_bytes]."""
        buf = np.empty((stop - start) * t.row_bytes, dtype=np.uint8)
        _preadv(fd, buf, t.offset + start * t.row_bytes)
        return buf.reshape(stop - start, t.row_bytes)

    def _read(self, t: GgufTensor, name: str, fmt: str) -> dict[str, torch.Tensor]:
        if os.stat(self.path).st_size != self.header.file_size:
            raise LocalError(f"{self.path.name} changed size since it was opened", code="MALFORMED_GGUF")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if len(t.shape) == 1:
                return self._read_vector(fd, t, name, fmt)
            return self._read_matrix(fd, t, name, fmt)
        finally:
            os.close(fd)

    def _read_vector(self, fd: int, t: GgufTensor, name: str, fmt: str) -> dict[str, torch.Tensor]:
        if fmt not in TORCH_DTYPES:
            raise ValueError(f"{name} is a vector: only float formats apply, not {fmt}")
        w = torch.from_numpy(dequantize(self._raw_rows(fd, t, 0, 1), t.qtype).reshape(t.shape))  # [N]
        if name in self._offsets:
            w = w + self._offsets[name]
        if name in self._perm_heads:
            w = w[row_permutation(t.shape[0], self._perm_heads[name])]
        return {name: w.to(TORCH_DTYPES[fmt]).contiguous()}

    def _read_matrix(self, fd: int, t: GgufTensor, name: str, fmt: str) -> dict[str, torch.Tensor]:
        n, k = t.shape
        if fmt == "int4" and k % GROUP:
            raise ValueError(f"{name}: int4 needs the input size to be a multiple of {GROUP}, got {k}")
        # the stored tensors, filled a slice of GGUF rows at a time
        if fmt in TORCH_DTYPES:
            out = {name: torch.empty(n, k, dtype=TORCH_DTYPES[fmt])}
        elif fmt == "int8":
            out = {name: torch.empty(n, k, dtype=torch.int8), name + SCALE: torch.empty(n, dtype=torch.float32)}
        elif fmt == "int4":
            out = {name: torch.empty(n, k // 2, dtype=torch.uint8),
                   name + SCALE: torch.empty(n, k // GROUP, dtype=torch.float16),
                   name + MIN: torch.empty(n, k // GROUP, dtype=torch.float16)}
        else:
            raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join((*FLOAT_DTYPES, *QUANTIZED))}")
        # where GGUF row s goes: the inverse of the row permutation (identity for most tensors)
        dest = None
        if name in self._perm_heads:
            dest = torch.argsort(row_permutation(n, self._perm_heads[name]))
        convert = self._converter(t, fmt)
        step = max(1, CHUNK // k)
        for start in range(0, n, step):
            stop = min(n, start + step)
            parts = convert(self._raw_rows(fd, t, start, stop))
            for target, part in zip(out.values(), parts, strict=True):
                if dest is None:
                    target[start:stop] = part
                else:
                    target.index_copy_(0, dest[start:stop], part)
        return out

    def _converter(self, t: GgufTensor, fmt: str) -> Callable[[np.ndarray], tuple[torch.Tensor, ...]]:
        """Raw GGUF rows [R, row_bytes] -> the stored tensors of those rows in format ``fmt``."""

        def floats(raw: np.ndarray) -> torch.Tensor:  # [R, K] float32, exactly as transformers dequantizes
            return torch.from_numpy(np.ascontiguousarray(dequantize(raw, t.qtype)))

        if fmt in TORCH_DTYPES:
            return lambda raw: (floats(raw).to(TORCH_DTYPES[fmt]),)
        if fmt == "int8":
            return lambda raw: quantize_int8_(floats(raw))
        if t.qtype in INT4_TYPES:  # keep the 4-bit values: exact for Q4_0/Q4_1
            def kept(raw: np.ndarray) -> tuple[torch.Tensor, ...]:
                q, scale, mn = int4_rows(raw, t.qtype)
                if not (scale.isfinite().all() and mn.isfinite().all()):  # |w| beyond F16's range: no real model
                    raise LocalError(f"{t.name}: {t.qtype.name} scales overflow F16 as int4", code="CONVERSION_FAILED")
                return pack_int4(q), scale, mn
            return kept
        return lambda raw: quantize_int4(floats(raw))


def _identity(path: Path) -> tuple[str, int, int]:
    """What a cache of a file's metadata is keyed by: the file as it is now (another file, or this one
    changed, is read again)."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_config(path: Path) -> dict[str, Any]:
    """transformers' config for a GGUF file (its metadata only), as config.json content."""
    return json.loads(_config_json(_identity(path)))  # a fresh dict for every caller


@functools.lru_cache(maxsize=4)
def _config_json(key: tuple[str, int, int]) -> str:
    """Reading a GGUF's metadata through transformers parses its whole vocabulary (seconds for 49k tokens):
    done once per file per process, also when the same file is added in two formats."""
    from transformers import AutoConfig

    path = Path(key[0])
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise malformed(path, f"transformers cannot read its metadata: {exc}") from exc
    out = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if not k.startswith("_")}
    family = BY_MODEL_TYPE.get(out.get("model_type"))
    if family is not None and not out.get("architectures"):
        out["architectures"] = [family.causal_lm[out["model_type"]]]
    return json.dumps(out)


@functools.lru_cache(maxsize=2)
def _tokenizer(key: tuple[str, int, int]) -> Any:
    """The GGUF's tokenizer as transformers builds it from the metadata (once per file per process)."""
    from transformers import AutoTokenizer

    path = Path(key[0])
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def split_tensor(path: Path, t: GgufTensor, shapes: list[tuple[int, ...]]) -> list[GgufTensor]:
    """A tensor's parts of HF-order ``shapes`` (``Family.gguf_parts``) as tensors of their own: equal consecutive
    slices of its data, each of whole rows (the last dimension kept), at its own offset. One part of the
    tensor's own shape is the tensor itself."""
    if shapes == [t.shape]:
        return [t]
    size, total = t.nbytes // len(shapes), math.prod(t.shape)
    if any(len(s) != 2 or s[-1] != t.shape[-1] or math.prod(s) * len(shapes) != total for s in shapes):
        raise malformed(path, f"tensor {t.name} {list(t.shape)} cannot be read as {len(shapes)} parts of "
                              f"{sorted({tuple(s) for s in shapes})}")
    return [GgufTensor(t.name, t.qtype, tuple(s), t.offset + i * size, size) for i, s in enumerate(shapes)]


def open_gguf(path: Path) -> GgufSource:
    """Open a GGUF file for conversion: header and metadata only. Raises LocalError MALFORMED_GGUF (truncated or
    corrupt), UNSUPPORTED_ARCHITECTURE or UNSUPPORTED_QUANTIZATION before any tensor is read."""
    path = Path(path)
    try:
        header = read_header(path)
    except OSError as exc:
        raise malformed(path, str(exc)) from exc
    arch = header.metadata.get("general.architecture")
    family = BY_GGUF_ARCH.get(arch)
    if family is None:
        raise LocalError(f"{path.name}: GGUF architecture {arch!r} cannot be converted; supported: "
                         f"{', '.join(sorted(BY_GGUF_ARCH))} (add other models from a Hugging Face folder)",
                         code="UNSUPPORTED_ARCHITECTURE")
    bad = [t for t in header.tensors if t.qtype not in SUPPORTED]
    if bad:
        kinds = sorted({t.qtype.name for t in bad})
        raise LocalError(f"{path.name}: GGUF type {', '.join(kinds)} cannot be converted (tensor {bad[0].name}"
                         + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                         + f"); supported: {', '.join(t.name for t in SUPPORTED)}", code="UNSUPPORTED_QUANTIZATION")
    parts: list[tuple[GgufTensor, str]] = []  # (a tensor of the file or a part of one, its transformers name)
    ignored: list[str] = []
    perms: dict[str, int] = {}
    offsets: dict[str, float] = {}
    for t in header.tensors:
        if t.name in family.gguf_ignored:
            ignored.append(t.name)
            continue
        mapped = family.gguf_parts(t.name, t.shape)
        if not mapped:
            raise LocalError(f"{path.name}: tensor {t.name} {list(t.shape)} has no place in a {arch} model",
                             code="UNSUPPORTED_ARCHITECTURE")
        views = split_tensor(path, t, [shape for _, shape in mapped])
        for view, (hf, _) in zip(views, mapped, strict=True):
            parts.append((view, hf))
            if (heads := family.gguf_permuted_heads(arch, t.name, header.metadata)) is not None:
                if not isinstance(heads, int) or heads <= 0 or view.shape[0] % (2 * heads):
                    raise malformed(path, f"tensor {t.name} has {view.shape[0]} rows, not a whole number of "
                                          f"rotary pairs for {heads} heads")
                perms[hf] = heads
            if offset := family.gguf_offset(hf):
                offsets[hf] = offset
    config = load_config(path)  # (a "llama" file may read as mistral: names and fix-ups follow the file's arch)
    if config.get("model_type") not in BY_MODEL_TYPE:
        raise LocalError(f"{path.name}: transformers reads it as {config.get('model_type')!r}, not one of "
                         f"{', '.join(sorted(BY_MODEL_TYPE))}", code="UNSUPPORTED_ARCHITECTURE")
    # transformers 5.24 ignores some archs' key length (qwen3 keeps its default head_dim of 128): the file says it
    key_length, fixed = header.metadata.get(f"{arch}.attention.key_length"), None
    if isinstance(key_length, int) and key_length > 0 and config.get("head_dim") not in (None, key_length):
        fixed = f"head_dim {key_length} from {arch}.attention.key_length (transformers read {config['head_dim']})"
        config["head_dim"] = key_length
    sized = family.gguf_config(config, {hf: view.shape for view, hf in parts})
    source = GgufSource(path, header, config, family, parts, perms, ignored, offsets)
    source.notes += ([fixed] if fixed else []) + sized
    return source

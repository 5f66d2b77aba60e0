"""Per-layer shards on disk: split a model folder into one safetensors file per layer, addressed by its
SHA256, and verify shard files against a manifest.

Splitting copies byte ranges: each shard's header is written from the source header (tensor names sorted,
offsets contiguous, padded to 8 bytes like the reference writer) and the tensor bytes are streamed from the
source files in chunks while being hashed, whole and per piece (``storage.pieces``). No tensor is decoded,
any dtype works (bf16 included), memory stays flat, and the same model always gives the same shards (the
hashes are reproducible).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from mesh.errors import LocalError, PeerError
from mesh.identity import Identity
from storage.manifest import Manifest, ManifestFile, Shard, ShardTensor
from storage.metadata import ModelMetadata, TensorInfo
from storage.pieces import PIECE_SIZE, PieceHasher, piece_size_for

CHUNK = 1 << 20
SHARD_SUFFIX = ".safetensors"
#: Files besides the weights that a peer needs to run a model, when the source has them.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)


class ShardSizeMismatch(PeerError):
    code = "SHARD_SIZE_MISMATCH"


class ShardHashMismatch(PeerError):
    code = "SHARD_HASH_MISMATCH"


class Written(NamedTuple):
    """A file as it was written: its size, SHA256 and piece hashes (at ``piece_size``)."""

    size: int
    sha256: str
    pieces: bytes
    piece_size: int


def shard_path(shard_dir: Path, sha256: str) -> Path:
    return shard_dir / f"{sha256}{SHARD_SUFFIX}"


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, hex SHA256) of a file, read in chunks."""
    written = hash_file(path, 0)
    return written.size, written.sha256


def hash_file(path: Path, piece_size: int) -> Written:
    """A file's size, SHA256 and (``piece_size`` > 0) piece hashes, read in chunks."""
    h, size, pieces = hashlib.sha256(), 0, PieceHasher(piece_size or CHUNK)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if piece_size:
                pieces.update(chunk)
            size += len(chunk)
    return Written(size, h.hexdigest(), pieces.digests() if piece_size else b"", piece_size)


def _shard_header(layer_name: str, tensors: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The safetensors header of a shard: (name, dtype, shape, nbytes) in the order the data follows."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "meshnode.layer": layer_name}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(layer_name: str, head: bytes, chunks: Iterator[bytes], shard_dir: Path, piece_size: int) -> Written:
    """Write a shard (header, then the data ``chunks`` yields) into ``shard_dir``: temp file, fsync, rename
    to its hash. A failure (a short source, a full disk) leaves no file behind."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir / f".{layer_name}.{os.getpid()}.tmp"
    h, size, pieces = hashlib.sha256(), 0, PieceHasher(piece_size)
    try:
        with open(tmp, "wb") as out:
            for chunk in itertools.chain([head], chunks):
                out.write(chunk)
                h.update(chunk)
                pieces.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        os.replace(tmp, shard_path(shard_dir, digest))  # same bytes, same name: a re-split is a no-op
    finally:
        tmp.unlink(missing_ok=True)
    return Written(size, digest, pieces.digests(), piece_size)


def write_shard(folder: Path, layer_name: str, tensors: Iterable[TensorInfo], shard_dir: Path,
                piece_size: int = PIECE_SIZE) -> Written:
    """One layer's shard copied byte for byte from a safetensors folder."""
    ordered = sorted(tensors, key=lambda t: t.name)

    def chunks() -> Iterator[bytes]:
        for t in ordered:
            with open(folder / t.file, "rb") as src:
                src.seek(t.data_start + t.start)
                left = t.nbytes
                while left:
                    chunk = src.read(min(CHUNK, left))
                    if not chunk:
                        raise PeerError(f"{t.file} ends inside tensor {t.name}", code="MALFORMED_SAFETENSORS")
                    left -= len(chunk)
                    yield chunk

    head = _shard_header(layer_name, [(t.name, t.dtype, t.shape, t.nbytes) for t in ordered])
    return _write(layer_name, head, chunks(), shard_dir, piece_size)


def shard_bytes(layer_name: str, tensors: Iterable[TensorInfo]) -> int:
    """The size of the shard ``write_shard`` or ``write_produced_shard`` makes of these tensors."""
    infos = sorted(tensors, key=lambda t: t.name)
    return len(_shard_header(layer_name, [(t.name, t.dtype, t.shape, t.nbytes) for t in infos])) + sum(
        t.nbytes for t in infos)


def write_produced_shard(layer_name: str, tensors: Iterable[TensorInfo], produce: Callable[[str], bytes],
                         shard_dir: Path, piece_size: int = PIECE_SIZE) -> Written:
    """One layer's shard whose tensor bytes come from ``produce(name)``, called once per tensor in the
    shard's (sorted) order, each checked to be exactly the size its header says."""
    ordered = sorted(tensors, key=lambda t: t.name)

    def chunks() -> Iterator[bytes]:
        for t in ordered:
            data = produce(t.name)
            if len(data) != t.nbytes:
                raise LocalError(f"{t.name}: produced {len(data)} bytes, its header says {t.nbytes}",
                                 code="CONVERSION_FAILED")
            yield data

    head = _shard_header(layer_name, [(t.name, t.dtype, t.shape, t.nbytes) for t in ordered])
    return _write(layer_name, head, chunks(), shard_dir, piece_size)


def manifest_of(folder: Path, meta: ModelMetadata, written: list[Written], *, model_id: str, revision: str,
                identity: Identity, weights: str = "auto", notes: Sequence[str] = (), shard_dir: Path | None = None,
                ) -> Manifest:
    """The manifest of a model whose layer ``i`` was written as shard ``written[i]``; the model files (config,
    tokenizer) are taken from ``folder``. Its piece size is the one the shards were hashed at, unless the
    model is too large for that many piece hashes (``piece_size_for``): then the shards in ``shard_dir`` are
    read again at the larger size. Sign it with ``seal_manifest``."""
    names = [name for name in MODEL_FILES if (folder / name).is_file()]
    preferred = written[0].piece_size if written else PIECE_SIZE
    piece_size = piece_size_for([w.size for w in written] + [(folder / n).stat().st_size for n in names], preferred)
    if piece_size != preferred:
        if shard_dir is None:
            raise ValueError(f"shards hashed at {preferred}-byte pieces need {piece_size}: give shard_dir")
        written = [hash_file(shard_path(shard_dir, w.sha256), piece_size) for w in written]
    shards = []
    for layer, (size, digest, pieces, _) in zip(meta.layers, written, strict=True):
        infos = sorted((meta.tensors[name] for name in layer.tensors), key=lambda t: t.name)
        shards.append(Shard(
            index=layer.index, name=layer.name, kind=layer.kind, layer_start=layer.index, layer_end=layer.index + 1,
            tensors=tuple(ShardTensor(t.name, t.dtype, t.shape) for t in infos),
            size=size, sha256=digest, params=layer.params, memory_bytes=layer.memory_bytes,
            kv_bytes_per_token=layer.kv_bytes_per_token, flops_base=layer.flops_base,
            flops_per_context=layer.flops_per_context, tied_to=layer.tied_to, format=layer.format, pieces=pieces,
        ))
    files = []
    for name in names:
        size, digest, pieces, _ = hash_file(folder / name, piece_size)
        files.append(ManifestFile(name, size, digest, pieces))
    config = next(f for f in files if f.path == "config.json")
    return Manifest(model_id=model_id, revision=revision, family=meta.arch.family, config_sha256=config.sha256,
                    created_by=identity.node_id, shards=tuple(shards), files=tuple(files), weights=weights,
                    compute=meta.compute, notes=tuple(notes), piece_size=piece_size)


def split_model(folder: Path, meta: ModelMetadata, shard_dir: Path, *, model_id: str, revision: str,
                identity: Identity, piece_size: int = PIECE_SIZE) -> Manifest:
    """Write every layer's shard byte for byte and return the manifest describing them."""
    written = [write_shard(folder, layer.name, [meta.tensors[n] for n in layer.tensors], shard_dir, piece_size)
               for layer in meta.layers]
    return manifest_of(folder, meta, written, model_id=model_id, revision=revision, identity=identity,
                       shard_dir=shard_dir)


def verify_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Raise ShardSizeMismatch / ShardHashMismatch unless ``path`` has exactly this size and hash."""
    actual = path.stat().st_size
    if actual != size:
        raise ShardSizeMismatch(f"{what}: {actual} bytes, the manifest says {size}")
    _, digest = sha256_file(path)
    if digest != sha256:
        raise ShardHashMismatch(f"{what}: SHA256 {digest[:16]}..., the manifest says {sha256[:16]}...")


def verify_shard(shard_dir: Path, shard: Shard) -> Path:
    path = shard_path(shard_dir, shard.sha256)
    verify_file(path, shard.size, shard.sha256, f"shard {shard.name}")
    return path

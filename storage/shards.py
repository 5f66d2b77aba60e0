"""Per-layer shards on disk: split a model folder into one safetensors file per layer, addressed by its
SHA256, and verify shard files against a manifest.

Splitting copies byte ranges: each shard's header is written from the source header (tensor names sorted,
offsets contiguous, padded to 8 bytes like the reference writer) and the tensor bytes are streamed from the
source files in chunks while being hashed. No tensor is decoded, any dtype works (bf16 included), memory
stays flat, and the same model always gives the same shards (the hashes are reproducible).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mesh.errors import LocalError, PeerError
from mesh.identity import Identity
from storage.manifest import Manifest, ManifestFile, Shard, ShardTensor
from storage.metadata import ModelMetadata, TensorInfo

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


def shard_path(shard_dir: Path, sha256: str) -> Path:
    return shard_dir / f"{sha256}{SHARD_SUFFIX}"


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, hex SHA256) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


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


def _write(layer_name: str, head: bytes, chunks: Iterator[bytes], shard_dir: Path) -> tuple[int, str]:
    """Write a shard (header, then the data ``chunks`` yields) into ``shard_dir``: temp file, fsync, rename
    to its hash. A failure (a short source, a full disk) leaves no file behind."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir / f".{layer_name}.{os.getpid()}.tmp"
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for chunk in itertools.chain([head], chunks):
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        os.replace(tmp, shard_path(shard_dir, digest))  # same bytes, same name: a re-split is a no-op
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest


def write_shard(folder: Path, layer_name: str, tensors: Iterable[TensorInfo], shard_dir: Path) -> tuple[int, str]:
    """One layer's shard copied byte for byte from a safetensors folder; (size, sha256)."""
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
    return _write(layer_name, head, chunks(), shard_dir)


def write_produced_shard(layer_name: str, tensors: Iterable[TensorInfo], produce: Callable[[str], bytes],
                         shard_dir: Path) -> tuple[int, str]:
    """One layer's shard whose tensor bytes come from ``produce(name)``, called once per tensor in the
    shard's (sorted) order, each checked to be exactly the size its header says; (size, sha256)."""
    ordered = sorted(tensors, key=lambda t: t.name)

    def chunks() -> Iterator[bytes]:
        for t in ordered:
            data = produce(t.name)
            if len(data) != t.nbytes:
                raise LocalError(f"{t.name}: produced {len(data)} bytes, its header says {t.nbytes}",
                                 code="CONVERSION_FAILED")
            yield data

    head = _shard_header(layer_name, [(t.name, t.dtype, t.shape, t.nbytes) for t in ordered])
    return _write(layer_name, head, chunks(), shard_dir)


def manifest_of(folder: Path, meta: ModelMetadata, written: list[tuple[int, str]], *, model_id: str,
                revision: str, identity: Identity, weights: str = "auto", notes: Sequence[str] = ()) -> Manifest:
    """The manifest of a model whose layer ``i`` was written as shard ``written[i]`` (size, sha256); the
    model files (config, tokenizer) are taken from ``folder``. Sign it with ``seal_manifest``."""
    shards = []
    for layer, (size, digest) in zip(meta.layers, written, strict=True):
        infos = sorted((meta.tensors[name] for name in layer.tensors), key=lambda t: t.name)
        shards.append(Shard(
            index=layer.index, name=layer.name, kind=layer.kind, layer_start=layer.index, layer_end=layer.index + 1,
            tensors=tuple(ShardTensor(t.name, t.dtype, t.shape) for t in infos),
            size=size, sha256=digest, params=layer.params, memory_bytes=layer.memory_bytes,
            kv_bytes_per_token=layer.kv_bytes_per_token, flops_base=layer.flops_base,
            flops_per_context=layer.flops_per_context, tied_to=layer.tied_to, format=layer.format,
        ))
    files = []
    for name in MODEL_FILES:
        if (folder / name).is_file():
            size, digest = sha256_file(folder / name)
            files.append(ManifestFile(name, size, digest))
    config = next(f for f in files if f.path == "config.json")
    return Manifest(model_id=model_id, revision=revision, family=meta.arch.family, config_sha256=config.sha256,
                    created_by=identity.node_id, shards=tuple(shards), files=tuple(files), weights=weights,
                    compute=meta.compute, notes=tuple(notes))


def split_model(folder: Path, meta: ModelMetadata, shard_dir: Path, *, model_id: str, revision: str,
                identity: Identity) -> Manifest:
    """Write every layer's shard byte for byte and return the manifest describing them."""
    written = [write_shard(folder, layer.name, [meta.tensors[n] for n in layer.tensors], shard_dir)
               for layer in meta.layers]
    return manifest_of(folder, meta, written, model_id=model_id, revision=revision, identity=identity)


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

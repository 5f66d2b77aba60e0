"""Shard manifests: what a model version consists of, signed by the peer that made it. Pure (no I/O).

A manifest lists the model id and revision, the SHA256 of its config, every shard (one layer each:
layer index and range, tensor names, dtypes, shapes, byte size, SHA256, and the layer's planning numbers)
and the other files a peer needs to run it (config, tokenizer, chat template) with their sizes and
hashes. It travels as a signed envelope (``mesh.wire.seal``, kind ``manifest``); the receiver checks the
signature, that ``created_by`` is the node id of the signing key, every field's type and bound, and then
each shard's size and hash before use.

Version 2 adds piece hashes (``storage.pieces``): ``piece_size`` at the top and per shard and file
``pieces``, the SHA256 of each piece, so a resumed or damaged file is checked piece by piece. A manifest
without them is still written (and read) as version 1, byte for byte as before: manifests signed by older
peers stay readable, and their files are checked whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cbor2

from mesh.errors import DecodeError, PeerError
from mesh.identity import Identity, node_id_for_key
from mesh.ids import NodeId
from mesh.wire import Reader, loads_cbor, open_envelope, seal
from storage.formats import COMPUTE_DTYPES
from storage.pieces import DIGEST, MAX_PIECES, piece_count, valid_piece_size

MANIFEST = "manifest"
#: Written when the manifest has piece hashes; ``VERSIONS`` are the ones read (1: no piece hashes).
MANIFEST_VERSION = 2
VERSIONS = (1, 2)
#: A manifest of a 400B-class model (~130 layers, ~10 tensors each) is ~100 KiB; this leaves room.
MAX_MANIFEST = 4 * 2**20
MAX_SHARDS = 4096
MAX_TENSORS_PER_SHARD = 1024
MAX_FILES = 64
MAX_DIMS = 8
MAX_NOTES = 32


class ManifestSignerMismatch(PeerError):
    """The manifest claims to be made by one node but is signed by another key."""

    code = "MANIFEST_SIGNER_MISMATCH"


@dataclass(frozen=True, slots=True)
class ShardTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Shard:
    index: int  # position in the manifest's shard list (pipeline order)
    name: str  # "embedding", "block.N", "norm", "head"
    kind: str
    layer_start: int  # the layers it holds, half-open [start, end)
    layer_end: int
    tensors: tuple[ShardTensor, ...]
    size: int  # bytes of the shard file
    sha256: str  # hex; the shard's file name in the store is "<sha256>.safetensors"
    params: int = 0
    memory_bytes: int = 0  # weights needed in memory to run it (tied weights included)
    kv_bytes_per_token: int = 0
    flops_base: int = 0  # FLOPs per token = flops_base + flops_per_context * sequence length
    flops_per_context: int = 0
    tied_to: str | None = None  # a head without weights of its own uses this shard's weights
    format: str = ""  # the weight format of its matrices: "int4", "int4+int8", "bfloat16" (storage.formats)
    pieces: bytes = b""  # SHA256 of each piece of the file (32 bytes each), b"" in a version-1 manifest


@dataclass(frozen=True, slots=True)
class ManifestFile:
    path: str  # a plain file name in the model folder: config.json, tokenizer.json, ...
    size: int
    sha256: str
    pieces: bytes = b""  # as Shard.pieces


@dataclass(frozen=True, slots=True)
class Manifest:
    model_id: str
    revision: str
    family: str
    config_sha256: str
    created_by: NodeId
    shards: tuple[Shard, ...]
    files: tuple[ManifestFile, ...]
    weights: str = "auto"  # what ``models add --weights`` asked for
    compute: str = "float32"  # the compute dtype its formats call for (a plan may override it)
    notes: tuple[str, ...] = ()  # how the source's tensors were mapped ("Q8_0 -> int8 (requantized ...)")
    piece_size: int = 0  # bytes per piece of every shard and file's ``pieces``; 0: no piece hashes (version 1)

    @property
    def formats(self) -> tuple[str, ...]:
        """The distinct formats of its weight matrices, sorted (``("float32",)``, ``("int4", "int8")``); the
        final norm's vectors do not count."""
        return tuple(sorted({f for s in self.shards if s.format and s.kind != "norm" for f in s.format.split("+")}))

    @property
    def total_layers(self) -> int:
        return max((s.layer_end for s in self.shards), default=0)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards) + sum(f.size for f in self.files)


def encode_manifest(m: Manifest) -> bytes:
    """Version 2 with piece hashes; without them (``piece_size`` 0) version 1, exactly as older peers wrote it."""
    pieces = bool(m.piece_size)
    shards = [{
        "index": s.index, "name": s.name, "kind": s.kind, "layers": [s.layer_start, s.layer_end],
        "tensors": [[t.name, t.dtype, list(t.shape)] for t in s.tensors], "size": s.size, "sha256": s.sha256,
        "params": s.params, "memory_bytes": s.memory_bytes, "kv_bytes_per_token": s.kv_bytes_per_token,
        "flops_base": s.flops_base, "flops_per_context": s.flops_per_context, "tied_to": s.tied_to,
        "format": s.format, **({"pieces": s.pieces} if pieces else {}),
    } for s in m.shards]
    files = [{"path": f.path, "size": f.size, "sha256": f.sha256, **({"pieces": f.pieces} if pieces else {})}
             for f in m.files]
    return cbor2.dumps({
        "version": MANIFEST_VERSION if pieces else 1, "model_id": m.model_id, "revision": m.revision,
        "family": m.family, "config_sha256": m.config_sha256, "created_by": m.created_by,
        "shards": shards, "files": files, "weights": m.weights, "compute": m.compute, "notes": list(m.notes),
        **({"piece_size": m.piece_size} if pieces else {}),
    })


def seal_manifest(m: Manifest, identity: Identity) -> bytes:
    if m.created_by != identity.node_id:
        raise ValueError("a manifest is signed by the node it names as created_by")
    return seal(MANIFEST, encode_manifest(m), identity)


def open_manifest(data: bytes) -> Manifest:
    """Verify and decode a signed manifest. Raises a PeerError with a code on any defect:
    MESSAGE_TOO_LARGE, MALFORMED_MESSAGE, BAD_SIGNATURE, UNKNOWN_MESSAGE_KIND, MANIFEST_SIGNER_MISMATCH."""
    env = open_envelope(data, limit=MAX_MANIFEST)
    if env.kind != MANIFEST:
        raise DecodeError(f"expected a manifest, got {env.kind!r}", code="UNKNOWN_MESSAGE_KIND")
    m = decode_manifest(env.payload)
    signer = node_id_for_key(env.public_key)
    if signer != m.created_by:
        raise ManifestSignerMismatch(f"manifest claims to be made by {m.created_by} but is signed by {signer}")
    return m


def decode_manifest(payload: bytes) -> Manifest:
    r = Reader(loads_cbor(payload, MAX_MANIFEST), "manifest")
    version = r.integer("version")
    if version not in VERSIONS:
        raise DecodeError(f"manifest version {version} is not supported", code="UNSUPPORTED_VERSION")
    piece_size = 0
    if version >= 2:
        piece_size = r.integer("piece_size")
        if not valid_piece_size(piece_size):
            raise DecodeError(f"manifest.piece_size: {piece_size} is not a power of two in the allowed range")
    shards = r.array("shards", functools.partial(_shard, piece_size=piece_size), limit=MAX_SHARDS, required=True)
    files = r.array("files", functools.partial(_file, piece_size=piece_size), limit=MAX_FILES, required=True)
    if piece_size and sum(len(x.pieces) for x in (*shards, *files)) > MAX_PIECES * DIGEST:
        raise DecodeError(f"manifest: more than {MAX_PIECES} piece hashes")
    if [s.index for s in shards] != list(range(len(shards))):
        raise DecodeError("manifest.shards: indexes must be 0, 1, 2, ... in order")
    expected_start = 0
    for s in shards:
        if s.layer_start != expected_start or s.layer_end <= s.layer_start:
            raise DecodeError(f"manifest.shards[{s.index}]: layers must be contiguous and non-empty")
        expected_start = s.layer_end
    if len({f.path for f in files}) != len(files):
        raise DecodeError("manifest.files: a path appears twice")
    compute = r.opt_text("compute") or "float32"
    if compute not in COMPUTE_DTYPES:
        raise DecodeError(f"manifest.compute: {compute!r} is not one of {COMPUTE_DTYPES}")
    notes = r.array("notes", _note, limit=MAX_NOTES)
    return Manifest(
        model_id=r.text("model_id"), revision=r.text("revision"), family=r.text("family"),
        config_sha256=_hex(r.text("config_sha256"), "manifest.config_sha256"),
        created_by=NodeId(r.text("created_by")), shards=shards, files=files,
        weights=r.opt_text("weights") or "auto", compute=compute, notes=notes, piece_size=piece_size,
    )


def _pieces(r: Reader, where: str, size: int, piece_size: int) -> bytes:
    """A file's piece hashes (version 2): exactly one 32-byte digest per piece."""
    if not piece_size:
        return b""
    pieces = r.blob("pieces")
    if len(pieces) != piece_count(size, piece_size) * DIGEST:
        raise DecodeError(f"{where}.pieces: {len(pieces)} bytes, expected {piece_count(size, piece_size)} "
                          f"digests of {DIGEST} bytes")
    return pieces


def _note(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or len(raw) > 256:
        raise DecodeError(f"{where}: expected a string of at most 256 characters")
    return raw


def _hex(v: str, where: str) -> str:
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise DecodeError(f"{where}: expected 64 lower-case hex digits")
    return v


def _count(r: Reader, key: str) -> int:
    v = r.integer(key, 0)
    if v < 0:
        raise DecodeError(f"{key} must not be negative")
    return v


def _shard(raw: Any, where: str, *, piece_size: int) -> Shard:
    r = Reader(raw, where)
    layers = r.raw("layers")
    if not (isinstance(layers, list) and len(layers) == 2 and all(type(x) is int and x >= 0 for x in layers)):
        raise DecodeError(f"{where}.layers: expected [start, end]")
    tensors_raw = r.raw("tensors")
    if not isinstance(tensors_raw, list) or len(tensors_raw) > MAX_TENSORS_PER_SHARD:
        raise DecodeError(f"{where}.tensors: expected an array of at most {MAX_TENSORS_PER_SHARD}")
    tensors = []
    for i, t in enumerate(tensors_raw):
        ok = (isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and 0 < len(t[0]) <= 256
              and isinstance(t[1], str) and len(t[1]) <= 16 and isinstance(t[2], list) and len(t[2]) <= MAX_DIMS
              and all(type(d) is int and 0 <= d < 2**40 for d in t[2]))
        if not ok:
            raise DecodeError(f"{where}.tensors[{i}]: expected [name, dtype, shape]")
        tensors.append(ShardTensor(t[0], t[1], tuple(t[2])))
    size = _count(r, "size")
    if size == 0:
        raise DecodeError(f"{where}.size: a shard file is never empty")
    return Shard(
        index=r.integer("index"), name=r.text("name"), kind=r.text("kind"), layer_start=layers[0],
        layer_end=layers[1], tensors=tuple(tensors), size=size, sha256=_hex(r.text("sha256"), f"{where}.sha256"),
        params=_count(r, "params"), memory_bytes=_count(r, "memory_bytes"),
        kv_bytes_per_token=_count(r, "kv_bytes_per_token"), flops_base=_count(r, "flops_base"),
        flops_per_context=_count(r, "flops_per_context"), tied_to=r.opt_text("tied_to"),
        format=r.opt_text("format") or "", pieces=_pieces(r, where, size, piece_size),
    )


def _file(raw: Any, where: str, *, piece_size: int) -> ManifestFile:
    r = Reader(raw, where)
    path = r.text("path")
    if not path or "/" in path or "\\" in path or path.startswith(".") or "\x00" in path:
        raise DecodeError(f"{where}.path: {path!r} is not a plain file name")
    size = _count(r, "size")
    return ManifestFile(path, size, _hex(r.text("sha256"), f"{where}.sha256"), _pieces(r, where, size, piece_size))

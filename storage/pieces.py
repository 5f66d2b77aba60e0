"""Piece hashes: the SHA256 of every fixed-size piece of a shard or model file, listed in its manifest, so a
resumed file is checked before its bytes are trusted and a corrupt piece costs that piece, not the file.
Pure (hashlib only).

A file of ``size`` bytes has ``ceil(size / piece_size)`` pieces; the last may be short. The manifest keeps
them as one byte string per file (32-byte digests, in order). ``PieceHasher`` makes them while a file is
written; ``PieceCheck`` checks a file's bytes as they arrive (or as a partial file is re-read) and rewinds to
the end of the last good piece when one does not match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from mesh.errors import PeerError

#: The default piece: at 10 MB/s, under half a second to fetch again; 256 per GiB of weights.
PIECE_SIZE = 4 * 2**20
#: The bounds a manifest's piece size must keep (a power of two): smaller pieces would cost more hashes than
#: bytes saved; larger ones no longer limit what a corrupt byte costs.
MIN_PIECE_SIZE = 64 * 2**10
MAX_PIECE_SIZE = 2**30
#: Piece hashes one manifest may list: 2 MiB of digests, half the 4 MiB manifest limit (256 GiB of files at
#: 4 MiB pieces; a larger model gets larger pieces, ``piece_size_for``).
MAX_PIECES = 2**16
DIGEST = 32  # bytes of one SHA256


class PieceHashMismatch(PeerError):
    """A piece of a file differs from its manifest's piece hash: those bytes are dropped, the piece is fetched
    again (from the next holder). The code is the shard's: its bytes are not what the manifest says."""

    code = "SHARD_HASH_MISMATCH"

    def __init__(self, message: str, *, index: int, offset: int) -> None:
        super().__init__(message)
        self.index = index  # which piece
        self.offset = offset  # where it starts: the file is good up to here


def piece_count(size: int, piece_size: int) -> int:
    return -(-size // piece_size)


def piece_size_for(sizes: Iterable[int], preferred: int = PIECE_SIZE) -> int:
    """The piece size for files of ``sizes``: ``preferred``, doubled until their pieces fit ``MAX_PIECES``."""
    sizes = list(sizes)
    size = preferred
    while size < MAX_PIECE_SIZE and sum(piece_count(s, size) for s in sizes) > MAX_PIECES:
        size *= 2
    return size


def valid_piece_size(size: int) -> bool:
    return MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE and size & (size - 1) == 0


class PieceHasher:
    """The piece hashes of bytes fed in order (``update``), however they are chunked."""

    def __init__(self, piece_size: int) -> None:
        self.piece_size = piece_size
        self._digests: list[bytes] = []
        self._piece = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_size - self._filled)
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_size:
                self._digests.append(self._piece.digest())
                self._piece, self._filled = hashlib.sha256(), 0

    def digests(self) -> bytes:
        """Every piece's digest, the short last one included."""
        tail = [self._piece.digest()] if self._filled else []
        return b"".join(self._digests + tail)


class PieceCheck:
    """A file's bytes as they arrive, from ``position`` 0 on: its whole SHA256, and each piece against its
    manifest digest as soon as the piece is complete. ``verified`` is where the last good piece ends (with no
    piece hashes, an older manifest, everything is trusted until the whole file's hash at the end)."""

    def __init__(self, size: int, sha256: str, piece_size: int = 0, pieces: bytes = b"") -> None:
        if piece_size and len(pieces) != piece_count(size, piece_size) * DIGEST:
            raise ValueError(f"{len(pieces)} bytes of piece hashes for {piece_count(size, piece_size)} pieces")
        self.size, self.sha256 = size, sha256
        self.piece_size, self.pieces = (piece_size, pieces) if pieces else (0, b"")
        self.position = 0
        self.verified = 0
        self._file: Any = hashlib.sha256()
        self._good: Any = self._file.copy()  # the file's hash state at ``verified``
        self._piece: Any = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        """Take the next bytes. PieceHashMismatch when one completes a piece that does not match: the state is
        then back at ``verified``, the start of that piece (the caller drops what it holds past it)."""
        if self.position + len(data) > self.size:
            raise ValueError(f"{self.position + len(data)} bytes of a {self.size}-byte file")
        if not self.piece_size:
            self._file.update(data)
            self.position += len(data)
            self.verified = self.position
            return
        view = memoryview(data)
        while view:
            end = min(self.size, (self.position // self.piece_size + 1) * self.piece_size)
            take = min(len(view), end - self.position)
            self._file.update(view[:take])
            self._piece.update(view[:take])
            self.position += take
            view = view[take:]
            if self.position == end:
                self._end_piece()

    def _end_piece(self) -> None:
        index = (self.position - 1) // self.piece_size
        want = self.pieces[index * DIGEST:(index + 1) * DIGEST]
        got = self._piece.digest()
        self._piece = hashlib.sha256()
        if got != want:
            start = self.verified
            self.position = start
            self._file = self._good.copy()
            raise PieceHashMismatch(f"piece {index} (bytes {start}..{start + self.piece_size}) has SHA256 "
                                    f"{got.hex()[:16]}..., the manifest says {want.hex()[:16]}...",
                                    index=index, offset=start)
        self.verified = self.position
        self._good = self._file.copy()

    def hexdigest(self) -> str:
        return str(self._file.hexdigest())

    def complete(self) -> bool:
        """Every byte is here and the whole file's SHA256 is the manifest's."""
        return self.position == self.size and self.hexdigest() == self.sha256

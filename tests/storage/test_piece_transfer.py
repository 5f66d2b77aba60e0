"""Piece hashes on the wire, between real libp2p hosts on 127.0.0.1 in this process with real stores: a corrupt
piece at a holder costs that piece (the next holder sends the rest, from the piece's start), a resumed partial
file is checked piece by piece before its bytes are trusted, and a model whose manifest has no piece hashes
(version 1, as older peers sign them) still transfers, checked whole."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from tiny_models import tiny_llama

from mesh.identity import Identity
from mesh.transport import Transport
from storage.manifest import Manifest, seal_manifest
from storage.pieces import MIN_PIECE_SIZE
from storage.shards import sha256_file, shard_path
from storage.store import MANIFEST_FILE, Store
from storage.transfer import Fetcher, Job, Server

pytestmark = pytest.mark.integration
LISTEN = ["/ip4/127.0.0.1/tcp/0"]
PIECE = MIN_PIECE_SIZE


@dataclasses.dataclass
class Peer:
    transport: Transport
    store: Store
    fetcher: Fetcher


@asynccontextmanager
async def peer(root: Path) -> AsyncIterator[Peer]:
    identity = Identity.generate()
    store = Store(root / "store", identity, piece_size=PIECE)
    async with Transport.open(identity, LISTEN, loopback_only=True) as transport:
        Server(store).register(transport)
        yield Peer(transport, store, Fetcher(transport, store, parallel=1, backoff=0.05, timeout=3.0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(path)  # blocks of ~150 KB: three 64 KiB pieces each
    return path


def job_of(p: Peer, made: Manifest, name: str) -> Job:
    s = next(s for s in made.shards if s.name == name)
    return Job(s.name, s.sha256, s.size, shard_path(p.store.registry.shard_dir, s.sha256), s.pieces, made.piece_size)


async def test_a_corrupt_piece_costs_that_piece_not_the_file(tmp_path: Path, folder: Path) -> None:
    async with peer(tmp_path / "a") as a, peer(tmp_path / "b") as b, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        b.store.add(str(folder), model_id="tiny")
        for x in (a, b):
            await c.transport.connect(x.transport.addrs()[0])
        job = job_of(c, made, "block.0")
        assert made.piece_size == PIECE and job.size > 2 * PIECE and len(job.pieces) == 32 * 3
        bad = shard_path(a.store.registry.shard_dir, job.sha256)  # a's copy rots in its second piece
        data = bytearray(bad.read_bytes())
        data[PIECE + 100] ^= 0x01
        bad.write_bytes(data)
        job.dest.parent.mkdir(parents=True, exist_ok=True)

        t = c.fetcher.new_transfer("tiny", made.revision)
        await c.fetcher.fetch_file(job, [a.transport.node_id, b.transport.node_id], t)  # a first: least busy, first

        assert sha256_file(job.dest) == (job.size, job.sha256) and not job.partial.exists()
        (rejected,) = [e for e in c.fetcher.events if e["event"] == "piece_rejected"]
        assert (rejected["peer"], rejected["piece"], rejected["offset"]) == (a.transport.node_id, 1, PIECE)
        (failed,) = [e for e in c.fetcher.events if e["event"] == "attempt_failed"]
        assert failed["code"] == "SHARD_HASH_MISMATCH" and failed["peer"] == a.transport.node_id
        (resumed,) = [e for e in c.fetcher.events if e["event"] == "resumed"]
        assert (resumed["peer"], resumed["offset"]) == (b.transport.node_id, PIECE)  # piece 0 of a was kept
        assert t.by_source[b.transport.node_id] == job.size - PIECE
        assert PIECE + PIECE <= t.by_source[a.transport.node_id] <= job.size  # what a sent, the bad piece too
        assert t.done_bytes == t.total_bytes == job.size and t.resumed_bytes == PIECE


async def test_a_resumed_partial_is_checked_piece_by_piece_before_it_is_trusted(tmp_path: Path, folder: Path) -> None:
    async with peer(tmp_path / "b") as b, peer(tmp_path / "c") as c:
        made = b.store.add(str(folder), model_id="tiny")
        await c.transport.connect(b.transport.addrs()[0])
        job = job_of(c, made, "block.1")
        good = shard_path(b.store.registry.shard_dir, job.sha256).read_bytes()
        left = bytearray(good[: 2 * PIECE + 1000])  # an earlier run left two pieces and a bit; the second is bad
        left[PIECE + 7] ^= 0x80
        job.partial.parent.mkdir(parents=True, exist_ok=True)
        job.partial.write_bytes(left)

        t = c.fetcher.new_transfer("tiny", made.revision)
        await c.fetcher.fetch_file(job, [b.transport.node_id], t)

        assert sha256_file(job.dest) == (job.size, job.sha256)
        (rejected,) = [e for e in c.fetcher.events if e["event"] == "piece_rejected"]
        assert (rejected["peer"], rejected["piece"], rejected["offset"]) == ("partial", 1, PIECE)
        (resumed,) = [e for e in c.fetcher.events if e["event"] == "resumed"]
        assert resumed["offset"] == PIECE  # the bad piece and what followed it were cut off, not the good one
        assert t.by_source == {"partial": PIECE, b.transport.node_id: job.size - PIECE}
        assert t.resumed_bytes == PIECE


async def test_a_model_whose_manifest_has_no_piece_hashes_still_transfers(tmp_path: Path, folder: Path) -> None:
    async with peer(tmp_path / "b") as b, peer(tmp_path / "c") as c:
        made = b.store.add(str(folder), model_id="tiny")
        old = dataclasses.replace(
            made, piece_size=0, shards=tuple(dataclasses.replace(s, pieces=b"") for s in made.shards),
            files=tuple(dataclasses.replace(f, pieces=b"") for f in made.files))
        signed = seal_manifest(old, b.store.identity)  # as a peer before piece hashes signed it: version 1
        (b.store.registry.model_dir("tiny", made.revision) / MANIFEST_FILE).write_bytes(signed)
        await c.transport.connect(b.transport.addrs()[0])

        got = await c.fetcher.fetch_model("tiny", None, [b.transport.node_id])

        assert got == old and c.store.verify("tiny") == old
        assert c.store.manifest("tiny")[1] == signed  # kept as its maker signed it
        assert not [e for e in c.fetcher.events if e["event"] in ("piece_rejected", "attempt_failed")]

"""Shard transfer between real libp2p hosts on 127.0.0.1 in this process, each with its own real store:
fetch a whole model, tampering of every kind refused with its code and nothing stored, one download per
shard however many ask, resume of a partial file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
import torch
import trio
import trio.testing
from transformers import LlamaConfig, LlamaForCausalLM

from mesh.errors import MeshError
from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.transport import Stream, Transport
from mesh.wire import seal
from storage.manifest import MANIFEST, encode_manifest, seal_manifest
from storage.registry import ModelNotAvailable
from storage.shards import sha256_file, shard_path
from storage.store import Store
from storage.transfer import MANIFEST_PROTOCOL, SHARD_PROTOCOL, Fetcher, Job, RateLimit, Server, TransferFailed

pytestmark = pytest.mark.integration
LISTEN = ["/ip4/127.0.0.1/tcp/0"]


def model_folder(path: Path, hidden: int = 32, layers: int = 2) -> Path:
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
                                     tie_word_embeddings=True)).save_pretrained(path)
    return path


@dataclass
class Peer:
    transport: Transport
    store: Store
    server: Server
    fetcher: Fetcher

    @property
    def node_id(self) -> NodeId:
        return self.transport.node_id


@asynccontextmanager
async def peer(root: Path, *, upload: float = 0.0) -> AsyncIterator[Peer]:
    identity = Identity.generate()
    store = Store(root / "store", identity)
    async with Transport.open(identity, LISTEN, loopback_only=True) as transport:
        server = Server(store, upload=RateLimit(upload))
        server.register(transport)
        yield Peer(transport, store, server, Fetcher(transport, store, backoff=0.05, timeout=3.0))


async def connect(*peers: Peer) -> None:
    for a in peers:
        for b in peers:
            if a is not b and b.node_id not in a.transport.connected_peers():
                await a.transport.connect(b.transport.addrs()[0])


def served(p: Peer, kind: str) -> int:
    return sum(n for (_, k), n in p.store.usage.items() if k == kind)


async def test_fetch_a_whole_model_from_two_holders(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny")
    async with peer(tmp_path / "a") as a, peer(tmp_path / "b") as b, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        b.store.add(str(folder), model_id="tiny")
        await connect(a, b, c)
        got = await c.fetcher.fetch_model("tiny", None, [a.node_id, b.node_id])
        assert got == made  # the manifest as its maker signed it, not a copy re-signed by the receiver
        assert c.store.verify("tiny") == made  # every shard and file: size and SHA256
        assert c.store.installed() == [f"tiny@{made.revision}"]
        (t,) = c.fetcher.transfers.values()
        assert t.state == "done" and t.done_bytes == t.total_bytes == made.size
        assert set(t.by_source) == {a.node_id, b.node_id}  # files were spread over both holders
        assert served(a, "shard") + served(b, "shard") == len(made.shards) + len(made.files)
        assert not list(c.store.registry.shard_dir.glob(".*partial"))
        # Asking again fetches nothing.
        await c.fetcher.fetch_model("tiny", made.revision, [a.node_id])
        assert served(a, "shard") + served(b, "shard") == len(made.shards) + len(made.files)


async def test_tampered_shards_are_rejected_and_nothing_is_stored(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny")
    async with peer(tmp_path / "a") as a, peer(tmp_path / "b") as b, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        b.store.add(str(folder), model_id="tiny")
        await connect(a, b, c)
        flipped, truncated = made.shards[1], made.shards[2]
        path = shard_path(a.store.registry.shard_dir, flipped.sha256)
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01
        path.write_bytes(data)
        path = shard_path(a.store.registry.shard_dir, truncated.sha256)
        path.write_bytes(path.read_bytes()[:-100])

        # From the tampering holder alone: both refused with their codes, nothing kept, status error.
        with pytest.raises(TransferFailed) as err:
            await c.fetcher.fetch_model("tiny", None, [a.node_id])
        codes = {ev["file"]: ev["code"] for ev in c.fetcher.events if ev["event"] == "attempt_failed"}
        assert codes == {flipped.name: "SHARD_HASH_MISMATCH", truncated.name: "SHARD_SIZE_MISMATCH"}
        assert "2 of" in str(err.value)
        shard_dir = c.store.registry.shard_dir
        assert not shard_path(shard_dir, flipped.sha256).exists()
        assert not shard_path(shard_dir, truncated.sha256).exists()
        assert not list(shard_dir.glob(".*partial"))  # the bad bytes were deleted, not kept to resume
        with pytest.raises(ModelNotAvailable) as missing:
            c.store.manifest("tiny")
        assert missing.value.reason == "error"

        # The peer keeps going: with an honest holder too, the same fetch completes and verifies.
        await c.fetcher.fetch_model("tiny", None, [a.node_id, b.node_id])
        assert c.store.verify("tiny") == made
        assert await c.transport.ping(a.node_id) > 0


async def forged_manifest_holder(root: Path, reply: bytes) -> AsyncIterator[Transport]:
    async with Transport.open(Identity.generate(), LISTEN, loopback_only=True) as t:
        async def answer(stream: Stream) -> None:
            await stream.receive_frame(4096)
            await stream.send_frame(cbor2.dumps({"ok": True, "manifest": reply}))

        t.handle(MANIFEST_PROTOCOL, answer)
        yield t


@pytest.mark.parametrize("forgery", ["bad_signature", "other_signer", "other_model"])
async def test_forged_manifests_are_rejected_with_their_codes(tmp_path: Path, forgery: str) -> None:
    folder = model_folder(tmp_path / "tiny")
    alice, mallory = Identity.generate(), Identity.generate()
    made = Store(tmp_path / "src", alice).add(str(folder), model_id="tiny")
    if forgery == "bad_signature":
        env = cbor2.loads(seal_manifest(made, alice))
        env["s"] = bytes([env["s"][0] ^ 1]) + env["s"][1:]
        reply, code = cbor2.dumps(env), "BAD_SIGNATURE"
    elif forgery == "other_signer":  # claims alice made it, signed by mallory
        reply, code = seal(MANIFEST, encode_manifest(made), mallory), "MANIFEST_SIGNER_MISMATCH"
    else:
        other = type(made)(**{**{f: getattr(made, f) for f in made.__dataclass_fields__}, "model_id": "other"})
        assert encode_manifest(other) != encode_manifest(made)
        reply, code = seal_manifest(other, alice), "MANIFEST_MISMATCH"
    async with asynccontextmanager(forged_manifest_holder)(tmp_path, reply) as liar, peer(tmp_path / "c") as c:
        await c.transport.connect(liar.addrs()[0])
        with pytest.raises(TransferFailed, match=code):
            await c.fetcher.fetch_model("tiny", None, [liar.node_id])
        (ev,) = [e for e in c.fetcher.events if e["event"] == "manifest_refused"]
        assert ev["code"] == code
        assert c.store.installed() == [] and not list(c.store.registry.shard_dir.glob("*"))
        assert await c.transport.ping(liar.node_id) > 0


async def test_concurrent_requests_download_each_shard_once(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny", hidden=64)
    async with peer(tmp_path / "a", upload=2e6) as a, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        await connect(a, c)
        results = []

        async def fetch() -> None:
            results.append(await c.fetcher.fetch_model("tiny", None, [a.node_id]))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(fetch)
            # and the same shard asked for directly at the same time
            job = Job("x", made.shards[1].sha256, made.shards[1].size,
                      shard_path(c.store.registry.shard_dir, made.shards[1].sha256))
            nursery.start_soon(c.fetcher.fetch_file, job, [a.node_id], c.fetcher.new_transfer("x", None))
        assert results == [made] * 4
        assert served(a, "manifest") == 1
        assert served(a, "shard") == len(made.shards) + len(made.files)  # once each
        c.store.verify("tiny")


async def test_a_partial_file_resumes_from_its_last_byte(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny", hidden=64)
    async with peer(tmp_path / "a") as a, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        await connect(a, c)
        shard = max(made.shards, key=lambda s: s.size)
        src = shard_path(a.store.registry.shard_dir, shard.sha256)
        job = Job(shard.name, shard.sha256, shard.size, shard_path(c.store.registry.shard_dir, shard.sha256))
        job.dest.parent.mkdir(parents=True)
        keep = shard.size // 3
        job.partial.write_bytes(src.read_bytes()[:keep])  # what an interrupted earlier transfer left
        t = c.fetcher.new_transfer("tiny", None)
        await c.fetcher.fetch_file(job, [a.node_id], t)
        assert sha256_file(job.dest) == (shard.size, shard.sha256) and not job.partial.exists()
        assert t.resumed_bytes == keep and t.by_source[a.node_id] == shard.size - keep
        (ev,) = [e for e in c.fetcher.events if e["event"] == "resumed"]
        assert ev["offset"] == keep

        # A partial longer than the file is garbage: dropped, and the file fetched whole.
        other = next(s for s in made.shards if s.size > 1000 and s is not shard)
        job2 = Job(other.name, other.sha256, other.size, shard_path(c.store.registry.shard_dir, other.sha256))
        job2.partial.write_bytes(b"x" * (other.size + 1))
        await c.fetcher.fetch_file(job2, [a.node_id], t)
        assert sha256_file(job2.dest) == (other.size, other.sha256)


async def test_unknown_shard_and_bad_requests_get_codes_and_the_server_goes_on(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny")
    async with peer(tmp_path / "a") as a, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")
        await connect(a, c)
        t = c.fetcher.new_transfer("x", None)
        missing = Job("nothing", "0" * 64, 10, c.store.root / "nothing")
        with pytest.raises(TransferFailed, match="BLOB_NOT_FOUND"):
            await c.fetcher.fetch_file(missing, [a.node_id], t)
        with pytest.raises(MeshError) as err:
            await c.fetcher.fetch_manifest(a.node_id, "not-here", None)
        assert err.value.code == "MODEL_NOT_AVAILABLE"
        # Requests that are not CBOR, or not a SHA256: refused with a code, and the server goes on.
        for protocol, request, code in ((SHARD_PROTOCOL, b"\xff\x00not cbor", "MALFORMED_MESSAGE"),
                                        (SHARD_PROTOCOL, cbor2.dumps({"sha256": "../x", "offset": 0}),
                                         "MALFORMED_MESSAGE"),
                                        (MANIFEST_PROTOCOL, cbor2.dumps({"model": 7}), "MALFORMED_MESSAGE")):
            async with c.transport.open_stream(a.node_id, protocol) as s:
                await s.send_frame(request)
                reply = cbor2.loads(await s.receive_frame(4096))
            assert reply["ok"] is False and reply["code"] == code
        # A shard replaced by a symlink out of the store is never served.
        outside = tmp_path / "secret"
        outside.write_bytes(b"s" * made.shards[0].size)
        link = shard_path(a.store.registry.shard_dir, made.shards[0].sha256)
        link.unlink()
        link.symlink_to(outside)
        bad = Job("x", made.shards[0].sha256, made.shards[0].size, c.store.root / "x")
        with pytest.raises(TransferFailed, match="BLOB_NOT_FOUND"):
            await c.fetcher.fetch_file(bad, [a.node_id], t)
        assert (await c.fetcher.fetch_manifest(a.node_id, "tiny", None))[0] == made


async def test_slow_rate_limits_still_complete_within_deadlines(tmp_path: Path) -> None:
    """A low upload limit shared by parallel streams: each moves small pieces, none hits its deadline."""
    folder = model_folder(tmp_path / "tiny")
    async with peer(tmp_path / "a", upload=60_000) as a, peer(tmp_path / "c") as c:
        made = a.store.add(str(folder), model_id="tiny")  # ~94 KB: ~1.6 s at 60 kB/s
        await connect(a, c)
        c.fetcher.timeout = 1.0  # tighter than a 256 KiB chunk at this rate would need
        start = trio.current_time()
        await c.fetcher.fetch_model("tiny", None, [a.node_id])
        assert trio.current_time() - start >= made.size / 60_000 * 0.8  # the limit was applied
        assert not [e for e in c.fetcher.events if e["event"] == "attempt_failed"]


async def test_rate_limit_books_bytes_on_a_shared_virtual_clock(autojump_clock: trio.testing.MockClock) -> None:
    limit = RateLimit(1_000_000)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:  # two transfers share one budget
        for _ in range(2):
            nursery.start_soon(lambda: _take(limit, 10, 100_000))
    assert trio.current_time() - start == pytest.approx(1.9)  # 2 MB at 1 MB/s; the first chunk goes at once
    unlimited = RateLimit(0)
    start = trio.current_time()
    await _take(unlimited, 100, 10**9)
    assert trio.current_time() == start


async def _take(limit: RateLimit, times: int, n: int) -> None:
    for _ in range(times):
        await limit.take(n)

"""The pure cores of the download queue and of piece hashes: which file gets a free slot (priority, then the
order transfers were queued in, then file order), what a transfer's state may become, piece hashes made and
checked however the bytes are chunked (a bad piece rewinds to its start and nothing else), and manifests with
and without piece hashes (version 2 and 1) signed, opened and refused."""

from __future__ import annotations

import hashlib
import random

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import DecodeError, PeerError
from mesh.identity import Identity
from mesh.wire import seal
from storage.manifest import MANIFEST, Manifest, ManifestFile, Shard, encode_manifest, open_manifest, seal_manifest
from storage.pieces import (
    DIGEST,
    MAX_PIECES,
    MIN_PIECE_SIZE,
    PIECE_SIZE,
    PieceCheck,
    PieceHasher,
    PieceHashMismatch,
    piece_size_for,
)
from storage.queue import HIGH, LOW, NORMAL, TRANSITIONS, InvalidTransferState, Slots, next_state, parse_priority

ALICE = Identity.generate()


# ---- the queue ----------------------------------------------------------------------------------------------


def test_a_freed_slot_goes_to_the_highest_priority_then_the_earliest_transfer_then_the_first_file() -> None:
    slots: Slots[str] = Slots(2)
    assert slots.ask("low-0", LOW, 1, 0) and slots.ask("low-1", LOW, 1, 1)  # two free slots: taken at once
    assert not slots.ask("low-2", LOW, 1, 2)
    assert not slots.ask("normal-b1", NORMAL, 3, 1)
    assert not slots.ask("normal-b0", NORMAL, 3, 0)
    assert not slots.ask("normal-a0", NORMAL, 2, 0)  # queued before b: first among the normal ones
    assert not slots.ask("high-0", HIGH, 4, 0)  # queued last, goes first
    assert slots.waiting == ["high-0", "normal-a0", "normal-b0", "normal-b1", "low-2"]
    assert slots.leave("low-0") == ["high-0"]  # a holder keeps its slot to its end; the next free one is high's
    assert slots.leave("normal-b1") == []  # a waiter that leaves (paused, cancelled) frees nothing
    assert slots.leave("low-1") == ["normal-a0"]
    assert slots.leave("high-0") == ["normal-b0"]
    assert slots.leave("normal-a0") == ["low-2"]
    assert slots.leave("normal-b0") == [] and slots.leave("low-2") == [] and slots.holding == set()
    with pytest.raises(ValueError):
        Slots(0)


def test_a_waiter_is_raised_when_someone_more_urgent_waits_on_its_file_and_never_lowered() -> None:
    slots: Slots[str] = Slots(1)
    assert slots.ask("busy", NORMAL, 1, 0)
    assert not slots.ask("prefetch", LOW, 1, 1)  # a background prefetch claimed the shard a stage now needs
    assert not slots.ask("other", NORMAL, 2, 0)
    slots.bump("prefetch", HIGH)
    slots.bump("other", LOW)  # a lower priority never lowers a waiter
    assert slots.waiting == ["prefetch", "other"]
    assert slots.leave("busy") == ["prefetch"]
    assert slots.leave("prefetch") == ["other"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 2), st.integers(0, 3)), min_size=1, max_size=30), st.integers(1, 4),
       st.randoms(use_true_random=False))
def test_slots_never_exceed_capacity_and_grant_in_rank_order(asks: list[tuple[int, int]], capacity: int,
                                                             rnd: random.Random) -> None:
    """Against a sort: whatever leaves when, every grant is the best-ranked waiter and at most ``capacity`` hold."""
    slots: Slots[int] = Slots(capacity)
    ranks = {}
    for key, (priority, transfer) in enumerate(asks):
        ranks[key] = (-priority, transfer, key)
        slots.ask(key, priority, transfer, key)
    while slots.holding:
        assert len(slots.holding) <= capacity and (not slots.waiting or len(slots.holding) == capacity)
        best = sorted(slots.waiting, key=ranks.__getitem__)
        assert slots.waiting == best
        granted = slots.leave(rnd.choice(sorted(slots.holding)))
        assert granted == best[: len(granted)]


def test_transfer_states_follow_the_table_and_priorities_have_one_validator() -> None:
    assert next_state("running", "pause") == "paused" and next_state("paused", "resume") == "queued"
    assert next_state("error", "resume") == "queued"  # a retry, from the bytes it has
    assert next_state("paused", "cancel") == "cancelled" and next_state("queued", "start") == "running"
    for state in ("done", "cancelled"):
        for event in ("pause", "resume", "cancel"):
            with pytest.raises(InvalidTransferState) as err:
                next_state(state, event)
            assert err.value.code == "INVALID_TRANSFER_STATE" and err.value.http_status == 409
    with pytest.raises(InvalidTransferState):
        next_state("queued", "resume")
    assert all(to in TRANSITIONS for moves in TRANSITIONS.values() for to in moves.values())
    assert [parse_priority(v) for v in (None, "low", "HIGH", "normal", 7, "-3", -100, 100)] == [
        NORMAL, LOW, HIGH, NORMAL, 7, -3, -100, 100]
    for bad in ("urgent", 101, -101, True, 1.5, [1]):
        with pytest.raises(PeerError) as err:
            parse_priority(bad)
        assert err.value.code == "INVALID_PARAMETER"


# ---- piece hashes -------------------------------------------------------------------------------------------


def chunked(data: bytes, rnd: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 3 * MIN_PIECE_SIZE)
        out.append(data[i:i + n])
        i += n
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4 * MIN_PIECE_SIZE), st.randoms(use_true_random=False))
def test_piece_hashes_do_not_depend_on_chunking_and_a_bad_piece_rewinds_to_its_start(size: int,
                                                                                     rnd: random.Random) -> None:
    data = rnd.randbytes(size)
    ps = MIN_PIECE_SIZE
    hasher = PieceHasher(ps)
    for chunk in chunked(data, rnd):
        hasher.update(chunk)
    pieces = hasher.digests()
    assert pieces == b"".join(hashlib.sha256(data[i:i + ps]).digest() for i in range(0, size, ps))
    sha = hashlib.sha256(data).hexdigest()

    good = PieceCheck(size, sha, ps, pieces)
    for chunk in chunked(data, rnd):
        good.update(chunk)
    assert good.complete() and good.verified == size

    at = rnd.randrange(size)  # one flipped byte: the check stops at the start of its piece, and only there
    bad = bytearray(data)
    bad[at] ^= 0x40
    check = PieceCheck(size, sha, ps, pieces)
    with pytest.raises(PieceHashMismatch) as err:
        for chunk in chunked(bytes(bad), rnd):
            check.update(chunk)
    assert err.value.index == at // ps and err.value.offset == check.position == check.verified == at // ps * ps
    assert err.value.code == "SHARD_HASH_MISMATCH"
    check.update(data[check.position:])  # the piece again, right this time: the file completes
    assert check.complete()


def test_without_piece_hashes_only_the_whole_file_is_checked() -> None:
    data = random.Random(1).randbytes(3 * MIN_PIECE_SIZE)
    check = PieceCheck(len(data), hashlib.sha256(data).hexdigest())
    check.update(data[:-1] + b"\x00")
    assert check.verified == len(data) and not check.complete()  # a version-1 manifest: trusted to the end
    with pytest.raises(ValueError):
        PieceCheck(10, "0" * 64, MIN_PIECE_SIZE, b"short")


def test_the_piece_size_grows_only_when_a_model_would_list_too_many() -> None:
    assert piece_size_for([10 * 2**30]) == PIECE_SIZE  # 10 GiB: 2,560 pieces
    huge = [2**30] * 600  # 600 GiB: too many 4 MiB pieces
    size = piece_size_for(huge)
    assert size > PIECE_SIZE and sum(-(-s // size) for s in huge) <= MAX_PIECES
    assert sum(-(-s // (size // 2)) for s in huge) > MAX_PIECES  # and no larger than needed


# ---- manifests with and without piece hashes -------------------------------------------------------------


def manifest(piece_size: int = 0) -> Manifest:
    def pieces(size: int) -> bytes:
        return bytes(range(DIGEST)) * -(-size // piece_size) if piece_size else b""

    return Manifest(
        model_id="tiny", revision="r1", family="llama", config_sha256="c" * 64, created_by=ALICE.node_id,
        shards=(Shard(0, "embedding", "embedding", 0, 1, (), 300_000, "a" * 64, pieces=pieces(300_000)),
                Shard(1, "head", "head", 1, 2, (), 10, "b" * 64, pieces=pieces(10))),
        files=(ManifestFile("config.json", 100, "d" * 64, pieces(100)),
               ManifestFile("empty.txt", 0, "e" * 64, pieces(0))),
        piece_size=piece_size)


def test_a_manifest_with_pieces_is_version_2_and_one_without_is_version_1_as_older_peers_wrote_it() -> None:
    with_pieces = manifest(MIN_PIECE_SIZE)
    assert cbor2.loads(encode_manifest(with_pieces))["version"] == 2
    assert open_manifest(seal_manifest(with_pieces, ALICE)) == with_pieces
    old = manifest()
    raw = cbor2.loads(encode_manifest(old))
    assert raw["version"] == 1 and "piece_size" not in raw and "pieces" not in raw["shards"][0]
    # The older peers' encoder, field for field: its signed bytes still open, to the same manifest.
    older = cbor2.dumps({
        "version": 1, "model_id": "tiny", "revision": "r1", "family": "llama", "config_sha256": "c" * 64,
        "created_by": ALICE.node_id,
        "shards": [{"index": s.index, "name": s.name, "kind": s.kind, "layers": [s.layer_start, s.layer_end],
                    "tensors": [], "size": s.size, "sha256": s.sha256, "params": 0, "memory_bytes": 0,
                    "kv_bytes_per_token": 0, "flops_base": 0, "flops_per_context": 0, "tied_to": None,
                    "format": ""} for s in old.shards],
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in old.files],
        "weights": "auto", "compute": "float32", "notes": []})
    assert older == encode_manifest(old)
    assert open_manifest(seal(MANIFEST, older, ALICE)) == old


@pytest.mark.parametrize("damage", ["short_pieces", "no_pieces", "piece_size_not_a_power_of_two",
                                    "piece_size_too_small", "version_3", "too_many_pieces"])
def test_malformed_piece_hashes_are_refused(damage: str) -> None:
    raw = cbor2.loads(encode_manifest(manifest(MIN_PIECE_SIZE)))
    if damage == "short_pieces":
        raw["shards"][0]["pieces"] = raw["shards"][0]["pieces"][:-1]
    elif damage == "no_pieces":
        del raw["files"][0]["pieces"]
    elif damage == "piece_size_not_a_power_of_two":
        raw["piece_size"] = MIN_PIECE_SIZE + 1
    elif damage == "piece_size_too_small":
        raw["piece_size"] = MIN_PIECE_SIZE // 2
    elif damage == "version_3":
        raw["version"] = 3
    else:  # as many pieces as the limit allows, plus the other files' pieces
        raw["shards"][0] |= {"size": MAX_PIECES * MIN_PIECE_SIZE, "pieces": b"\x00" * DIGEST * MAX_PIECES}
    with pytest.raises(DecodeError) as err:
        open_manifest(seal(MANIFEST, cbor2.dumps(raw), ALICE))
    assert err.value.code == ("UNSUPPORTED_VERSION" if damage == "version_3" else "MALFORMED_MESSAGE")

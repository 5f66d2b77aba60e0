"""A hostile peer on ``/meshnode/activations/1`` against a real peer that serves a tiny model as one stage.

The test drives a valid session itself (the stage sends results back to the test's own libp2p host, as it
would to a driver) and checks its tokens against the unsplit transformers model. While that session stays
open, every malformed, oversize, mistyped, misrouted or out-of-order input is sent on a stream of its own
and must be answered with an error frame carrying its stable code on that same stream; afterwards the
valid session goes on with the exact tokens of the oracle, no hostile session is left holding a cache, the
peer is healthy and its log names every refusal (``session_refused``)."""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
import tiny_models
import torch
import trio
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from inference import protocol
from inference.frames import MAX_HEADER, Frame, encode
from inference.protocol import ACTIVATIONS_PROTOCOL
from inference.sampling import Sampling
from mesh.app.cli import main as cli
from mesh.app.client import api_get
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.errors import PeerError
from mesh.gate import become_member
from mesh.identity import Identity
from mesh.ids import NodeId
from mesh.transport import Stream, Transport

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
PROMPT = [3, 17, 42, 7, 99, 5]
VOCAB = 128
MAX_POSITIONS = 512
_LEN = struct.Struct(">I")


def tiny_llama() -> LlamaForCausalLM:
    return tiny_models.tiny_llama(7, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS).eval()


@dataclass
class Served:
    peer: PeerProcess
    model: str
    revision: str
    epoch: list[int]
    start: int
    end: int
    want: list[int]  # the oracle's greedy tokens for PROMPT
    invite: Callable[[], str]  # a fresh invite token from the peer: the test's hosts join as members


    def step0(self, driver: str, **changes: Any) -> dict[str, Any]:
        """The extras of a valid step 0 from ``driver`` (``changes`` override them; None removes one)."""
        extra = {"model": self.model, "revision": self.revision, "epoch": self.epoch,
                 "route": [[self.peer.node_id, self.start, self.end]], "driver": driver,
                 "sampling": Sampling().to_wire()} | changes
        return {k: v for k, v in extra.items() if v is not None}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real peer that serves the tiny model alone (one stage: every layer)."""
    root = tmp_path_factory.mktemp("activation-input")
    model = tiny_llama()
    model.save_pretrained(root / "tiny")
    assert cli(["models", "--data-dir", str(root / "mesh" / "a"), "add", str(root / "tiny"), "--id", "tiny"]) == 0
    mesh = LocalMesh(root / "mesh", CONFIG, extra_args=("--compute-gflops", "50"))
    try:
        peer = mesh.start_peer("a", args=("--serve", "tiny"))  # `meshnode start --serve ID`
        wait_for(lambda: agreed([peer]), 15, what="the peer to lead its own mesh")

        def listed() -> dict[str, Any] | None:
            data = (peer.try_get("/v1/models") or {}).get("data", [])
            return next((m["meshnode"] for m in data if m["id"] == "tiny"), None)

        info = wait_for(listed, 30, what="tiny in /v1/models")
        (stage,) = info["stages"]
        assert stage["node_id"] == peer.node_id
        start, end = stage["layers"]
        assert (start, end) == (0, 7)  # embedding, 4 blocks, norm, head
        yield Served(peer, "tiny", info["revision"], info["epoch"], start, end, tiny_models.reference(model, PROMPT, 4),
                     lambda: mesh.invite(peer))
    finally:
        mesh.close()


# ---- wire helpers ---------------------------------------------------------------------------------


def message(header: dict[Any, Any] | bytes, payload: bytes = b"") -> bytes:
    """One message as a hostile peer may write it: length, header (a map, or raw bytes), payload."""
    raw = header if isinstance(header, bytes) else cbor2.dumps(header)
    return _LEN.pack(len(raw)) + raw + payload


def frame_bytes(frame: Frame) -> bytes:
    header, payload = encode(frame)
    return message(header, payload)


def tokens(session: str, step: int, start: int, ids: list[int], extra: dict[str, Any] | None = None) -> Frame:
    return Frame("tokens", session, step, start, torch.tensor([ids], dtype=torch.int64), extra or {})


def base(session: str = "h", **fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "tokens", "session": session, "step": 0, "start": 0} | fields


class Results:
    """What the stage sends to the test's host as the driver: (sender, frame) by session id."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[tuple[NodeId, Frame]](256)
        self.pending: list[tuple[NodeId, Frame]] = []

    async def handler(self, stream: Stream) -> None:
        while True:
            try:
                frame = await protocol.receive(stream, timeout=120.0)
            except PeerError:
                return  # the stage closed its stream (the session ended)
            await self.send.send((stream.peer, frame))

    async def next(self, session: str, timeout: float = 10.0) -> tuple[NodeId, Frame]:
        """The next frame for ``session`` (frames of other sessions wait their turn)."""
        for i, item in enumerate(self.pending):
            if item[1].session == session:
                return self.pending.pop(i)
        with trio.fail_after(timeout):
            while True:
                item = await self.receive.receive()
                if item[1].session == session:
                    return item
                self.pending.append(item)


async def answer(t: Transport, peer: str, data: bytes, *, half_close: bool = False, what: str = "") -> Frame:
    """Write ``data`` on a new stream and read the stage's answer on that same stream."""
    async with t.open_stream(NodeId(peer), ACTIVATIONS_PROTOCOL, timeout=10.0) as s:
        await s.write(data)
        if half_close:
            await s._raw.close_write()  # our side is done; the stage can still answer
        try:
            return await protocol.receive(s, timeout=10.0)
        except PeerError as err:
            pytest.fail(f"{what}: no error frame on the stream ({err.code}: {err})")


async def refused(t: Transport, s: Served, data: bytes, code: str, what: str, **kw: Any) -> Frame:
    frame = await answer(t, s.peer.node_id, data, what=what, **kw)
    assert frame.kind == "error", (what, frame)
    assert frame.extra.get("code") == code, (what, frame.extra)
    assert frame.extra.get("node") == s.peer.node_id and frame.extra.get("message"), (what, frame.extra)
    return frame


def refused_codes(peer: PeerProcess) -> set[str]:
    return {r["code"] for r in peer.log_records() if r.get("event") == "session_refused"}


def sessions_on_stage(peer: PeerProcess) -> int | None:
    view = peer.try_get("/api/model")
    stages = (view or {}).get("local", {}).get("stages", [])
    return stages[0]["sessions"] if len(stages) == 1 else None


# ---- the test -------------------------------------------------------------------------------------


async def test_hostile_activation_frames_are_refused_and_the_live_session_goes_on(served: Served) -> None:
    s = served
    peer_id = NodeId(s.peer.node_id)
    results = Results()
    expected: set[str] = set()
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as t:
        t.handle(ACTIVATIONS_PROTOCOL, results.handler, timeout=120.0)
        await become_member(t, s.invite())
        me = t.node_id

        async with t.open_stream(peer_id, ACTIVATIONS_PROTOCOL, timeout=10.0) as live:
            # (a) A valid session, driven by this test: its first token is the oracle's.
            await protocol.send(live, tokens("live", 0, 0, PROMPT, s.step0(me)))
            sender, result = await results.next("live", timeout=20.0)
            assert sender == peer_id and result.kind == "result" and result.step == 0, result
            assert result.extra["token"] == s.want[0]
            assert len(result.extra["compute_ms"]) == 1 and result.tensor is None

            # (b) Hostile inputs, each on a stream of its own, while "live" stays open.
            async def check(code: str, what: str, data: bytes, **kw: Any) -> Frame:
                expected.add(code)
                return await refused(t, s, data, code, what, **kw)

            # Not a message at all.
            await check("MALFORMED_MESSAGE", "garbage header", message(b"\xff\x00 plain garbage \xfe"))
            await check("MALFORMED_MESSAGE", "empty header", message(b""))
            await check("MALFORMED_MESSAGE", "header is a CBOR list", message(cbor2.dumps([1, 2, 3])))
            await check("MALFORMED_MESSAGE", "header without v", message({"kind": "tokens"}))
            await check("MALFORMED_MESSAGE", "step is text", message(base(step="0")))
            await check("UNSUPPORTED_VERSION", "frame version 2", message(base(v=2)))
            await check("MESSAGE_TOO_LARGE", "1 MiB header length", _LEN.pack(2**20))
            await check("MESSAGE_TOO_LARGE", "header just over the limit",
                        message(base(pad="x" * MAX_HEADER)))
            await check("MESSAGE_TOO_LARGE", "tensor over MAX_PAYLOAD",
                        message(base(kind="hidden", dtype="float32", shape=[9, 8192, 1024])))
            await check("BAD_FRAME", "unknown kind", message(base(kind="bogus")))
            await check("BAD_FRAME", "empty session id", message(base(session="")))
            await check("BAD_FRAME", "negative step", message(base(step=-1)))
            # Tensors that are not what any stage takes.
            await check("BAD_DTYPE", "float64", message(base(dtype="float64", shape=[1, 2]), bytes(16)))
            await check("MALFORMED_MESSAGE", "dtype of another type", message(base(dtype=5, shape=[1, 2]), bytes(16)))
            await check("BAD_SHAPE", "4-D shape", message(base(dtype="int64", shape=[1, 1, 1, 2]), bytes(16)))
            await check("BAD_SHAPE", "0-size dimension", message(base(dtype="int64", shape=[1, 0]), b""))
            await check("BAD_SHAPE", "shape of floats", message(base(dtype="int64", shape=[1.0, 2.0]), bytes(16)))
            await check("BAD_SHAPE", "more than MAX_TOKENS", message(base(dtype="int64", shape=[1, 8193])))
            nan = torch.full((1, 2, 64), math.nan)
            # Hidden states (NaN or not) are refused by a first stage before their payload is read; NaN
            # itself is BAD_VALUES in tests/unit/test_frames.py.
            await check("BAD_SHAPE", "NaN activations", frame_bytes(Frame("hidden", "h", 0, 0, nan, s.step0(me))))
            # The payload length is implied by the header: a shorter payload is a stream that ends early
            # (STREAM_CLOSED once our side is closed), a longer one is read as the next message (below).
            await check("STREAM_CLOSED", "payload shorter than the shape",
                        message(base(dtype="int64", shape=[1, 3]), bytes(8)), half_close=True)

            # Well-formed frames that are not a valid start of a session here.
            await check("UNKNOWN_SESSION", "first frame is step 3", frame_bytes(tokens("h-3", 3, 9, [1])))
            await check("UNKNOWN_SESSION", "first frame is an end", frame_bytes(Frame("end", "live", 1, 6)))
            await check("UNKNOWN_SESSION", "step 1 of the live session on a new stream",
                        frame_bytes(tokens("live", 1, len(PROMPT), [s.want[0]])))
            stranger = Identity.generate().node_id
            await check("NOT_IN_ROUTE", "route without this peer",
                        frame_bytes(tokens("h-nr", 0, 0, PROMPT, s.step0(me, route=[[stranger, 0, 7]]))))
            await check("NOT_IN_ROUTE", "another driver",
                        frame_bytes(tokens("h-drv", 0, 0, PROMPT, s.step0(stranger))))
            await check("STAGE_NOT_READY", "a range not loaded here",
                        frame_bytes(tokens("h-rng", 0, 0, PROMPT, s.step0(me, route=[[s.peer.node_id, 0, 3]]))))
            await check("STAGE_NOT_READY", "another revision",
                        frame_bytes(tokens("h-rev", 0, 0, PROMPT, s.step0(me, revision="0" * 40))))
            await check("STAGE_NOT_READY", "another model",
                        frame_bytes(tokens("h-mod", 0, 0, PROMPT, s.step0(me, model="nope"))))
            await check("BAD_FRAME", "non-contiguous route",
                        frame_bytes(tokens("h-gap", 0, 0, PROMPT, s.step0(me, route=[[s.peer.node_id, 1, 7]]))))
            await check("BAD_FRAME", "no driver", frame_bytes(tokens("h-nod", 0, 0, PROMPT, s.step0(""))))
            await check("BAD_FRAME", "no epoch", frame_bytes(tokens("h-noe", 0, 0, PROMPT, s.step0(me, epoch=None))))
            await check("BAD_FRAME", "sampling with top_p 0",
                        frame_bytes(tokens("h-smp", 0, 0, PROMPT, s.step0(me, sampling={"top_p": 0}))))
            await check("SESSION_EXISTS", "the live session id at step 0",
                        frame_bytes(tokens("live", 0, 0, PROMPT, s.step0(me))))
            # Admitted sessions whose first step is wrong for this stage.
            await check("BAD_SHAPE", "hidden states to the first stage",
                        frame_bytes(Frame("hidden", "h-hid", 0, 0, torch.zeros(1, 2, 64), s.step0(me))))
            await check("BAD_DTYPE", "float token ids",
                        frame_bytes(Frame("tokens", "h-flt", 0, 0, torch.zeros(1, 2), s.step0(me))))
            await check("BAD_SHAPE", "token ids of rank 3",
                        frame_bytes(Frame("tokens", "h-r3", 0, 0, torch.zeros(1, 2, 3, dtype=torch.int64),
                                          s.step0(me))))
            await check("BAD_VALUES", "token id past the vocabulary",
                        frame_bytes(tokens("h-voc", 0, 0, [1, VOCAB], s.step0(me))))
            await check("BAD_VALUES", "negative token id", frame_bytes(tokens("h-neg", 0, 0, [-1, 2], s.step0(me))))
            await check("BAD_SHAPE", "a batch of two",
                        frame_bytes(Frame("tokens", "h-b2", 0, 0, torch.ones(2, 3, dtype=torch.int64), s.step0(me))))
            await check("CONTEXT_TOO_LONG", "more positions than the model has",
                        frame_bytes(tokens("h-ctx", 0, 0, [1] * (MAX_POSITIONS + 1), s.step0(me))))
            await check("POSITION_MISMATCH", "step 0 that does not start at 0",
                        frame_bytes(tokens("h-pos0", 0, 5, PROMPT, s.step0(me))))

            # A result for no generation of this peer's driver: refused (UNKNOWN_SESSION in the log). Noted:
            # result streams are the driver's side, which resets them instead of answering an error frame.
            async with t.open_stream(peer_id, ACTIVATIONS_PROTOCOL, timeout=10.0) as st:
                await protocol.send(st, Frame("result", "live", 0, 0, None, {"token": 1}))
                with contextlib.suppress(PeerError):
                    got = await protocol.receive(st, timeout=10.0)
                    assert got.kind == "error" and got.extra["code"] == "UNKNOWN_SESSION", got

            # Sessions that start well and then go wrong on their own stream: each ends alone.
            async def opened(session: str) -> Stream:
                st = await stack.enter_async_context(t.open_stream(peer_id, ACTIVATIONS_PROTOCOL, timeout=10.0))
                await protocol.send(st, tokens(session, 0, 0, PROMPT, s.step0(me)))
                _, first = await results.next(session)
                assert first.kind == "result" and first.extra["token"] == s.want[0], first
                return st

            async def error_on(st: Stream, code: str, what: str) -> None:
                expected.add(code)
                try:
                    got = await protocol.receive(st, timeout=10.0)
                except PeerError as err:
                    pytest.fail(f"{what}: no error frame on the stream ({err.code}: {err})")
                assert got.kind == "error" and got.extra.get("code") == code, (what, got)

            async with contextlib.AsyncExitStack() as stack:
                st = await opened("h-pos")
                await protocol.send(st, tokens("h-pos", 1, len(PROMPT) + 3, [s.want[0]]))
                await error_on(st, "POSITION_MISMATCH", "step 1 at a wrong position")
                st = await opened("h-step")
                await protocol.send(st, tokens("h-step", 2, len(PROMPT), [s.want[0]]))
                await error_on(st, "STEP_MISMATCH", "step 2 after step 0")
                st = await opened("h-other")
                await protocol.send(st, tokens("live", 1, len(PROMPT), [s.want[0]]))
                await error_on(st, "UNKNOWN_SESSION", "a frame of another session on this stream")
                st = await opened("h-hid1")
                await protocol.send(st, Frame("hidden", "h-hid1", 1, len(PROMPT), torch.zeros(1, 1, 64)))
                await error_on(st, "BAD_SHAPE", "hidden states at step 1")
                # A payload longer than its shape: the excess is read as the next message.
                st = await stack.enter_async_context(t.open_stream(peer_id, ACTIVATIONS_PROTOCOL, timeout=10.0))
                await st.write(frame_bytes(tokens("h-long", 0, 0, PROMPT, s.step0(me))) + message(b"\xff"))
                _, first = await results.next("h-long")
                assert first.kind == "result" and first.extra["token"] == s.want[0], first
                await error_on(st, "MALFORMED_MESSAGE", "a payload longer than its shape")

            # The stage told the driver (this test) about every refused session that named it, once the frame
            # came from the driver itself (a tensor refused from its header alone, and a duplicate of the live
            # session's id, are answered on their own stream only: they must not end the live session).
            for session, code in [("h-voc", "BAD_VALUES"), ("h-rng", "STAGE_NOT_READY"),
                                  ("h-pos", "POSITION_MISMATCH")]:
                sender, note = await results.next(session)
                assert sender == peer_id and note.kind == "error" and note.extra["code"] == code, (session, note)

            # No hostile session is left holding a KV cache: only "live" is open.
            assert await trio.to_thread.run_sync(
                lambda: wait_for(lambda: sessions_on_stage(s.peer) == 1, 10, what="one session on the stage"))

            # (c) The live session goes on, exactly: hostile streams changed nothing of its cache.
            position, token = len(PROMPT), s.want[0]
            for step in (1, 2, 3):
                await protocol.send(live, tokens("live", step, position, [token]))
                sender, result = await results.next("live")
                assert sender == peer_id and result.kind == "result" and result.step == step, result
                assert result.extra["token"] == s.want[step], (step, result.extra)
                position, token = position + 1, result.extra["token"]
            await protocol.send(live, Frame("end", "live", 4, position))
            _, end = await results.next("live")
            assert end.kind == "end", end
        assert await trio.to_thread.run_sync(
            lambda: wait_for(lambda: sessions_on_stage(s.peer) == 0, 10, what="no session on the stage"))

    assert s.peer.alive() and s.peer.get("/api/health")["status"] == "ok"
    codes = await trio.to_thread.run_sync(
        lambda: wait_for(lambda: expected <= refused_codes(s.peer) and refused_codes(s.peer), 10,
                         what="every refusal in the log"))
    assert expected <= codes, expected - codes
    records = s.peer.log_records()
    assert [r for r in records if r.get("event") in ("session_refused", "stream_failed")
            and r.get("code") == "UNKNOWN_SESSION" and "no generation live is waiting" in r.get("msg", "")]
    assert not [r for r in records if r.get("event") == "stream_failed" and r.get("code") == "INTERNAL"]
    assert not [r for r in records if r.get("level") in ("error", "critical")], "errors in the peer's log"
    # And it still generates: its own driver gets the oracle's tokens.
    got = await trio.to_thread.run_sync(lambda: api_get(s.peer.api, "/api/request", method="POST", timeout=30.0,
                                                        body={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                                              "ignore_eos": True}))
    assert got["token_ids"] == s.want and len(set(s.want)) > 1


async def test_a_refused_step0_is_not_reflected_to_the_driver_it_names(served: Served) -> None:
    s = served
    peer_id = NodeId(s.peer.node_id)
    results, elsewhere = Results(), Results()
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as t, \
            Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as mallory:
        t.handle(ACTIVATIONS_PROTOCOL, results.handler, timeout=120.0)
        mallory.handle(ACTIVATIONS_PROTOCOL, elsewhere.handler, timeout=120.0)
        await become_member(t, s.invite())
        await become_member(mallory, s.invite())
        async with t.open_stream(peer_id, ACTIVATIONS_PROTOCOL, timeout=10.0) as live:
            await protocol.send(live, tokens("live-2", 0, 0, PROMPT, s.step0(t.node_id)))
            _, result = await results.next("live-2", timeout=20.0)
            assert result.extra["token"] == s.want[0]
            # Mallory claims to be the driver's stage 0 traffic for the same session id.
            await refused(mallory, s, frame_bytes(tokens("live-2", 0, 0, PROMPT, s.step0(t.node_id))),
                          "NOT_IN_ROUTE", "a step 0 naming another driver")
            reflected = None
            with trio.move_on_after(3.0):
                reflected = await results.next("live-2", timeout=3.0)
            assert reflected is None, f"the driver got {reflected} for its live session"
            await protocol.send(live, tokens("live-2", 1, len(PROMPT), [s.want[0]]))
            _, result = await results.next("live-2")
            assert result.kind == "result" and result.extra["token"] == s.want[1], result


async def test_a_tensor_the_stage_cannot_take_is_refused_before_its_payload(served: Served) -> None:
    s = served
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as t:
        await become_member(t, s.invite())
        header = base("h-big", kind="hidden", dtype="float32", shape=[1, 2, 2**20]) | s.step0(t.node_id)
        async with t.open_stream(NodeId(s.peer.node_id), ACTIVATIONS_PROTOCOL, timeout=10.0) as st:
            await st.write(message(header))  # 8 MiB announced, none sent
            try:
                got = await protocol.receive(st, timeout=3.0)
            except PeerError as err:
                raise AssertionError(f"no answer before the payload: {err.code}") from None
            assert got.kind == "error" and got.extra["code"] in ("BAD_FRAME", "BAD_SHAPE"), got


def _post(api: str, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(api + path, method="POST", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_openai_errors_and_a_corrupted_shard_that_never_becomes_ready(served: Served,
                                                                       tmp_path: Path) -> None:
    """Bad requests get OpenAI's error shape with meshnode's code and the right status; a model whose shard
    was corrupted on disk after it was installed is refused when its stage loads (SHA256 checked again),
    so it is never listed and requests for it get 503 MODEL_NOT_AVAILABLE; the other model is unaffected."""
    import json

    api = served.peer.api
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400, "BAD_REQUEST", None),
        (json.dumps({"messages": chat["messages"]}).encode(), 400, "INVALID_PARAMETER", "model"),
        (json.dumps(chat | {"temperature": 7}).encode(), 400, "INVALID_PARAMETER", "temperature"),
        (json.dumps(chat | {"n": 2}).encode(), 400, "INVALID_PARAMETER", "n"),
        (json.dumps(chat | {"model": "nope"}).encode(), 404, "UNKNOWN_MODEL", None),
        (json.dumps(chat).encode(), 400, "TOKENIZER_UNAVAILABLE", None),  # a tiny model has no tokenizer
    ]
    for body, status, code, param in cases:
        got_status, got = _post(api, "/v1/chat/completions", body)
        err = got["error"]
        assert (got_status, err["code"], err["param"]) == (status, code, param), (body, got)
        assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")

    # Install a second model beside the running peer, corrupt one byte of one of its shards, serve it.
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB)).save_pretrained(tmp_path / "broken")
    data_dir = served.peer.data_dir
    assert cli(["models", "--data-dir", str(data_dir), "add", str(tmp_path / "broken"), "--id", "broken"]) == 0
    (version,) = api_get(api, "/api/models/broken")["versions"]
    sha = version["shards"][1]["checksum_sha256"]
    (victim,) = (data_dir / "store").rglob(f"{sha}.safetensors")
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))

    def asked() -> bool:
        try:
            api_get(api, "/api/model", method="POST", body={"model_id": "broken"})
            return True
        except Exception:
            return False

    wait_for(asked, 15, what="the peer to advertise broken")
    error = wait_for(lambda: ((served.peer.try_get("/api/model?model=broken") or {}).get("models") or [{}])[0]
                     .get("errors", {}).get("stage"), 30, what="the stage load to fail")
    assert error["code"] == "SHARD_HASH_MISMATCH", error
    status, got = _post(api, "/v1/completions", json.dumps({"model": "broken", "prompt": [1, 2, 3]}).encode())
    assert status == 503 and got["error"]["code"] == "MODEL_NOT_AVAILABLE", got
    assert got["error"]["type"] == "service_unavailable"
    assert [m["id"] for m in api_get(api, "/v1/models")["data"]] == ["tiny"]
    ok = api_get(api, "/api/request", method="POST", timeout=30.0,
                 body={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True})
    assert ok["token_ids"] == served.want


async def test_the_last_stage_returns_logits_when_asked_equal_to_the_unsplit_model(served: Served) -> None:
    """Sampling parameter ``logits``: the result frame carries the last position's logits, which agree with
    the unsplit model's within 1e-4, step after step (prefill, then two decode steps)."""
    s = served
    model = tiny_llama().eval()
    cache, ids, wants = DynamicCache(config=model.config), torch.tensor([PROMPT]), []
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            wants.append(logits)
            ids = torch.tensor([[int(logits.argmax())]])
    results = Results()
    async with Transport.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as t:
        t.handle(ACTIVATIONS_PROTOCOL, results.handler, timeout=120.0)
        await become_member(t, s.invite())
        extra = s.step0(t.node_id, sampling=Sampling(logits=True).to_wire())
        async with t.open_stream(NodeId(s.peer.node_id), ACTIVATIONS_PROTOCOL, timeout=10.0) as st:
            position, ids_ = 0, PROMPT
            for step, want in enumerate(wants):
                await protocol.send(st, tokens("lg", step, position, ids_, extra if step == 0 else None))
                _, result = await results.next("lg", timeout=20.0)
                assert result.kind == "result" and result.tensor is not None, result
                got = result.tensor.reshape(-1)
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
                assert result.extra["token"] == int(want.argmax())
                position += len(ids_)
                ids_ = [result.extra["token"]]
            await protocol.send(st, Frame("end", "lg", len(wants), position))

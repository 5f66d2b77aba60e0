"""Activation frames and stage sessions: tensors round-trip bit-exactly without pickle; malformed headers,
wrong dtypes and shapes, oversize and NaN payloads are refused with codes before anything runs; a session
table refuses steps out of order or for unknown sessions without touching the others, and stays bounded."""

from __future__ import annotations

import cbor2
import pytest
import torch

from inference.frames import MAX_HEADER, MAX_TOKENS, Frame, FrameError, decode, decode_header, encode, expect
from inference.sessions import SessionTable
from mesh.errors import PeerError


def roundtrip(frame: Frame) -> Frame:
    header, payload = encode(frame)
    raw, size = decode_header(header)
    assert size == len(payload)
    return decode(raw, payload)


@pytest.mark.parametrize("tensor", [
    torch.randn(1, 5, 64), torch.randn(2, 1, 576).to(torch.bfloat16), torch.randint(0, 50_000, (1, 37)),
    torch.randn(1, 3, 8).half(),
])
def test_tensors_round_trip_bit_exactly(tensor: torch.Tensor) -> None:
    kind = "tokens" if tensor.dtype == torch.int64 else "hidden"
    out = roundtrip(Frame(kind, "s-1", 4, 17, tensor, {"route": ["a", "b"], "temperature": 0.7}))
    assert out.kind == kind and out.session == "s-1" and (out.step, out.start) == (4, 17)
    assert out.tensor is not None and out.tensor.dtype == tensor.dtype and torch.equal(out.tensor, tensor)
    assert out.extra == {"route": ["a", "b"], "temperature": 0.7}
    assert roundtrip(Frame("end", "s-1", 5, 18)).tensor is None


def header(**changes) -> bytes:
    h, _ = encode(Frame("hidden", "s", 0, 0, torch.zeros(1, 2, 4)))
    raw = cbor2.loads(h) | changes
    return cbor2.dumps({k: v for k, v in raw.items() if v is not None})


@pytest.mark.parametrize("data, code", [
    (b"\xff\x00garbage", "MALFORMED_MESSAGE"),
    (b"\xa0" * (MAX_HEADER + 1), "MESSAGE_TOO_LARGE"),
    (header(v=2), "UNSUPPORTED_VERSION"),
    (header(kind="pickle"), "BAD_FRAME"),
    (header(session=""), "BAD_FRAME"),
    (header(step=-1), "BAD_FRAME"),
    (header(session=None), "MALFORMED_MESSAGE"),
    (header(dtype="object"), "BAD_DTYPE"),
    (header(shape=[1, 2, 3, 4]), "BAD_SHAPE"),
    (header(shape=[1, 0, 4]), "BAD_SHAPE"),
    (header(shape=[1, "2", 4]), "BAD_SHAPE"),
    (header(shape=[1, MAX_TOKENS + 1, 4]), "BAD_SHAPE"),
    (header(shape=[64, 8192, 8192]), "MESSAGE_TOO_LARGE"),
])
def test_bad_headers_are_refused_with_a_code(data: bytes, code: str) -> None:
    with pytest.raises(PeerError) as err:
        decode_header(data)
    assert err.value.code == code


def test_payloads_and_tensors_a_stage_does_not_expect_are_refused() -> None:
    h, payload = encode(Frame("hidden", "s", 0, 0, torch.randn(1, 2, 4)))
    raw, _ = decode_header(h)
    with pytest.raises(PeerError) as err:
        decode(raw, payload[:-4])
    assert err.value.code == "BAD_SHAPE"
    nan = torch.full((1, 2, 4), float("nan"))
    h, payload = encode(Frame("hidden", "s", 0, 0, nan))
    with pytest.raises(PeerError) as err:
        decode(decode_header(h)[0], payload)
    assert err.value.code == "BAD_VALUES"
    frame = roundtrip(Frame("hidden", "s", 0, 0, torch.randn(1, 2, 4)))
    assert expect(frame, kind="hidden", dtype=torch.float32, rank=3, hidden=4).shape == (1, 2, 4)
    for kwargs, code in (({"hidden": 8}, "BAD_SHAPE"), ({"dtype": torch.bfloat16}, "BAD_DTYPE"),
                         ({"kind": "tokens"}, "BAD_FRAME"), ({"rank": 2}, "BAD_SHAPE")):
        args = {"kind": "hidden", "dtype": torch.float32, "rank": 3, "hidden": 4} | kwargs
        with pytest.raises(PeerError) as err:
            expect(frame, **args)
        assert err.value.code == code


def test_sessions_advance_in_order_and_stay_bounded() -> None:
    table = SessionTable(max_sessions=2, idle_timeout=10.0)
    a = table.step("a", 0, 0.0, dict)
    table.done(a, 0.0)
    for step, code in ((0, "SESSION_EXISTS"), (5, "STEP_MISMATCH")):
        with pytest.raises(PeerError) as err:
            table.step("a", step, 1.0, dict)
        assert err.value.code == code
    with pytest.raises(PeerError) as err:
        table.step("ghost", 3, 1.0, dict)
    assert err.value.code == "UNKNOWN_SESSION"
    assert table.step("a", 1, 1.0, dict) is a  # the refusals changed nothing
    table.done(a, 1.0)
    b = table.step("b", 0, 2.0, dict)
    table.done(b, 2.0)
    with pytest.raises(PeerError) as err:  # full, nobody idle: refused, no session dropped
        table.step("c", 0, 3.0, dict)
    assert err.value.code == "TOO_MANY_SESSIONS" and "a" in table and "b" in table
    assert table.step("c", 0, 11.5, dict) is not None  # a idle since 1.0: expired to make room
    assert "a" not in table and "b" in table and len(table) == 2
    assert table.end("b") and not table.end("b")


def test_a_stage_refuses_activations_of_another_compute_dtype_from_the_header() -> None:
    """Hidden states must be in the plan's compute dtype: refused (BAD_DTYPE) before a payload byte is read;
    a peer running stages of two dtypes takes either."""
    from types import SimpleNamespace

    from inference.host import fits

    fp32 = SimpleNamespace(first=False, hidden=64, dtype=torch.float32)
    bf16 = SimpleNamespace(first=False, hidden=64, dtype=torch.bfloat16)
    fits([fp32])({"shape": [1, 3, 64], "dtype": "float32"})
    with pytest.raises(FrameError) as err:
        fits([fp32])({"shape": [1, 3, 64], "dtype": "bfloat16"})
    assert err.value.code == "BAD_DTYPE" and "float32" in str(err.value)
    fits([fp32, bf16])({"shape": [1, 3, 64], "dtype": "bfloat16"})
    with pytest.raises(FrameError) as err:
        fits([fp32, bf16])({"shape": [1, 3, 32], "dtype": "bfloat16"})
    assert err.value.code == "BAD_SHAPE"

"""The route a step 0 announces (checked: contiguous from 0, no node twice, bounded), the text a stream of
tokens becomes (stop strings cut and never shown, incomplete characters held back) and the OpenAI request
parameters (defaults, bounds, refusals)."""

from __future__ import annotations

from typing import Any

import pytest

from inference.frames import FrameError
from inference.protocol import MAX_ROUTE, Route, route_of
from inference.sampling import Sampling
from mesh.app.openai import MAX_NEW_TOKENS, MAX_STOP, TextStream, parse_params
from mesh.errors import PeerError
from mesh.ids import Span

# ---- routes ---------------------------------------------------------------------------------------


def step0(**changes: Any) -> dict[str, Any]:
    extra = {"model": "tiny", "revision": "r1", "epoch": [2, 5], "route": [["a", 0, 3], ["b", 3, 5], ["c", 5, 7]],
             "driver": "d", "sampling": {}} | changes
    return {k: v for k, v in extra.items() if v is not None}


def test_a_valid_route() -> None:
    r = route_of(step0())
    assert r == Route("tiny", "r1", (2, 5), (Span("a", 0, 3), Span("b", 3, 5), Span("c", 5, 7)))
    assert r.nodes == ("a", "b", "c")
    assert route_of(r.to_wire()) == r
    assert r.to_wire() == {"model": "tiny", "revision": "r1", "epoch": [2, 5],
                           "route": [["a", 0, 3], ["b", 3, 5], ["c", 5, 7]], "compute": "float32"}
    bf16 = route_of(step0(compute="bfloat16"))
    assert bf16.compute == "bfloat16" and route_of(bf16.to_wire()) == bf16
    with pytest.raises(FrameError) as err:  # a compute dtype no plan may choose
        route_of(step0(compute="float16"))
    assert err.value.code == "BAD_DTYPE"
    one = route_of(step0(route=[["solo", 0, 1]], epoch=[0, 0]))
    assert one.hops == (Span("solo", 0, 1),) and one.epoch == (0, 0)
    many = route_of(step0(route=[[f"n{i}", i, i + 1] for i in range(MAX_ROUTE)]))
    assert len(many.hops) == MAX_ROUTE and many.hops[-1] == Span(f"n{MAX_ROUTE - 1}", MAX_ROUTE - 1, MAX_ROUTE)


@pytest.mark.parametrize("changes", [
    # the ranges
    {"route": [["a", 1, 3], ["b", 3, 7]]},  # does not start at 0
    {"route": [["a", 0, 3], ["b", 4, 7]]},  # a gap
    {"route": [["a", 0, 3], ["b", 2, 7]]},  # an overlap
    {"route": [["a", 0, 3], ["b", 3, 3]]},  # an empty range
    {"route": [["a", 0, 3], ["b", 3, 1]]},  # a range backwards
    {"route": [["a", 0, 3], ["a", 3, 7]]},  # a node twice
    {"route": [["a", 0, 2], ["b", 2, 4], ["a", 4, 7]]},  # a node twice, not adjacent
    {"route": [[f"n{i}", i, i + 1] for i in range(MAX_ROUTE + 1)]},  # too many hops
    {"route": []}, {"route": None}, {"route": "a"}, {"route": {"a": [0, 7]}},
    {"route": [["a", 0]]}, {"route": [["a", 0, 7, 9]]}, {"route": [("a", 0, 7)]}, {"route": [["", 0, 7]]},
    {"route": [[7, 0, 7]]}, {"route": [["a", 0.0, 7]]}, {"route": [["a", False, True]]}, {"route": [["a", "0", "7"]]},
    # what the route is of
    {"model": None}, {"model": ""}, {"model": 5}, {"revision": None}, {"revision": ""}, {"revision": b"r1"},
    {"epoch": None}, {"epoch": [1]}, {"epoch": [1, 2, 3]}, {"epoch": [1, -1]}, {"epoch": [True, 1]},
    {"epoch": [1.0, 2]}, {"epoch": "1:2"}, {"epoch": (1, 2)},
])
def test_bad_routes_are_bad_frames(changes: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as err:
        route_of(step0(**changes))
    assert isinstance(err.value, PeerError) and err.value.code == "BAD_FRAME"


def test_bad_ranges_say_why() -> None:
    for route, reason in [([["a", 0, 3], ["b", 4, 7]], r"route\[1\]: range \[4, 7\) leaves a gap after layer 3"),
                          ([["a", 0, 3], ["a", 3, 7]], r"route\[1\]: node 'a' appears twice")]:
        with pytest.raises(FrameError, match=reason):
            route_of(step0(route=route))


def test_route_of_an_empty_header() -> None:
    with pytest.raises(FrameError) as err:
        route_of({})
    assert err.value.code == "BAD_FRAME"


# ---- text from tokens -----------------------------------------------------------------------------


class ByteTokenizer:
    """Each id stands for fixed bytes (like a byte-level BPE): a character may span two tokens."""

    def __init__(self, pieces: dict[int, bytes], special: frozenset[int] = frozenset()) -> None:
        self.pieces, self.special = pieces, special

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out = b"".join(b"<s>" if i in self.special else self.pieces[i] for i in ids
                       if not (skip_special_tokens and i in self.special))
        return out.decode("utf-8", errors="replace")


TOK = ByteTokenizer({1: b"Hello", 2: b",", 3: b" w", 4: b"orld", 5: b" E", 6: b"ND", 7: b" more", 8: b"!",
                     9: "é".encode()[:1], 10: "é".encode()[1:], 11: b"caf", 12: b"\n\n", 13: b"STOP",
                     14: "😀".encode()[:2], 15: "😀".encode()[2:], 0: b""}, special=frozenset({99}))


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], bool]:
    deltas, stopped = [], False
    for i in ids:
        delta, stopped = stream.push(i)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(stream.finish())
    return deltas, stopped


def test_deltas_add_up_to_the_text() -> None:
    ids = [1, 2, 3, 4, 8, 99, 7]
    deltas, stopped = run(TextStream(TOK, []), ids)
    assert not stopped
    assert "".join(deltas) == TOK.decode(ids, skip_special_tokens=True) == "Hello, world! more"
    assert deltas[:5] == ["Hello", ",", " w", "orld", "!"]  # without stop strings nothing waits
    assert "<s>" not in "".join(deltas)


def test_a_stop_string_cuts_the_text_and_is_never_emitted() -> None:
    s = TextStream(TOK, ["END"])
    deltas, stopped = run(s, [1, 5, 6, 7])  # "Hello" " E" "ND" " more": END split over two tokens
    assert stopped
    assert "".join(deltas) == s.emitted == "Hello "
    assert all("E" not in d for d in deltas)
    assert len(s.ids) == 3  # it stopped at the token that completed the stop string
    # " E" may be the start of "END": held back until the next token shows it is not
    s = TextStream(TOK, ["END"])
    first, stopped = s.push(1)
    assert not stopped and first == s.emitted and "Hello".startswith(first)
    second, stopped = s.push(5)
    assert not stopped and not s.emitted.endswith("E") and s.emitted == first + second
    third, stopped = s.push(7)
    assert not stopped and s.emitted.startswith("Hello E") and s.emitted == first + second + third
    tail = s.finish()
    assert first + second + third + tail == s.emitted == "Hello E more"


def test_the_earliest_of_several_stop_strings_wins() -> None:
    s = TextStream(TOK, ["STOP", "\n\n"])
    deltas, stopped = run(s, [1, 12, 13, 7])
    assert stopped and "".join(deltas) == "Hello"
    s = TextStream(TOK, ["orld", "Hello"])
    deltas, stopped = run(s, [1, 3, 4])
    assert stopped and "".join(deltas) == ""


def test_an_incomplete_character_is_held_back() -> None:
    s = TextStream(TOK, [])
    assert s.push(11) == ("caf", False)
    assert s.push(9) == ("", False)  # half of "é": decodes to "caf\ufffd"
    assert "\ufffd" not in s.emitted
    assert s.push(10) == ("é", False)
    assert s.push(14) == ("", False) and s.push(15) == ("😀", False)
    assert s.finish() == "" and s.emitted == "café😀"


def test_a_character_never_completed_comes_out_at_the_end() -> None:
    s = TextStream(TOK, [])
    assert s.push(11) == ("caf", False) and s.push(9) == ("", False)
    assert s.finish() == "\ufffd" and s.emitted == "caf\ufffd"


def test_without_a_tokenizer_there_is_no_text() -> None:
    s = TextStream(None, ["x"])
    assert s.push(1) == ("", False) and s.finish() == "" and s.ids == [1]


# ---- OpenAI parameters ----------------------------------------------------------------------------


def test_parameter_defaults() -> None:
    p = parse_params({"model": "tiny"}, 16)
    assert (p.model, p.max_tokens, p.stop, p.stream) == ("tiny", 16, [], False)
    assert (p.sampling.temperature, p.sampling.top_k, p.sampling.top_p) == (1.0, 0, 1.0)  # OpenAI's defaults
    assert 0 <= p.sampling.seed < 2**63
    seeds = {parse_params({"model": "tiny"}, 16).sampling.seed for _ in range(5)}
    assert len(seeds) > 1  # drawn per request


def test_parameters_are_kept() -> None:
    p = parse_params({"model": "m@r", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 11,
                      "stop": "\n", "stream": True}, 16)
    assert (p.model, p.max_tokens, p.stop, p.stream) == ("m@r", 7, ["\n"], True)
    assert p.sampling == Sampling(0.0, 3, 0.5, 11)
    assert parse_params({"model": "m", "seed": 0}, 16).sampling.seed == 0
    assert parse_params({"model": "m", "seed": 2**63 - 1}, 16).sampling.seed == 2**63 - 1
    assert parse_params({"model": "m", "stop": ["a", "b", "c", "d"]}, 16).stop == ["a", "b", "c", "d"]
    assert parse_params({"model": "m", "n": 1, "stop": None, "temperature": None}, 16).sampling.temperature == 1.0


def test_max_tokens_bounds() -> None:
    assert parse_params({"model": "m", "max_tokens": 1}, 16).max_tokens == 1
    assert parse_params({"model": "m", "max_tokens": MAX_NEW_TOKENS}, 16).max_tokens == MAX_NEW_TOKENS
    assert parse_params({"model": "m", "max_tokens": None}, 16).max_tokens == 16
    # max_completion_tokens (the newer name) wins over max_tokens
    assert parse_params({"model": "m", "max_tokens": 5, "max_completion_tokens": 9}, 16).max_tokens == 9
    for bad in (0, -1, MAX_NEW_TOKENS + 1, 2.0, "8", True):
        for key in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(PeerError) as err:
                parse_params({"model": "m", key: bad}, 16)
            assert err.value.code == "INVALID_PARAMETER" and err.value.param == key


@pytest.mark.parametrize(("body", "param"), [
    ({}, "model"), ({"model": ""}, "model"), ({"model": 3}, "model"),
    ({"model": "m", "n": 2}, "n"), ({"model": "m", "n": 0}, "n"),
    ({"model": "m", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"model": "m", "stop": [""]}, "stop"),
    ({"model": "m", "stop": ""}, "stop"), ({"model": "m", "stop": [1]}, "stop"), ({"model": "m", "stop": 5}, "stop"),
    ({"model": "m", "temperature": 2.5}, "temperature"), ({"model": "m", "temperature": -0.1}, "temperature"),
    ({"model": "m", "temperature": "1"}, "temperature"), ({"model": "m", "temperature": True}, "temperature"),
    ({"model": "m", "top_p": 0}, "top_p"), ({"model": "m", "top_p": 1.5}, "top_p"),
    ({"model": "m", "top_k": -1}, "top_k"), ({"model": "m", "top_k": 1.0}, "top_k"),
    ({"model": "m", "seed": -1}, "seed"), ({"model": "m", "seed": 2**63}, "seed"),
    ({"model": "m", "seed": "7"}, "seed"),
    ({"model": "m", "stream": "yes"}, "stream"), ({"model": "m", "stream": 1}, "stream"),
])
def test_bad_parameters_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(PeerError) as err:
        parse_params(body, 16)
    assert err.value.code == "INVALID_PARAMETER"
    assert err.value.param == param


def test_stop_list_limit_is_max_stop() -> None:
    assert MAX_STOP == 4
    assert len(parse_params({"model": "m", "stop": ["x"] * MAX_STOP}, 16).stop) == MAX_STOP

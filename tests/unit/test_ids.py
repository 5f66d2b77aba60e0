"""``ModelRef``: the one place ``id@revision`` is built and read; ``Span`` and ``check_spans``: the one shape
of a layer range on a node and its one validator; ``StageKey``: the gossiped name of a ready stage."""

from __future__ import annotations

import dataclasses

import pytest

from inference.frames import FrameError
from mesh.errors import DecodeError, PeerError
from mesh.ids import ModelRef, Span, StageKey, check_spans, keep_ref


def test_model_refs_round_trip_and_match_installed_entries() -> None:
    for text, model, revision in [("smol", "smol", None), ("org/m@abc-int8", "org/m", "abc-int8"), ("m@", "m", None)]:
        ref = ModelRef.of(text)
        assert (ref.model, ref.revision) == (model, revision) and tuple(ref) == (model, revision)
        assert ModelRef.of(str(ref)) == ref
    assert ModelRef("m").matches("m@r1") and ModelRef("m", "r1").matches("m@r1")
    assert not ModelRef("m", "r2").matches("m@r1") and not ModelRef("m").matches("mm@r1")
    assert not ModelRef("m").matches("m2@r1")


def test_keeping_a_ref_replaces_other_revisions_of_its_model() -> None:
    assert keep_ref(["a@1", "b"], "a@2") == ["b", "a@2"]
    assert keep_ref(["a@1"], "b") == ["a@1", "b"]


# ---- spans: one shape of a layer range on a node, one validator ---------------------------------------


def spans(*rows: tuple[str, int, int]) -> list[Span]:
    return [Span(*row) for row in rows]


def test_a_span_is_a_node_and_a_half_open_range() -> None:
    s = Span("a", 2, 5)
    assert (s.node, s.start, s.end) == ("a", 2, 5) and tuple(s) == ("a", 2, 5) and s.span is s
    node, start, end = s
    assert (node, start, end) == ("a", 2, 5)
    assert s == Span("a", 2, 5) and s != Span("a", 2, 6) and len({s, Span("a", 2, 5)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 0  # type: ignore[misc]
    assert not hasattr(s, "__dict__")  # slotted


def test_valid_spans_pass() -> None:
    check_spans(spans(("a", 0, 3), ("b", 3, 5), ("c", 5, 7)), 7)
    check_spans(spans(("a", 0, 3), ("b", 3, 5)))  # no total: any end
    check_spans(spans(("solo", 0, 1)), 1)


@pytest.mark.parametrize("rows, total, message", [
    ((("a", 0, 3), ("b", 4, 7)), 7, r"stages\[1\]: range \[4, 7\) leaves a gap after layer 3"),
    ((("a", 0, 3), ("b", 2, 7)), 7, r"stages\[1\]: range \[2, 7\) overlaps the range before it, which ends at 3"),
    ((("a", 1, 3), ("b", 3, 7)), 7, r"stages\[0\]: range \[1, 3\) does not start at layer 0"),
    ((("a", -1, 3), ("b", 3, 7)), 7, r"stages\[0\]: range \[-1, 3\) does not start at layer 0"),
    ((("a", 0, 3), ("b", 3, 5)), 7, r"stages cover 5 layers, not 7"),
    ((("a", 0, 3), ("b", 3, 8)), 7, r"stages cover 8 layers, not 7"),
    ((("a", 0, 3), ("b", 3, 3), ("c", 3, 7)), 7, r"stages\[1\]: range \[3, 3\) is empty"),
    ((("a", 0, 3), ("b", 3, 1)), None, r"stages\[1\]: range \[3, 1\) is empty"),
    ((("a", 0, 0),), 0, r"stages\[0\]: range \[0, 0\) is empty"),
    ((("a", 0, 3), ("a", 3, 7)), 7, r"stages\[1\]: node 'a' appears twice"),
    ((("a", 0, 2), ("b", 2, 4), ("a", 4, 7)), 7, r"stages\[2\]: node 'a' appears twice"),
    ((), 7, r"stages: expected at least one stage"),
    ((), None, r"stages: expected at least one stage"),
])
def test_bad_spans_are_refused_with_the_reason(rows, total, message) -> None:
    with pytest.raises(PeerError, match=message) as err:
        check_spans(spans(*rows), total)
    assert type(err.value) is PeerError and err.value.code == "BAD_INPUT"


def test_each_caller_keeps_its_error_class_code_and_wording() -> None:
    bad = spans(("a", 0, 3), ("b", 4, 7))
    with pytest.raises(DecodeError, match=r"^plan\.assignments\[1\]: .*contiguous") as err:
        check_spans(bad, 7, error=DecodeError, what="plan.assignments")
    assert err.value.code == "MALFORMED_MESSAGE"
    with pytest.raises(PeerError, match=r"^current_splits cover 3 layers") as err2:
        check_spans(bad[:1], 7, code="INVALID_PLAN_INPUT", what="current_splits")
    assert err2.value.code == "INVALID_PLAN_INPUT" and err2.value.http_status == 400
    with pytest.raises(FrameError) as err3:
        check_spans(bad, error=FrameError, what="route")
    assert err3.value.code == "BAD_FRAME"


def test_spans_of_other_shapes_are_checked_by_their_range() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Costed(Span):
        cost: float

    check_spans([Costed("a", 0, 2, 1.0), Costed("b", 2, 4, 2.0)], 4)
    with pytest.raises(PeerError, match="appears twice"):
        check_spans([Costed("a", 0, 2, 1.0), Costed("a", 2, 4, 2.0)], 4)
    c = Costed("a", 0, 2, 1.0)
    assert tuple(c) == ("a", 0, 2) and c.span == Span("a", 0, 2) and type(c.span) is Span and c != c.span


# ---- stage keys: how a ready stage is named in gossip --------------------------------------------------


def test_a_stage_key_prints_the_gossiped_format() -> None:
    key = StageKey(ModelRef("smol", "r1"), 0, 12, "bfloat16")
    assert str(key) == "smol@r1:0:12:bfloat16"
    assert str(StageKey.make("smol", "r1", 3, 7)) == "smol@r1:3:7:float32"
    assert str(StageKey.make("smol", "", 3, 7)) == "smol:3:7:float32" == str(StageKey(ModelRef("smol"), 3, 7))
    assert StageKey.make("smol", "", 3, 7) == StageKey(ModelRef("smol"), 3, 7)


@pytest.mark.parametrize("model, revision", [
    ("smol", "r1"), ("smol", None), ("org/SmolLM2-135M", "abc123-int8"), ("org/m", "a:b"), ("m", "v1@2"),
    ("m", "::"), ("m", "rev:0:1:float32"), ("m", "ünï cødé"), ("m", "1"), ("m", "a b/c.d_e"), ("org.x/y_z", "0"),
])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_stage_keys_round_trip(model: str, revision: str | None, compute: str) -> None:
    key = StageKey(ModelRef(model, revision), 4, 16, compute)
    text = str(key)
    assert text == f"{ModelRef(model, revision)}:4:16:{compute}"
    assert StageKey.of(text) == key and str(StageKey.of(text)) == text
    assert StageKey.of(text).ref == ModelRef.of(str(ModelRef(model, revision)))


@pytest.mark.parametrize("text", [
    "", "smol", "smol@r1", "smol@r1:0:12", ":0:12:float32", "smol@r1:a:12:float32", "smol@r1:0:-1:float32",
    "smol@r1:0:12:", "smol@r1:0x1:12:float32", "smol@r1:01:12:float32", "smol@r1: 1:12:float32",
    "smol@r1:١:12:float32",
])
def test_text_that_is_no_stage_key_is_malformed(text: str) -> None:
    with pytest.raises(DecodeError, match="stage key") as err:
        StageKey.of(text)
    assert err.value.code == "MALFORMED_MESSAGE"

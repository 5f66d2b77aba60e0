"""``ModelRef``: the one place ``id@revision`` is built and read."""

from __future__ import annotations

from mesh.ids import ModelRef, keep_ref


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

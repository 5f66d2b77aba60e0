"""One table of error codes (``mesh.errors.CODES``): every code the source raises is in it, nothing else is,
an error's HTTP status is its code's whichever class raised it, and the README's list is the table."""

from __future__ import annotations

import re
from pathlib import Path

from mesh.errors import CODES, LocalError, MeshError, NotFoundError, PeerError, markdown

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mesh", "coordinator", "storage", "inference")
#: How source names a code: a class's ``code = "X"``, an error's ``code="X"``, a reply's ``"code": "X"``.
USES = re.compile(r'code(?:: str)? ?= ?"([A-Z][A-Z0-9_]+)"'  # code = "X", code: str = "X", code="X"
                  r'|"code": "([A-Z][A-Z0-9_]+)"'  # {"code": "X"}
                  r'|(?:\{|, )\d{3}: "([A-Z][A-Z0-9_]+)"')  # {404: "X", 405: "Y"}


def codes_in_source() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for m in USES.finditer(path.read_text()):
                found.setdefault(next(g for g in m.groups() if g), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_code_in_the_source_is_in_the_table_and_every_entry_is_used() -> None:
    used = codes_in_source()
    assert len(used) > 60, "the scan must see the source's codes (the test would be toothless)"
    assert sorted(set(used) - set(CODES)) == [], "codes raised but not in mesh.errors.CODES"
    assert sorted(set(CODES) - set(used)) == [], "codes in the table that nothing raises"
    for code, entry in CODES.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", code) and 100 <= entry.status < 600 and entry.meaning, code


def test_no_error_class_keeps_a_status_of_its_own() -> None:
    """The status is the table's: a class attribute would shadow it (the cause of MODEL_NOT_AVAILABLE
    answering 503 from two classes but 404 when raised as a NotFoundError)."""
    import importlib

    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            importlib.import_module(f"{package}.{path.stem}" if path.stem != "__init__" else package)
    seen, todo = [], [MeshError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    assert len(seen) > 20
    assert [c.__name__ for c in seen if "http_status" in vars(c) and c is not MeshError] == []
    assert NotFoundError("x", code="MODEL_NOT_AVAILABLE").http_status == CODES["MODEL_NOT_AVAILABLE"].status == 503
    assert PeerError("x", code="PEER_TIMEOUT").http_status == 504
    assert LocalError("x").http_status == 500 and MeshError("x", code="NOT_IN_THE_TABLE").http_status == 500
    err = PeerError("x", code="METHOD_NOT_ALLOWED")
    err.http_status = 405  # an HTTP layer's own status is kept
    assert err.http_status == 405


def test_the_readme_lists_exactly_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown() in readme, "README's error table differs from `python -m mesh.errors`"

"""The sans-IO rule, checked: pure modules import no I/O library, no event loop and no clock."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "mesh/errors.py", "mesh/ids.py", "mesh/identity.py", "mesh/wire.py", "mesh/membership.py", "mesh/peer.py",
    "mesh/sim.py", "mesh/config.py", "coordinator/election.py", "coordinator/planner.py", "coordinator/plans.py",
    "coordinator/control.py", "storage/formats.py", "storage/manifest.py", "inference/sessions.py",
]
# Pure third-party helpers: CBOR, ed25519, base58. No trio, libp2p, torch, psutil, HTTP, sockets, clocks.
ALLOWED_THIRD_PARTY = {"cbor2", "cryptography", "base58"}
FORBIDDEN_STDLIB = {"time", "socket", "asyncio", "threading", "subprocess", "datetime"}
PURE_MODULES = {p.removesuffix(".py").replace("/", ".") for p in PURE}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from coordinator import planner`` imports the module coordinator.planner
            subs = {f"{node.module}.{a.name}" for a in node.names} & PURE_MODULES
            names.update(subs or {node.module})
    return names


@pytest.mark.parametrize("rel", PURE)
def test_pure_module_imports(rel: str) -> None:
    for name in _imports(ROOT / rel):
        top = name.split(".")[0]
        if name in PURE_MODULES or top == "__future__":
            continue
        assert top not in FORBIDDEN_STDLIB, f"{rel} imports {name}: pure modules take time as an argument"
        assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY, f"{rel} imports {name}"


def test_only_transport_imports_libp2p() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for pkg in ("mesh", "coordinator", "storage", "inference")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "transport.py" and any(n.split(".")[0] == "libp2p" for n in _imports(p))
    ]
    assert offenders == []

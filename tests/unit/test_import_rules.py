"""The sans-IO rule, checked: pure modules import no I/O library, no event loop and no clock."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "mesh/errors.py", "mesh/ids.py", "mesh/identity.py", "mesh/wire.py", "mesh/membership.py", "mesh/peer.py",
    "mesh/admission.py", "mesh/tally.py",
    "mesh/sim.py", "mesh/config.py", "coordinator/election.py", "coordinator/planner.py", "coordinator/plans.py",
    "coordinator/control.py", "coordinator/search.py", "mesh/links.py", "storage/formats.py", "storage/manifest.py",
    "storage/pieces.py", "storage/queue.py", "inference/sessions.py",
]
# Pure third-party helpers: CBOR, ed25519, base58, numpy (the planner's search). No trio, libp2p, torch,
# psutil, HTTP, sockets, clocks.
ALLOWED_THIRD_PARTY = {"cbor2", "cryptography", "base58", "numpy"}
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


# ---- layers: foundation → pure cores → adapters → services → root -------------------------------------

PACKAGES = ("mesh", "coordinator", "storage", "inference")
FOUNDATION = {"mesh", "coordinator", "storage", "inference", "mesh.errors", "mesh.ids", "mesh.identity",
              "mesh.wire", "mesh.fsutil", "mesh.logs", "mesh.tally"}
CORES = {"mesh.membership", "mesh.admission", "mesh.peer", "mesh.sim", "mesh.config", "coordinator.election",
         "coordinator.planner", "coordinator.plans", "coordinator.control", "coordinator.search", "mesh.links",
         "storage.formats", "storage.pieces", "storage.queue",
         "storage.manifest",
         "inference.sessions"}
ADAPTERS = {"mesh.transport", "mesh.memtransport", "mesh.keyfile", "mesh.credential", "mesh.hardware", "mesh.churn",
            "mesh.ports",
            "storage.store", "storage.registry", "storage.transfer", "storage.gguf", "storage.convert",
            "storage.quantize", "storage.metadata", "storage.shards", "storage.synthetic", "inference.stage",
            "inference.blocks", "inference.qlinear", "inference.protocol", "inference.frames", "inference.sampling",
            "inference.tokenizer", "inference.local", "inference.results", "storage.families",
            *(f"storage.families.{p.stem}" for p in (ROOT / "storage" / "families").glob("[!_]*.py"))}
SERVICES = {"coordinator.service", "inference.host", "inference.driver", "storage.library", "mesh.gate"}
LAYERS = ("foundation", "pure core", "adapter", "service", "root")


def layer_of(module: str) -> int:
    if module == "mesh.app" or module.startswith("mesh.app."):
        return 4
    for i, group in enumerate((FOUNDATION, CORES, ADAPTERS, SERVICES)):
        if module in group:
            return i
    raise AssertionError(f"{module} is in no layer: add it to one in {__file__}")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Every project import of every project module: at the top, inside functions, under TYPE_CHECKING,
    relative or absolute. ``from a import b`` counts as importing ``a.b`` when that is a module."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return [*path[path.index(w):], w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        layer_of(name)


def test_imports_only_go_down_the_layers_and_services_never_import_each_other() -> None:
    bad = []
    for name, deps in import_graph().items():
        for dep in deps:
            lo, hi = layer_of(dep), layer_of(name)
            if lo > hi or (lo == hi == 3):
                bad.append(f"{name} ({LAYERS[hi]}) imports {dep} ({LAYERS[lo]})")
    assert bad == []


def test_the_import_graph_has_no_circle() -> None:
    assert _cycle(import_graph()) is None


def test_the_rules_catch_what_they_forbid() -> None:
    """The checker itself: a circle, a service importing a service, an upward import are all seen."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "mesh.app.node" in graph["mesh.app.main"]  # relative and absolute imports are both read
    assert layer_of("inference.driver") == layer_of("inference.host") == 3
    assert layer_of("mesh.app.node") == 4 and layer_of("mesh.errors") == 0

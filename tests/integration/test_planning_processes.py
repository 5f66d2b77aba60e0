"""Three real `meshnode start` processes with different memory offers and memory bandwidths agree on one
plan, and it is the exact latency optimum over what they gossip (a brute force over every subset, order and
split of the layers here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_llama

from coordinator import search
from coordinator.planner import Peer
from coordinator.service import planner_layers
from mesh.app.cli import main as cli
from mesh.app.localmesh import LocalMesh, agreed, wait_for
from mesh.identity import Identity
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
MODEL = "tiny"


def test_three_peers_with_different_memory_agree_on_the_exact_latency_plan(tmp_path: Path) -> None:
    tiny_llama(num_hidden_layers=8).save_pretrained(tmp_path / "llama")
    assert cli(["models", "--data-dir", str(tmp_path / "a"), "add", str(tmp_path / "llama"), "--id", MODEL]) == 0
    manifest = Store(tmp_path / "a" / "store", Identity.generate()).manifest(MODEL)[0]
    need = sum(x.bytes for x in planner_layers(manifest, 2048))
    # 45%, 40%, 35% of the model: no two peers hold it, so the plan has all three; which layers go where is
    # what the speed model decides (decode reads every weight: the peer with the most bandwidth takes most).
    offers = {"a": (0.45, 10), "b": (0.40, 20), "c": (0.35, 40)}
    common = ("--objective", "latency", "--compute-gflops", "50", "--link-interval", "1", "--benchmark-seconds", "0")
    with LocalMesh(tmp_path, config_file=CONFIG, extra_args=common) as mesh:
        def args(name: str) -> tuple[str, ...]:
            share, gbps = offers[name]
            return ("--max-layer-memory-mb", f"{share * need / 2**20:.6f}", "--memory-bandwidth-gbps", str(gbps),
                    *(("--serve", MODEL) if name == "a" else ()))

        a = mesh.start_peer("a", args=args("a"))
        b, c = (mesh.wait_started(p) for p in [mesh.launch(n, a.addrs[:1], args=args(n)) for n in "bc"])
        peers = [a, b, c]
        wait_for(lambda: agreed(peers), 30, what="one coordinator")

        def one_plan() -> dict | None:
            views = [p.get("/api/plan")["plans"] for p in peers]
            if not all(len(v) == 1 for v in views) or len({v[0]["envelope"] for v in views}) != 1:
                return None
            return views[0][0]

        plan = wait_for(one_plan, 30, what="the same signed plan on all three peers")
        assert plan["objective"] == "latency" and plan["why"]["exact"] is True and plan["why"]["stages"] == 3
        rows = {r["node_id"]: r for r in a.get("/api/nodes")["nodes"]}
        assert {r["name"]: r["memory_bandwidth"] for r in rows.values()} == {n: g * 1e9 for n, (_, g) in offers.items()}
        usable = [Peer(n, r["compute_flops"], r["layer_memory_bytes"], bandwidth=r["memory_bandwidth"])
                  for n, r in rows.items()]
        layers = planner_layers(manifest, 2048, plan["compute_dtype"])
        # Every feasible plan has the three peers, so its hops are the same three links whatever the order:
        # the stages' compute decides, and it must be the brute force's optimum.
        optimum = search.brute_force(layers, usable, objective="latency")
        assert optimum < float("inf")
        pos = {x.index: i for i, x in enumerate(layers)}
        by_id = {q.node_id: q for q in usable}
        ranges = [(by_id[s["assigned_node"]], pos[s["layer_range"][0]], pos[s["layer_range"][1] - 1] + 1)
                  for s in plan["model_split_plan"]["splits"]]
        assert search.cost(search.build(layers, ranges, search.Links()), "latency") == pytest.approx(optimum, rel=1e-9)
        by_name = {rows[s["assigned_node"]]["name"]: s["layer_range"] for s in plan["model_split_plan"]["splits"]}
        print("plan:", by_name, plan["why"])

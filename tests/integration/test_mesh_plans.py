"""Three real `meshnode start` processes agree on one signed plan for a tiny model; after kill -9 of a
peer of the plan (a follower, or the coordinator itself) the two survivors agree on a new epoch that
covers every layer within 10 s."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coordinator.plans import open_plan
from coordinator.service import planner_layers
from mesh.app.cli import main as cli
from mesh.app.client import api_get
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.errors import MeshError
from mesh.identity import Identity
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
CONTEXT = 2048


def model_folder(path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)).save_pretrained(path)
    return path


def plan_views(peers: list[PeerProcess]) -> list[dict[str, Any]] | None:
    views = []
    for p in peers:
        v = p.try_get("/api/plan")
        if v is None or len(v["plans"]) != 1:
            return None
        views.append(v["plans"][0])
    return views


def agreed_plan(peers: list[PeerProcess], newer_than: tuple[int, int] = (0, 0)) -> dict[str, Any] | None:
    """The plan when every peer holds the same signed plan (same term, epoch, coordinator, stages)."""
    views = plan_views(peers)
    if views is None or len({v["envelope"] for v in views}) != 1:
        return None
    return views[0] if (views[0]["term"], views[0]["epoch"]) > newer_than else None


def post(peer: PeerProcess, path: str, body: dict[str, Any]) -> Any:
    return api_get(peer.api, path, method="POST", timeout=10.0, body=body)


def error_code(peer: PeerProcess, path: str, body: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(MeshError) as err:
        post(peer, path, body)
    return err.value.code, str(err.value)


# kill -9 of the coordinator and the plan that follows: tests/services (in process) and test_three_peers (processes)
def test_three_peers_agree_on_a_signed_plan_and_recover_from_kill_9(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny")
    for name in ("a", "b"):  # c has no copy: if it coordinates, it asks a holder for the manifest
        assert cli(["models", "--data-dir", str(tmp_path / "mesh" / name), "add", str(folder), "--id", "tiny"]) == 0
    manifest = Store(tmp_path / "mesh" / "a" / "store", Identity.generate()).manifest("tiny")[0]
    need = sum(x.bytes for x in planner_layers(manifest, CONTEXT))
    # Each peer offers 70% of what the model needs: no peer can run it alone, any two can, and every
    # stage has a fallback (a peer with room for one more third).
    offer = ("--max-layer-memory-mb", f"{0.7 * need / 2**20:.6f}", "--hop-ms", "0.05",
             "--context-tokens", str(CONTEXT))

    with LocalMesh(tmp_path / "mesh", config_file=CONFIG, extra_args=offer) as mesh:
        a = mesh.start_peer("a")
        b = mesh.start_peer("b", a.addrs[:1])
        c = mesh.start_peer("c", b.addrs[:1])
        peers = [a, b, c]
        coordinator_id, term = wait_for(lambda: agreed(peers), 30, what="one coordinator")
        coord = next(p for p in peers if p.node_id == coordinator_id)
        follower = next(p for p in peers if p is not coord)

        # Only the coordinator plans; a follower says who to ask.
        code, message = error_code(follower, "/api/plan", {"model": "tiny"})
        assert code == "NOT_COORDINATOR" and coordinator_id in message
        assert error_code(coord, "/api/plan", {"model": "nope"})[0] == "MODEL_NOT_AVAILABLE"
        made = post(coord, "/api/plan", {"model": "tiny"})["plans"][0]
        plan = wait_for(lambda: agreed_plan(peers), 15, what="all three peers to hold the same plan")
        assert plan["envelope"] == made["envelope"]
        signed = open_plan(bytes.fromhex(plan["envelope"]))  # verifies the coordinator's signature
        assert signed.coordinator == coordinator_id and signed.term == term and signed.model_id == "tiny"
        splits = plan["model_split_plan"]["splits"]
        assert splits[0]["layer_range"][0] == 0
        assert all(x["layer_range"][1] == y["layer_range"][0] for x, y in itertools.pairwise(splits))
        assert splits[-1]["layer_range"][1] == plan["model_split_plan"]["total_layers"] == len(manifest.shards)
        assert {s["assigned_node"] for s in splits} == {p.node_id for p in peers}  # nobody can hold it alone
        assert all(f["node_id"] for f in plan["fallback_nodes"])

        # What-if reassignment on a follower: computed, not published (only the coordinator publishes).
        lost = next(s["assigned_node"] for s in splits if s["assigned_node"] != coordinator_id)
        answer = post(follower, "/api/reassign-node",
                      {"failed_nodes": [lost], "current_splits": splits, "request_id": "r-1"})
        assert answer["request_id"] == "r-1" and not answer["published"]
        assert lost not in {s["assigned_node"] for s in answer["new_splits"]} and answer["reassigned_nodes"]
        assert answer["new_splits"][-1]["layer_range"][1] == len(manifest.shards)
        assert error_code(follower, "/api/reassign-node",
                          {"failed_nodes": [lost], "current_splits": splits[:1]})[0] == "INVALID_PLAN_INPUT"
        assert error_code(follower, "/api/reassign-node",
                          {"failed_nodes": ["nobody"], "current_splits": [
                              {**splits[0], "assigned_node": "stranger"}, *splits[1:]]})[0] == "UNKNOWN_NODE"
        assert agreed_plan(peers)["epoch"] == plan["epoch"]  # nothing changed for the mesh

        # kill -9 a follower of the plan, or the coordinator itself (then a new term is elected first).
        victim = next(p for p in peers if p.node_id == lost)
        survivors = [p for p in peers if p is not victim]
        killed_at = time.monotonic()
        victim.proc.kill()
        victim.proc.wait()
        after = wait_for(lambda: agreed_plan(survivors, (plan["term"], plan["epoch"])), 10, interval=0.1,
                         what="a new epoch on both survivors")
        took = time.monotonic() - killed_at
        new_splits = after["model_split_plan"]["splits"]
        assert {s["assigned_node"] for s in new_splits} == {p.node_id for p in survivors}, new_splits
        assert new_splits[0]["layer_range"][0] == 0 and new_splits[-1]["layer_range"][1] == len(manifest.shards)
        assert all(x["layer_range"][1] == y["layer_range"][0] for x, y in itertools.pairwise(new_splits))
        assert after["epoch"] > plan["epoch"] and after["reason"] in ("reassign", "replan")
        assert open_plan(bytes.fromhex(after["envelope"])).coordinator in {p.node_id for p in survivors}
        print(f"new epoch {after['epoch']} (term {after['term']}, {after['reason']}) agreed {took:.1f}s after "
              f"kill -9 of {'the coordinator' if victim is coord else 'a follower'}")

        # One survivor alone cannot hold the model: a clear error naming the shortfall, no partial plan.
        new_coord = next(p for p in survivors if p.node_id == after["coordinator"])
        other = next(p for p in survivors if p is not new_coord)
        code, message = error_code(new_coord, "/api/reassign-node",
                                   {"failed_nodes": [other.node_id], "current_splits": new_splits})
        assert code == "PLAN_INFEASIBLE" and "short" in message
        assert agreed_plan(survivors)["epoch"] == after["epoch"]
        for p in survivors:
            assert p.alive() and not any(r.get("levelname") == "CRITICAL" for r in p.log_records())


def flip(data: bytes, at: int) -> bytes:
    """``data`` with every bit of the byte at ``at`` inverted: always a different message."""
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)

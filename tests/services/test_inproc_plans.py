"""Three peers in one process (memory transport, virtual clock) agree on one signed plan for a tiny model, asked
for through the real HTTP API (``build_app`` over httpx's ASGI transport): only the coordinator plans, a
follower computes what-if reassignments without publishing them, a follower of the plan killed (as kill -9)
gives a new epoch on both survivors within seconds, and one survivor alone cannot hold the model."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from tiny_models import tiny_llama

from coordinator.plans import open_plan
from coordinator.service import planner_layers
from mesh.app.api import build_app
from mesh.app.inproc import InProcessMesh, Peer
from mesh.config import Config, InferenceConfig

MODEL = "tiny"
CONTEXT = 2048


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (6 blocks) saved as a folder."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama(0, num_hidden_layers=6, vocab_size=256, initializer_range=0.02,
               max_position_embeddings=2048).save_pretrained(folder)
    return folder


def config() -> Config:
    c = Config()
    return dataclasses.replace(
        c, coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05, objective="throughput", context_tokens=CONTEXT),
        inference=InferenceConfig(recovery_timeout=20.0, step_timeout=10.0, compute_dtype="float32"))


@asynccontextmanager
async def clients(peers: list[Peer]) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """An HTTP client per peer (by node id) talking to that peer's real API app in process."""
    out = {}
    try:
        for p in peers:
            out[p.node_id] = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(p.node)),
                                               base_url="http://peer")
        yield out
    finally:
        for c in out.values():
            await c.aclose()


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def error_code(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[str, str]:
    r = await client.post(path, json=body)
    assert r.status_code >= 400, r.text
    err = r.json()["error"]
    return err["code"], err["message"]


def agreed_plan(peers: list[Peer], newer_than: tuple[int, int] = (0, 0)) -> dict[str, Any] | None:
    """The plan (as GET /api/plan shows it) when every peer holds the same signed plan, newer than ``newer_than``."""
    views = []
    for p in peers:
        v = p.node.plans.view()
        if len(v["plans"]) != 1:
            return None
        views.append(v["plans"][0])
    if len({v["envelope"] for v in views}) != 1:
        return None
    return views[0] if (views[0]["term"], views[0]["epoch"]) > newer_than else None


async def plan_over_http(peers: list[Peer], http: dict[str, httpx.AsyncClient]) -> list[dict[str, Any]]:
    """Every peer's plan as its GET /api/plan answers."""
    out = []
    for p in peers:
        r = await http[p.node_id].get("/api/plan")
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def contiguous(splits: list[dict[str, Any]], total: int) -> bool:
    return (splits[0]["layer_range"][0] == 0 and splits[-1]["layer_range"][1] == total
            and all(x["layer_range"][1] == y["layer_range"][0] for x, y in itertools.pairwise(splits)))


async def test_three_peers_agree_on_a_signed_plan_and_recover_from_kill_9(
        tmp_path: Path, tiny: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with InProcessMesh(tmp_path, config()) as mesh:
        for name in ("a", "b"):  # c has no copy: if it coordinates, it asks a holder for the manifest
            mesh.store(name).add(str(tiny), model_id=MODEL)
        manifest = mesh.store("a").manifest(MODEL)[0]
        total = len(manifest.shards)
        need = sum(x.bytes for x in planner_layers(manifest, CONTEXT, "float32"))
        # Each peer offers 70% of what the model needs: no peer can run it alone, any two can, and every
        # stage has a fallback (a peer with room for one more third).
        peers = [await mesh.start(name, layer_memory=int(0.7 * need)) for name in "abc"]
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        coordinator_id = peers[0].node.core.leadership.coordinator
        term = peers[0].node.core.leadership.term
        coord = next(p for p in peers if p.node_id == coordinator_id)
        follower = next(p for p in peers if p is not coord)

        async with clients(peers) as http:
            # Only the coordinator plans; a follower says who to ask.
            code, message = await error_code(http[follower.node_id], "/api/plan", {"model": MODEL})
            assert code == "NOT_COORDINATOR" and coordinator_id in message
            assert (await error_code(http[coord.node_id], "/api/plan", {"model": "nope"}))[0] == "MODEL_NOT_AVAILABLE"
            made = (await post(http[coord.node_id], "/api/plan", {"model": MODEL}))["plans"][0]
            plan = await mesh.wait(lambda: agreed_plan(peers), timeout=15, what="all three peers to hold one plan")
            views = await plan_over_http(peers, http)
            assert {v["plans"][0]["envelope"] for v in views} == {made["envelope"]} == {plan["envelope"]}
            signed = open_plan(bytes.fromhex(plan["envelope"]))  # verifies the coordinator's signature
            assert signed.coordinator == coordinator_id and signed.term == term and signed.model_id == MODEL
            splits = plan["model_split_plan"]["splits"]
            assert contiguous(splits, total) and plan["model_split_plan"]["total_layers"] == total
            assert {s["assigned_node"] for s in splits} == {p.node_id for p in peers}  # nobody can hold it alone
            assert plan["fallback_nodes"] and all(f["node_id"] for f in plan["fallback_nodes"])

            # What-if reassignment on a follower: computed, not published (only the coordinator publishes).
            lost = next(s["assigned_node"] for s in splits if s["assigned_node"] != coordinator_id)
            # The seeds' NodeReassignmentPayload, exactly: its splits carry only the seeds' four keys.
            seed_splits = [{k: s[k] for k in ("layer_range", "assigned_node", "memory_requirement_mb",
                                              "compute_requirement")} for s in splits]
            answer = await post(http[follower.node_id], "/api/reassign-node",
                                {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
                                 "failed_nodes": [lost], "current_splits": seed_splits, "request_id": "r-1"})
            assert answer["request_id"] == "r-1" and answer["published"] is False
            assert lost not in {s["assigned_node"] for s in answer["new_splits"]} and answer["reassigned_nodes"]
            assert answer["new_splits"][-1]["layer_range"][1] == total
            assert (await error_code(http[follower.node_id], "/api/reassign-node",
                                     {"failed_nodes": [lost], "current_splits": splits[:1]}))[0] == "INVALID_PLAN_INPUT"
            stranger = [{**splits[0], "assigned_node": "stranger"}, *splits[1:]]
            assert (await error_code(http[follower.node_id], "/api/reassign-node",
                                     {"failed_nodes": ["nobody"], "current_splits": stranger}))[0] == "UNKNOWN_NODE"
            await trio.sleep(3.0)  # past a republish: nothing changed for the mesh
            assert agreed_plan(peers)["epoch"] == plan["epoch"]

            # kill -9 a follower of the plan: both survivors agree on a new epoch within seconds.
            victim = next(p for p in peers if p.node_id == lost)
            survivors = [p for p in peers if p is not victim]
            killed_at = trio.current_time()
            mesh.kill(victim.name)
            after = await mesh.wait(lambda: agreed_plan(survivors, (plan["term"], plan["epoch"])), timeout=10,
                                    what="a new epoch on both survivors")
            took = trio.current_time() - killed_at
            assert took < 10
            print(f"new epoch {after['epoch']} (term {after['term']}, {after['reason']}) {took:.1f} s after kill -9")
            new_splits = after["model_split_plan"]["splits"]
            assert {s["assigned_node"] for s in new_splits} == {p.node_id for p in survivors}, new_splits
            assert contiguous(new_splits, total)
            assert after["epoch"] > plan["epoch"] and after["reason"] in ("reassign", "replan")
            assert open_plan(bytes.fromhex(after["envelope"])).coordinator in {p.node_id for p in survivors}

            # One survivor alone cannot hold the model: a clear error naming the shortfall, no partial plan.
            new_coord = next(p for p in survivors if p.node_id == after["coordinator"])
            other = next(p for p in survivors if p is not new_coord)
            code, message = await error_code(http[new_coord.node_id], "/api/reassign-node",
                                             {"failed_nodes": [other.node_id], "current_splits": new_splits})
            assert code == "PLAN_INFEASIBLE" and "short" in message
            await trio.sleep(3.0)
            assert agreed_plan(survivors)["epoch"] == after["epoch"]
            assert all(not p.scope.cancel_called for p in survivors)
        assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]

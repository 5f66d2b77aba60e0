"""Whole peers in one process on the memory transport and a virtual clock: plan following, serving, failover
(a middle stage killed mid-generation, the coordinator killed), a join and a drain, in seconds. The oracle is
the unsplit model: the mesh's tokens equal transformers' greedy tokens with the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
import torch
import trio
import trio.testing
from seed_payloads import DEVICE_INFO, NODE_INFO, TRAINING_STATUS
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from coordinator import search
from coordinator.plans import PLAN, encode_plan, seal_plan
from coordinator.service import planner_layers
from inference.driver import Request
from mesh.app.api import build_app
from mesh.app.inproc import InProcessMesh
from mesh.config import Config, InferenceConfig
from mesh.gate import become_member
from mesh.identity import Identity
from mesh.wire import PLANS_TOPIC, NodeStatus, seal
from storage.store import Store

PROMPT = (3, 17, 42, 7, 99, 5)
MODEL = "llama"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A tiny random Llama saved as a folder, and its greedy tokens (transformers, unsplit, own KV cache)."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, tie_word_embeddings=True, initializer_range=0.5, max_position_embeddings=512)).eval()
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    ids, cache, out = torch.tensor([PROMPT]), DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(48):
            out.append(int(model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return folder, out


def config() -> Config:
    c = Config()
    return dataclasses.replace(
        c, coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05, objective="throughput"),
        inference=InferenceConfig(recovery_timeout=20.0, step_timeout=10.0, compute_dtype="float32"))


async def three_peers(mesh: InProcessMesh, folder: Path, holders: tuple[str, ...] = ("a",)) -> list:
    """a, b, c each offering 60% of the model's memory (no peer runs it alone, any two can), ``holders``
    with the model installed; converged, the model asked to be served and ready on 3 stages."""
    for name in holders:
        mesh.store(name).add(str(folder), model_id=MODEL)
    manifest = mesh.store(holders[0]).manifest(MODEL)[0]
    offer = int(0.6 * sum(x.bytes for x in planner_layers(manifest, 2048, "float32")))
    peers = [await mesh.start(name, layer_memory=offer) for name in "abc"]
    await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
    await peers[2].node.request_serve(MODEL)
    await mesh.wait(lambda: all(p.node.driver.route(MODEL) and len(p.node.driver.route(MODEL).hops) == 3
                                for p in peers), timeout=60, what="3 ready stages")
    return peers


def api_client(node) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    """A client of the peer's real HTTP app, in process (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(node)), base_url="http://peer")


def flip(data: bytes, at: int) -> bytes:
    """``data`` with every bit of the byte at ``at`` inverted: always a different message."""
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def on_stage(peers: list, k: int):  # type: ignore[no-untyped-def]
    """The peer that runs stage ``k`` of the current route."""
    route = peers[0].node.driver.route(MODEL)
    return next(p for p in peers if p.node_id == route.hops[k].node)


async def generate(node, n: int, on_token=None) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    async for tok in node.driver.generate(Request(MODEL, PROMPT, n)):
        out.append(tok.id)
        if on_token is not None:
            on_token(len(out))
    return out


async def test_three_peers_serve_the_unsplit_tokens(tmp_path: Path, tiny: tuple[Path, list[int]],
                                                    autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        a, _, c = await three_peers(mesh, folder)
        assert await generate(c.node, 24) == want[:24]
        assert await generate(a.node, 24) == want[:24]  # a driver whose first stage is in-process
        # c held nothing: it fetched its stage's shards from a, SHA256-checked.
        assert {s.model for s in c.node.stages.loaded.values()} == {MODEL}
        # The views the API serves, built from the same services.
        plan = a.node.plans.view(MODEL)["plans"][0]
        assert len(plan["model_split_plan"]["splits"]) == 3
        assert plan["coordinator"] == a.node.core.leadership.coordinator
        row = c.node.serving(MODEL)["models"][0]
        assert row["ready"] and [s["ready"] for s in row["stages"]] == [True] * 3


async def test_generation_requests_on_any_endpoint_count_in_the_model_ranking(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, _ = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        *_, c = await three_peers(mesh, folder)
        async with api_client(c.node) as http:
            body = {"model": MODEL, "prompt": list(PROMPT), "max_tokens": 4, "ignore_eos": True}
            for path in ("/v1/completions", "/api/request", "/v1/completions"):
                r = await http.post(path, json=body)
                assert r.status_code == 200, r.text
            assert (await http.post("/v1/completions", json={**body, "model": "nope"})).status_code == 404
            ranking = (await http.get("/api/model-usage/ranking")).json()
        assert [(r["model_id"], r["request_count"], r["rank"]) for r in ranking] == [(MODEL, 3, 1)]
        c.node.store.save_usage()
        reopened = Store(c.node.store.root, Identity.generate())
        assert reopened.ranking()[0]["request_count"] == 3  # a restarted peer keeps the count


async def test_the_seeds_model_selection_payload_serves_its_model(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    seed = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
            "model_selection": {"model_id": MODEL, "model_name": "BERT Base", "selected_at": "2024-01-01T00:00:00Z",
                                "selection_reason": "User selected from desktop interface"},
            "training_config": {"learning_rate": 0.00002, "batch_size": 32, "epochs": 100,
                                "enable_distributed": True}}
    async with InProcessMesh(tmp_path, config()) as mesh:
        mesh.store("a").add(str(folder), model_id=MODEL)
        peers = [await mesh.start(name) for name in "abc"]
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        async with api_client(peers[2].node) as http:
            r = await http.post("/api/model", json=seed)
            assert r.status_code == 202, r.text
            assert MODEL in r.json()["requested"] and r.json()["model_selection"] == seed["model_selection"]
            for bad in ({**seed, "model_selection": "llama"}, {**seed, "model_selection": {"model_name": "x"}}):
                r = await http.post("/api/model", json=bad)
                assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_PARAMETER", r.text
        await mesh.wait(lambda: peers[2].node.driver.route(MODEL), timeout=60, what="the selected model served")
        assert await generate(peers[2].node, 8) == want[:8]


#: The seeds' InferenceRequestResponse (workers-api.md): keys at each level.
SEED_RESPONSE = {"success", "message", "request_id", "selected_nodes", "model_split_plan", "estimated_total_time",
                 "fallback_nodes"}
SEED_NODE = {"node_id", "endpoint", "capabilities", "current_load", "latency", "reliability"}
SEED_CAPABILITIES = {"max_memory_gb", "gpu_type", "gpu_memory_gb", "cpu_cores", "network_bandwidth_mbps",
                     "supported_models"}
SEED_SPLIT = {"layer_range", "assigned_node", "memory_requirement_mb", "compute_requirement"}


def with_tokenizer(folder: Path) -> object:
    """A word-level tokenizer over the tiny model's 128 ids, saved beside its weights (text in, text out)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Hello", ",", "world", "!", *(f"w{i}" for i in range(121))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


async def test_the_seeds_inference_request_gets_the_seeds_response_and_the_unsplit_tokens(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    from tiny_models import reference, tiny_llama


    model = tiny_llama(5)
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    tok = with_tokenizer(folder)
    seed = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
            "model_id": MODEL, "input_data": {"text": "Hello, world!", "max_length": 100}}
    ids = tok(seed["input_data"]["text"])["input_ids"]
    want = reference(model, ids, 100)
    async with InProcessMesh(tmp_path / "mesh", config()) as mesh:
        peers = await three_peers(mesh, folder)
        async with api_client(peers[2].node) as http:
            r = await http.post("/api/request", json=seed)
            assert r.status_code == 200, r.text
            got = r.json()
            r = await http.post("/api/request", json={**seed, "model_id": "nope"})
            assert r.status_code == 404 and r.json()["success"] is False and r.json()["code"] == "UNKNOWN_MODEL"
            assert r.json()["message"]
            r = await http.post("/api/request", json={**seed, "input_data": {"max_length": 3}})
            assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMETER" and not r.json()["success"]
    assert SEED_RESPONSE <= set(got) and got["success"] is True and got["request_id"]
    tokens = got["output"]["token_ids"]
    assert 0 < len(tokens) <= 100 and tokens == want[:len(tokens)]  # max_length is new tokens; greedy, exact
    assert len(tokens) == 100 or want[len(tokens)] == tok.eos_token_id  # or it stopped at the end of text
    assert got["output"]["text"] == tok.decode(tokens)
    nodes = got["selected_nodes"]
    assert {n["node_id"] for n in nodes} == {p.node_id for p in peers}  # no peer holds it alone: all three
    for n in nodes:
        assert SEED_NODE <= set(n) and SEED_CAPABILITIES <= set(n["capabilities"])
        assert n["endpoint"] == "" and n["capabilities"]["cpu_cores"] >= 1  # (in process: no HTTP endpoint)
    assert n["capabilities"]["supported_models"] in ([], [MODEL])
    plan = got["model_split_plan"]
    assert plan["total_layers"] == sum(e - s for s, e in (x["layer_range"] for x in plan["splits"]))
    assert all(SEED_SPLIT <= set(x) for x in plan["splits"]) and {"communication_overhead",
                                                                   "estimated_inference_time"} <= set(plan)
    assert got["estimated_total_time"] > 0 and isinstance(got["fallback_nodes"], list)


async def test_storage_paths_match_installed_ids_with_slashes_and_hostile_ones_never_answer_5xx(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, _ = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        made = mesh.store("a").add(str(folder), model_id="org/tiny")
        a = await mesh.start("a")
        async with api_client(a.node) as http:
            base = f"/storage/models/org/tiny/{made.revision}"
            r = await http.get(f"{base}/config.json")
            assert r.status_code == 200 and r.content == (folder / "config.json").read_bytes()
            for path, status in ((f"{base}/..%252f..%252fregistry.json", 400), (f"{base}/%252e%252e", 400),
                                 (f"/storage/models/org/{made.revision}/config.json", 404),
                                 (f"/storage/models/tiny/{made.revision}/config.json", 404),
                                 (f"{base}/nope.json", 404), ("/storage/models/org/tiny/v0/config.json", 404),
                                 (f"{base}/sub/config.json", 404)):
                r = await http.get(path)
                assert r.status_code == status and r.json()["error"]["code"], (path, r.status_code, r.text)


async def test_a_peer_that_may_get_no_work_says_why(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    c = config()
    gpu_only = dataclasses.replace(c, membership=dataclasses.replace(c.membership, require_gpu=True))
    async with InProcessMesh(tmp_path / "gpu", gpu_only) as mesh:
        info = (await mesh.start("a")).node.node_info()
        assert info["eligible"] is False and "require_gpu" in info["reason"] and "no GPU" in info["reason"]
    private = dataclasses.replace(c, node=dataclasses.replace(c.node, accept_public_jobs=False))
    async with InProcessMesh(tmp_path / "private", private) as mesh:
        info = (await mesh.start("a")).node.node_info()
        assert info["eligible"] is False and "accept_public_jobs" in info["reason"]
    async with InProcessMesh(tmp_path / "open", c) as mesh:
        info = (await mesh.start("a")).node.node_info()
        assert info["eligible"] is True and info["reason"] is None


async def test_the_seeds_training_status_is_kept_gossiped_and_shown_by_every_peer(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    seed = TRAINING_STATUS
    async with InProcessMesh(tmp_path, config()) as mesh:
        a, b = await mesh.start("a"), await mesh.start("b")
        await mesh.wait(mesh.agreed, timeout=30, what="two peers")
        async with api_client(a.node) as http:
            r = await http.post("/api/training-data", json=seed)
            assert r.status_code == 200 and r.json()["success"] is True, r.text
            assert r.json()["taken"] == sorted(seed["training_status"]) and r.json()["ignored"] == []
            for bad in ({**seed, "training_status": {**seed["training_status"], "loss": -1}},
                        {**seed, "training_status": {"current_epoch": "45"}}, {**seed, "training_status": 5},
                        {**seed, "node_id": b.node_id}):
                r = await http.post("/api/training-data", json=bad)
                assert r.status_code == 400 and r.json()["error"]["code"] in ("INVALID_PARAMETER",
                                                                              "MISSING_PARAMETER"), r.text
        assert a.node.training == seed["training_status"]  # a refused report changed nothing

        def seen_by_b() -> bool:
            row = next(n for n in b.node.nodes()["nodes"] if n["node_id"] == a.node_id)
            return row["training"] == seed["training_status"]

        await mesh.wait(seen_by_b, timeout=5, what="b to see a's training status in /api/nodes")
        assert b.node.node_health(a.node_id)["training"] == seed["training_status"]


async def test_the_seeds_device_info_is_merged_into_the_heartbeat_where_the_peer_measures_nothing(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    from mesh import hardware

    device, node_info = DEVICE_INFO, NODE_INFO
    own_battery = hardware.snapshot(()).battery is not None
    async with InProcessMesh(tmp_path, config()) as mesh:
        a, b = await mesh.start("a"), await mesh.start("b")
        await mesh.wait(mesh.agreed, timeout=30, what="two peers")
        async with api_client(a.node) as http:
            for bad in ({**device, "device_info": {**device["device_info"], "gpu_usage": 250}},
                        {**device, "device_info": {**device["device_info"], "is_charging": "yes"}},
                        {**device, "metadata": {"capabilities": "windows"}},
                        {**device, "metadata": {**device["metadata"], "platform": "x" * 500}}, {"device_id": "x"}):
                r = await http.post("/api/node-info", json=bad)
                assert r.status_code == 400 and r.json()["error"]["code"] in ("INVALID_PARAMETER",
                                                                              "MISSING_PARAMETER"), r.text
            assert a.node.reported_gpu is None and a.node.device == {}  # a refused report kept nothing
            r = await http.post("/api/node-info", json=device)
            answer = r.json()
            assert r.status_code == 200 and answer["success"] is True, r.text
            assert "gpu" in answer["taken"] and {"cpu_cores", "total_memory_gb"} <= set(answer["measured_here"])
            assert {"metadata.platform", "metadata.app_version", "metadata.os", "metadata.arch",
                    "metadata.family"} <= set(answer["taken"])
            assert ("battery" in answer["measured_here"]) == own_battery != ("battery" in answer["taken"])
            for bad in ({"node_info": {"capabilities": {"network_bandwidth_mbps": -5}}},
                        {"node_info": {"capabilities": {"supported_models": "gpt-2"}}}):
                r = await http.post("/api/node-info", json=bad)
                assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_PARAMETER", r.text
            r = await http.post("/api/node-info", json=node_info)  # the seeds' other shape
            assert r.status_code == 200 and r.json()["taken"] == ["gpu", "network_bandwidth_mbps"], r.text
            assert "supported_models" in r.json()["measured_here"]  # its own store says what it holds
            assert (await http.get("/api/node-info")).status_code == 200

        def row_at_b() -> dict:
            return next(n for n in b.node.nodes()["nodes"] if n["node_id"] == a.node_id)

        await mesh.wait(lambda: row_at_b()["hardware"]["gpus"], timeout=5, what="b to see a's reported GPU")
        (gpu,) = row_at_b()["hardware"]["gpus"]
        assert gpu["name"] == "NVIDIA RTX 3080" and gpu["memory_gb"] == 10.0
        assert row_at_b()["hardware"]["cpu_cores"] == hardware.snapshot(()).cpu_cores  # measured, not reported
        await mesh.wait(lambda: "network_bandwidth_mbps" in row_at_b()["device"], timeout=5,
                        what="b to see a's reported link bandwidth")
        assert row_at_b()["device"] == {"platform": "windows", "app_version": "0.1.0", "os": "windows",
                                        "arch": "x86_64", "family": "windows", "network_bandwidth_mbps": 1000.0}


async def test_a_middle_stage_killed_mid_generation_changes_no_token(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder, holders=("a", "b", "c"))
        victim, driver = on_stage(peers, 1), on_stage(peers, -1)  # the driver's tokens come from itself
        got = await generate(driver.node, 40, lambda k: mesh.kill(victim.name) if k == 10 else None)
        assert got == want[:40]
        assert driver.node.driver.failovers >= 1
        assert victim.node_id not in {h.node for h in driver.node.driver.route(MODEL).hops}


async def test_a_frozen_middle_stage_is_routed_around_and_rejoins_when_thawed(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    """As SIGSTOP: the peer's connections stay up but nothing arrives. The generation neither hangs nor
    changes a token; the others mark the peer offline; thawed, it is ready again for everyone."""
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder, holders=("a", "b", "c"))
        victim, driver = on_stage(peers, 1), on_stage(peers, -1)
        others = [p for p in peers if p is not victim]
        started = trio.current_time()
        got = await generate(driver.node, 40, lambda k: mesh.network.freeze(victim.node_id) if k == 10 else None)
        assert got == want[:40]
        assert trio.current_time() - started < config().inference.recovery_timeout
        assert driver.node.driver.failovers >= 1
        assert victim.node_id not in driver.node.driver.route(MODEL).nodes
        # (the session moved on the driver's stall check, before heartbeats time out; then they do)
        await mesh.wait(lambda: all(p.node.core.membership.get(victim.node_id).status == NodeStatus.OFFLINE
                                    for p in others), timeout=config().membership.offline_after + 1,
                        what="the others to mark the frozen peer offline")
        mesh.network.thaw(victim.node_id)
        await mesh.wait(mesh.agreed, timeout=30, what="the thawed peer ready again for everyone")
        # (its return may bring a better plan, whose stages load first)
        await mesh.wait(lambda: driver.node.driver.route(MODEL), timeout=30, what="a ready route")
        assert await generate(driver.node, 16) == want[:16]


async def test_a_reported_suspect_counts_only_once_checked_and_until_its_next_heartbeat(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    """The coordinator's check of a failed route's peers: a live peer answers its ping and stays (another peer's
    claim that it was silent is not taken); a frozen one is confirmed within the ping's deadline, before its
    heartbeats time out; its own driver's failed ping counts as the check; a heartbeat clears a suspect."""
    from coordinator.service import SUSPECT_PING
    folder, _ = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder, holders=("a", "b", "c"))
        lead = next(p for p in peers if p.node_id == p.node.core.leadership.coordinator)
        live, frozen = [p for p in peers if p is not lead]
        plans = lead.node.plans
        assert await plans.check_suspects([live.node_id], reporter=frozen.node_id, unanswered=[live.node_id]) == []
        assert not plans.suspected(live.node_id)

        mesh.network.freeze(frozen.node_id)
        started = trio.current_time()
        assert await plans.check_suspects([frozen.node_id, live.node_id], reporter=live.node_id) == [frozen.node_id]
        assert trio.current_time() - started <= SUSPECT_PING + 0.01
        assert plans.suspected(frozen.node_id) and not plans.suspected(live.node_id)
        assert lead.node.core.membership.get(frozen.node_id).status != NodeStatus.OFFLINE  # heartbeats not yet
        mesh.network.thaw(frozen.node_id)
        await mesh.wait(lambda: not plans.suspected(frozen.node_id), timeout=5, what="the suspect's next heartbeat")

        before = trio.current_time()
        assert await plans.check_suspects([live.node_id], reporter=lead.node_id, unanswered=[live.node_id]) == \
            [live.node_id]
        assert trio.current_time() == before  # no second ping: this peer's own driver just pinged it in vain


async def test_the_coordinator_killed_the_survivors_plan_and_serve(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder, holders=("a", "b", "c"))
        lead = next(p for p in peers if p.node_id == p.node.core.leadership.coordinator)
        term = lead.node.core.leadership.term
        mesh.kill(lead.name)
        rest = [p for p in peers if p is not lead]
        await mesh.wait(mesh.agreed, timeout=30, what="a new coordinator")
        assert rest[0].node.core.leadership.term > term
        await mesh.wait(lambda: all((r := p.node.driver.route(MODEL)) and lead.node_id not in r.nodes
                                    for p in rest), timeout=60, what="a plan without the old coordinator")
        assert await generate(rest[0].node, 24) == want[:24]


async def test_a_joining_peer_is_admitted_and_can_drive(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder)
        d = await mesh.start("d")
        await mesh.wait(mesh.agreed, timeout=30, what="d to join")
        assert all(p.node.core.membership.get(d.node_id) is not None for p in peers)
        await mesh.wait(lambda: d.node.driver.route(MODEL), timeout=30, what="d to learn the plan")
        assert await generate(d.node, 16) == want[:16]


async def test_a_drained_stage_peer_leaves_the_plan_and_generation_goes_on(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await three_peers(mesh, folder, holders=("a", "b", "c"))
        leaving = on_stage(peers, -1)
        stay = [p for p in peers if p is not leaving]
        leaving.node.request_drain()
        await mesh.wait(leaving.node.finished.is_set, timeout=30, what="the drain to finish")
        for p in stay:
            m = p.node.core.membership.get(leaving.node_id)
            assert m is not None and m.status == NodeStatus.OFFLINE
        await mesh.wait(lambda: all((r := p.node.driver.route(MODEL)) and leaving.node_id not in r.nodes
                                    for p in stay), timeout=60, what="a plan without the drained peer")
        assert await generate(stay[0].node, 24) == want[:24]


async def test_forged_and_rogue_plans_change_nothing(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A member turned rogue (joined with an invite, so the gate lets it speak) publishes forged, malformed and
    rogue plans: each forgery is refused with its code in the topic validator (never delivered or relayed), a
    validly signed plan from a peer that is not the coordinator is ignored, and every peer keeps the
    coordinator's plan. (A stranger's gossip does not get that far: tests/services/test_inproc_closed.py.)"""
    folder, _ = tiny
    c = config()
    async with InProcessMesh(tmp_path, dataclasses.replace(c, coordinator=dataclasses.replace(
            c.coordinator, models=(MODEL,)))) as mesh:
        mesh.store("a").add(str(folder), model_id=MODEL)
        a, b = await mesh.start("a"), await mesh.start("b")
        def settled() -> bool:  # one coordinator, and both peers hold its plan
            held = [p.node.plans.book.current.get(MODEL) for p in (a, b)]
            return (mesh.agreed() and None not in held and held[0].envelope == held[1].envelope
                    and held[0].plan.coordinator == a.node.core.leadership.coordinator)

        await mesh.wait(settled, timeout=30, what="one coordinator's plan on both peers")
        held = a.node.plans.book.current[MODEL]
        real = held.plan
        mallory = Identity.generate()
        rogue = dataclasses.replace(real, coordinator=mallory.node_id, epoch=real.epoch + 5)
        attacks = {
            "PLAN_SIGNER_MISMATCH": seal(PLAN, encode_plan(dataclasses.replace(real, epoch=real.epoch + 5)), mallory),
            "MALFORMED_MESSAGE": seal(PLAN, b"\xa1\x01\x02", mallory),
            "BAD_SIGNATURE": flip(held.envelope, -20),  # a byte inside the signature
        }
        ignored = [seal_plan(rogue, mallory), seal_plan(dataclasses.replace(rogue, term=real.term + 50), mallory)]
        invite = await a.node.gate.invite(600.0, 1, tuple(a.node.transport.addrs()))
        caplog.clear()
        async with mesh.network.open(mallory) as t:
            await become_member(t, invite.token())  # connected to a only: b hears mallory only if a relays it
            await trio.sleep(1.0)  # admitted on both sides
            for data in [*attacks.values(), *ignored]:
                await t.publish(PLANS_TOPIC, data)
            await trio.sleep(2.0)

        def codes(event: str) -> list[str]:
            return [getattr(r, "code", "") for r in caplog.records if getattr(r, "event", "") == event]

        assert sorted(codes("rejected")) == sorted(attacks)  # each once: at a, and never relayed on to b
        assert "NOT_COORDINATOR" in codes("plan_ignored")
        await mesh.wait(settled, timeout=10, what="both peers to hold one plan")  # (a newer epoch may be on its way)
        assert a.node.plans.book.current[MODEL].plan.coordinator == real.coordinator
        accepted = {getattr(r, "coordinator", None) for r in caplog.records
                    if getattr(r, "event", "") == "plan_accepted"}
        assert accepted <= {real.coordinator}


async def test_the_latency_plan_is_the_exact_optimum_over_gossiped_bandwidth_links_and_step_times(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    """The default objective (latency) over what peers gossip: memory bandwidth (the slowest peer is left out
    when the two faster ones hold the model), RTTs to each other (every link measured), and, once they serve,
    decode step times (the speed model's correction)."""
    folder, want = tiny
    c = config()
    cfg = dataclasses.replace(c, coordinator=dataclasses.replace(c.coordinator, objective="latency", link_interval=1.0))
    async with InProcessMesh(tmp_path, cfg) as mesh:
        mesh.store("a").add(str(folder), model_id=MODEL)
        manifest = mesh.store("a").manifest(MODEL)[0]
        layers = planner_layers(manifest, 2048, "float32")
        offer = int(0.6 * sum(x.bytes for x in layers))  # no peer alone, any two
        bandwidth = {"a": 10e9, "b": 20e9, "c": 40e9}
        peers = {n: await mesh.start(n, layer_memory=offer, bandwidth=bw) for n, bw in bandwidth.items()}
        ids = {p.node_id: n for n, p in peers.items()}
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")

        def links_known() -> bool:
            rows = peers["a"].node.nodes()["nodes"]
            return len(rows) == 3 and all(set(r["links"]) == set(ids) - {r["node_id"]} for r in rows)

        await mesh.wait(links_known, timeout=20, what="every peer's RTTs to the other two in gossip")
        rows = {ids[r["node_id"]]: r for r in peers["b"].node.nodes()["nodes"]}
        assert {n: r["memory_bandwidth"] for n, r in rows.items()} == bandwidth
        await peers["c"].node.request_serve(MODEL)
        await mesh.wait(lambda: all(p.node.driver.route(MODEL) is not None for p in peers.values()),
                        timeout=60, what="the route ready")
        coord = next(p for p in peers.values() if p.node_id == p.node.core.leadership.coordinator)
        plan = coord.node.plans.view(MODEL)["plans"][0]
        service = coord.node.plans
        usable = [w.peer(layers) for w in service.workers(MODEL, manifest.revision, layers) if w.usable]
        optimum = search.brute_force(layers, usable, service.links(), "latency")
        assert plan["objective"] == "latency" and plan["why"]["exact"] is True
        assert plan["why"]["ms_per_token"] == pytest.approx(optimum * 1000, abs=1e-6)  # rounded to ns
        assert {ids[s["assigned_node"]] for s in plan["model_split_plan"]["splits"]} == {"b", "c"}

        assert await generate(peers["a"].node, 12) == want[:12]
        stage_nodes = {s["assigned_node"] for s in plan["model_split_plan"]["splits"]}
        await mesh.wait(lambda: all(coord.node.core.membership.get(n).info.step_ms for n in stage_nodes),
                        timeout=10, what="decode step times in gossip")
        held = service.book.current[MODEL].plan
        scales = service._scales(MODEL, held.revision, layers, service._flops())
        assert set(scales) == stage_nodes and all(1 / 8 <= s <= 8 for s in scales.values())


async def test_past_the_admission_bound_a_request_gets_429_mesh_busy_and_nothing_queued_is_lost(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    folder, want = tiny
    c = config()
    cfg = dataclasses.replace(c, inference=dataclasses.replace(c.inference, max_pipeline_sessions=1,
                                                               max_queued_requests=1))
    async with InProcessMesh(tmp_path, cfg) as mesh:
        *_, peer = await three_peers(mesh, folder)
        driver = peer.node.driver
        hold, got = trio.Event(), {}

        async def run(name: str, stall: bool) -> None:
            out = []
            async for tok in driver.generate(Request(MODEL, PROMPT, 12)):
                out.append(tok.id)
                if stall:
                    await hold.wait()  # keeps its pipeline slot while the others wait
            got[name] = out

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "first", True)
            await mesh.wait(lambda: driver.admission(MODEL).active == 1, timeout=10, what="the slot taken")
            nursery.start_soon(run, "queued", False)
            await mesh.wait(lambda: driver.admission(MODEL).waiting == 1, timeout=10, what="one request queued")
            async with api_client(peer.node) as http:
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": list(PROMPT), "max_tokens": 4})
                seed = await http.post("/api/request", json={"model_id": MODEL, "input_data": {"text": "hi"}})
            assert r.status_code == 429 and r.json()["error"]["code"] == "MESH_BUSY", r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert seed.status_code == 429 and seed.json()["code"] == "MESH_BUSY" and "Retry-After" in seed.headers
            assert driver.admission(MODEL).waiting == 1  # the refusal queued nothing
            hold.set()
        assert got == {"first": want[:12], "queued": want[:12]}  # both finished, in order, with the oracle's tokens
        assert driver.admission(MODEL).active == 0 and driver.admission(MODEL).waiting == 0


async def test_a_second_driver_sends_its_session_to_the_replica_the_first_drivers_sessions_do_not_load(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    """Two pipelines (``--replicas 2``) and two drivers on different peers. The first opens two sessions, which
    go to the pipeline the plan lists first; once the stages' heartbeats say so, the second driver, which runs
    nothing itself, sends its session to the other pipeline. Every session's tokens equal the unsplit model's."""
    folder, want = tiny
    c = config()
    cfg = dataclasses.replace(c, coordinator=dataclasses.replace(c.coordinator, objective="latency", replicas="2"))
    async with InProcessMesh(tmp_path, cfg) as mesh:
        mesh.store("a").add(str(folder), model_id=MODEL)
        manifest = mesh.store("a").manifest(MODEL)[0]
        offer = int(0.6 * sum(x.bytes for x in planner_layers(manifest, 2048, "float32")))
        peers = [await mesh.start(n, layer_memory=offer) for n in "abcd"]
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        await peers[0].node.request_serve(MODEL)
        await mesh.wait(lambda: all(len(p.node.driver.routes(MODEL)) == 2 for p in peers), timeout=60,
                        what="two ready pipelines everywhere")
        first, other = (p.hops for p in peers[0].node.driver.routes(MODEL))
        one = next(p for p in peers if p.node_id not in {h.node for h in first})  # drives; runs the 2 sessions
        two = next(p for p in peers if p is not one and p.node_id not in {h.node for h in first})
        assert one.node.driver.route(MODEL).hops == first == two.node.driver.route(MODEL).hops  # idle: in order

        got: dict[int, list[int]] = {}
        go = trio.Event()

        async def run(k: int, node) -> None:  # type: ignore[no-untyped-def]
            out = []
            async for tok in node.driver.generate(Request(MODEL, PROMPT, 24)):
                out.append(tok.id)
                if len(out) == 4:
                    await go.wait()  # every session stays open until the choices are checked
            got[k] = out

        async with trio.open_nursery() as nursery:
            for k in range(2):
                nursery.start_soon(run, k, one.node)
            await mesh.wait(lambda: one.node.driver._on_route.get(first) == 1, timeout=30, what="1 session")
            # (the second goes to the other pipeline: this driver counts its own first one at once)
            await mesh.wait(lambda: sum(one.node.driver._on_route.values()) == 2, timeout=30, what="2 sessions")
            spread = dict(one.node.driver._on_route)
            assert spread == {first: 1, other: 1}, spread
            go.set()
        # Both pipelines idle again, then the first driver's sessions on the first pipeline only: kept open
        # while the second driver, which has seen their stages' heartbeats, chooses.
        go = trio.Event()
        await trio.sleep(cfg.membership.heartbeat_interval * 8)  # the sessions' stages go idle (ACTIVE_WITHIN)
        async with trio.open_nursery() as nursery:
            one.node.driver._on_route[other] = 1_000  # (this driver's choice only: its two go to the first)
            for k in range(2):
                nursery.start_soon(run, k, one.node)
            await mesh.wait(lambda: one.node.driver._on_route.get(first) == 2, timeout=30, what="2 on the first")
            await trio.sleep(cfg.membership.heartbeat_interval * 2)
            assert two.node.driver._on_route == {}
            assert two.node.driver.route(MODEL).hops == other
            nursery.start_soon(run, 2, two.node)
            await mesh.wait(lambda: two.node.driver._on_route.get(other) == 1, timeout=30, what="on the other")
            go.set()
            one.node.driver._on_route[other] -= 1_000
        assert got == {k: want[:24] for k in range(3)}


async def test_eight_sessions_spread_over_two_replicas_and_a_killed_replica_peer_moves_its_sessions(
        tmp_path: Path, tiny: tuple[Path, list[int]], autojump_clock: trio.testing.MockClock) -> None:
    """Four peers with room for 60% of the model each: two pipelines of two (``--replicas 2``). Eight sessions at
    once from one driver spread over both; a kill -9 of a peer of one pipeline moves its sessions to the other at
    once (the replica is loaded already); every session's tokens equal the unsplit model's."""
    folder, want = tiny
    c = config()
    cfg = dataclasses.replace(c, coordinator=dataclasses.replace(c.coordinator, objective="latency", replicas="2"))
    async with InProcessMesh(tmp_path, cfg) as mesh:
        mesh.store("a").add(str(folder), model_id=MODEL)
        manifest = mesh.store("a").manifest(MODEL)[0]
        offer = int(0.6 * sum(x.bytes for x in planner_layers(manifest, 2048, "float32")))
        peers = {n: await mesh.start(n, layer_memory=offer) for n in "abcd"}
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        driver_peer = peers["a"]
        await driver_peer.node.request_serve(MODEL)
        driver = driver_peer.node.driver
        await mesh.wait(lambda: len(driver.routes(MODEL)) == 2, timeout=60, what="two ready pipelines")
        plan = driver_peer.node.plans.view(MODEL)["plans"][0]
        assert len(plan["replicas"]) == 2
        pipelines = [r.hops for r in driver.routes(MODEL)]
        assert not {h.node for h in pipelines[0]} & {h.node for h in pipelines[1]}

        got: dict[int, list[int]] = {}
        spread: dict[tuple, int] = {}
        go = trio.Event()

        async def run(k: int) -> None:
            out = []
            async for tok in driver.generate(Request(MODEL, PROMPT, 24)):
                out.append(tok.id)
                if len(out) == 4:
                    await go.wait()  # every session is running before any goes on
            got[k] = out

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(run, k)
            await mesh.wait(lambda: sum(driver._on_route.values()) == 8, timeout=30, what="8 sessions running")
            spread.update(driver._on_route)
            victim_id = next(h.node for h in pipelines[1] if h.node != driver_peer.node_id)
            victim = next(p for p in peers.values() if p.node_id == victim_id)
            mesh.kill(victim.name)  # its pipeline's sessions fail over to the other one
            go.set()
        assert all(n >= 3 for n in spread.values()) and sum(spread.values()) == 8, spread
        assert got == {k: want[:24] for k in range(8)}
        assert driver.failovers >= spread[pipelines[1]]
        assert driver.to_replica >= spread[pipelines[1]]  # each moved at once, not after the coordinator's epoch

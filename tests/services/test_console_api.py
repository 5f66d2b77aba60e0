"""``GET /metrics``, ``GET /api/console`` and the console's files on real in-process peers (``mesh.app.inproc``: the
real services on the memory transport and a virtual clock), through each peer's real HTTP app: every metric family
the issue names is there (parsed with ``prometheus_client``'s parser), and the counters grow by exactly what a
known transfer and a known generation did. The page itself runs in a real browser in
tests/integration/test_console_browser.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import chat_llama_folder

from inference.driver import Request
from mesh.app.api import CONSOLE_POLICY, build_app
from mesh.app.inproc import InProcessMesh, Peer
from mesh.config import Config, InferenceConfig
from mesh.errors import PeerError
from mesh.wire import NODES_TOPIC, open_signed

TOKEN = "metrics-Token_9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-chat"
#: Every family the issue asks for (as the parser names them: counters without their _total).
FAMILIES = {"meshnode_peers": "gauge", "meshnode_coordinator_term": "gauge", "meshnode_tokens_generated": "counter",
            "meshnode_requests": "counter", "meshnode_step_seconds": "histogram", "meshnode_hop_seconds": "histogram",
            "meshnode_failovers": "counter", "meshnode_transfer_bytes": "counter", "meshnode_rejected": "counter",
            "meshnode_stage_sessions": "gauge", "process_resident_memory_bytes": "gauge",
            "process_open_fds": "gauge", "meshnode_trio_tasks": "gauge"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config() -> Config:
    c = Config()
    return dataclasses.replace(c, api=dataclasses.replace(c.api, token=TOKEN),
                               coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05),
                               inference=InferenceConfig(recovery_timeout=20.0, step_timeout=10.0,
                                                         compute_dtype="float32"))


async def scrape(http: httpx.AsyncClient) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) of one ``GET /metrics``."""
    r = await http.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version="), r.text
    types, samples = {}, {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: Samples, after: Samples) -> Callable[..., float]:
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_count_a_known_transfer_and_a_known_generation_and_the_console_shows_them(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    folder = chat_llama_folder(tmp_path / "src")
    async with InProcessMesh(tmp_path / "mesh", config()) as mesh:
        manifest = mesh.store("a").add(str(folder), model_id=MODEL)
        a, b = await mesh.start("a"), await mesh.start("b")  # b holds nothing
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        apps = {p.name: build_app(p.node) for p in (a, b)}
        clients = {name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://peer")
                   for name, app in apps.items()}
        async with clients["a"] as http_a, clients["b"] as http_b, trio.open_nursery() as nursery:
            for app in apps.values():  # what serve_api runs beside the app: the throughput sampler, the error log
                await nursery.start(app.state.telemetry.run)

            # The page and its files load without the token, with a policy that allows nothing but this peer;
            # the data does not.
            for path, kind in (("/", "text/html"), ("/console/console.js", "text/javascript"),
                               ("/console/console.css", "text/css")):
                r = await http_b.get(path)
                assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
                assert r.headers["content-security-policy"] == CONSOLE_POLICY, path
            page = (await http_b.get("/")).text
            assert "/console/console.js" in page and "http" not in page.replace("http-equiv", ""), page
            for path in ("/metrics", "/api/console", "/console/other.js"):
                assert (await http_b.get(path)).status_code == 401, path
            assert (await http_b.get("/console/other.js", headers=AUTH)).status_code == 404

            types, first = await scrape(http_b)
            assert {name: types.get(name) for name in FAMILIES} == FAMILIES
            assert value(first, "meshnode_peers", status="ready") == 2
            assert value(first, "meshnode_peers", status="offline") == 0
            assert value(first, "meshnode_coordinator_term") == b.node.core.leadership.term >= 1
            assert value(first, "meshnode_trio_tasks") > 10 and value(first, "process_open_fds") > 0
            _, first_a = await scrape(http_a)

            # A known transfer: b fetches the whole model from a.
            r = await http_b.post("/api/transfers", json={"model": MODEL}, headers=AUTH)
            assert r.status_code == 202, r.text
            transfer = r.json()["transfer"]["id"]
            await mesh.wait(lambda: b.node.fetcher.transfers[transfer].state == "done", timeout=60, what="the fetch")
            size = sum(s.size for s in manifest.shards) + sum(f.size for f in manifest.files)
            _, fetched = await scrape(http_b)
            _, served = await scrape(http_a)
            assert grew(first, fetched)("meshnode_transfer_bytes_total", direction="in") == size
            assert grew(first_a, served)("meshnode_transfer_bytes_total", direction="out") == size
            assert grew(first, fetched)("meshnode_transfer_bytes_total", direction="out") == 0

            # A known generation at b: 12 tokens, 12 steps, one request that went well; one for no such model.
            await b.node.request_serve(MODEL)
            await mesh.wait(lambda: b.node.driver.route(MODEL), timeout=60, what="the model served")
            body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
            r = await http_b.post("/v1/completions", json=body, headers=AUTH)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text
            assert (await http_b.post("/v1/completions", json=body | {"model": "no-such-model"},
                                      headers=AUTH)).status_code == 404
            _, generated = await scrape(http_b)
            more = grew(fetched, generated)
            assert more("meshnode_tokens_generated_total", model=MODEL) == 12
            assert more("meshnode_requests_total", model=MODEL, outcome="ok") == 1
            assert more("meshnode_requests_total", model="other", outcome="unavailable") == 1  # no typo as a label
            assert sum(v for (name, labels), v in generated.items() if name == "meshnode_requests_total") == 2
            for histogram in ("meshnode_step_seconds", "meshnode_hop_seconds"):
                assert more(f"{histogram}_count") == 12
                assert more(f"{histogram}_bucket", le="+Inf") == 12 and more(f"{histogram}_sum") > 0
            assert more("meshnode_failovers_total") == 0
            _, at_a = await scrape(http_a)
            assert grew(served, at_a)("meshnode_tokens_generated_total", model=MODEL) == 0  # a drove nothing

            # While a generation runs, each stage's peer has one session open on it; none after.
            hosts = [p for p in (a, b) if MODEL in p.node.stages.loaded]
            assert hosts
            during: list[float] = []
            async for tok in b.node.driver.generate(Request(MODEL, (3, 4, 5), 6)):
                if tok.index == 2:
                    for p in hosts:
                        during.append(value((await scrape(clients[p.name]))[1], "meshnode_stage_sessions",
                                            model=MODEL))
            assert during == [1.0] * len(hosts)
            with trio.fail_after(5):  # the driver's end frame frees each stage's session as it arrives
                for p in hosts:
                    while value((await scrape(clients[p.name]))[1], "meshnode_stage_sessions", model=MODEL) != 0:
                        await trio.sleep(0.05)

            # Malformed gossip from a is refused at b with its code, counted, and listed as an error.
            with pytest.raises(PeerError) as malformed:
                open_signed(b"not an envelope")
            await a.node.transport.publish(NODES_TOPIC, b"not an envelope")
            await trio.sleep(1.0)
            _, refused = await scrape(http_b)
            assert grew(generated, refused)("meshnode_rejected_total", code=malformed.value.code) == 1

            # The console's snapshot: both peers, the plan, the model served, the transfer file by file, the
            # tokens per second of the generations, and the refusal among the errors.
            await trio.sleep(2.0)  # a sample past the last generation
            r = await http_b.get("/api/console", headers=AUTH)
            assert r.status_code == 200
            snap = r.json()
            assert snap["self"] == b.node_id
            assert {n["node_id"] for n in snap["nodes"]["nodes"]} == {a.node_id, b.node_id}
            assert [p["model"] for p in snap["plans"]["plans"]] == [MODEL]
            assert "envelope" not in snap["plans"]["plans"][0]  # the signed bytes are no use to a page
            assert snap["served"] == [MODEL]
            done = next(t for t in snap["transfers"] if t["id"] == transfer)
            assert sorted(f["name"] for f in done["files"]) == sorted([*(s.name for s in manifest.shards),
                                                                      *(f.path for f in manifest.files)])
            assert all(f["state"] == "done" and f["done"] == f["size"] for f in done["files"])
            assert set(done["by_source"]) == {a.node_id}
            series = snap["series"]
            assert series and sum(p["tokens_per_s"] for p in series) > 0
            assert any(p["hop_ms"] is not None and p["step_ms"] is not None for p in series)
            assert [e["code"] for e in snap["errors"] if e["event"] == "rejected"] == [malformed.value.code]
            _, at_a = await scrape(http_a)
            assert value(at_a, "meshnode_rejected_total", code=malformed.value.code) == 0  # a's registry is its own
            nursery.cancel_scope.cancel()


async def test_a_peer_lost_shows_in_the_gauges(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers: list[Peer] = [await mesh.start(name) for name in "abc"]
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        a = peers[0]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(a.node)), base_url="http://a") as http:
            _, before = await scrape(http)
            assert value(before, "meshnode_peers", status="ready") == 3
            mesh.kill("c")
            await mesh.wait(lambda: a.node.core.membership.get(peers[2].node_id).status.value == "offline",
                            timeout=10, what="c offline at a")
            _, after = await scrape(http)
            assert value(after, "meshnode_peers", status="ready") == 2
            assert value(after, "meshnode_peers", status="offline") == 1

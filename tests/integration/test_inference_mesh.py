"""Generation through real `meshnode start` processes on 127.0.0.1, with the unsplit model as the oracle:
what only processes show — a kill -9 of a middle stage's process in the middle of generations (the driver
fails over to the next plan epoch and replays the generation step by step, token for token), on real libp2p
and HTTP, with the compute dtype the peers' real hardware features decide. fp32 models are checked against
transformers itself, quantized ones against ``generate --local`` (the same shards, kernels and compute dtype in
one process). Serving five weight formats over 3 stages, sessions at once, refusals and a mesh left with no
route run in process on a virtual clock: tests/services/test_inproc_serving.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tiny_models import local_reference, reference, tiny, tiny_llama

from coordinator.service import planner_layers
from mesh.app.cli import main as cli
from mesh.app.client import api_get, stream_events
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.errors import MeshError
from mesh.identity import Identity
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
PROMPT = [3, 17, 42, 7, 99, 5]
SMOLLM2 = "smollm2-135m-instruct"


def served(peers: list[PeerProcess], model: str, stages: int | None = None, exclude: str = ""
           ) -> dict[str, Any] | None:
    """The model's entry in /v1/models once every one of ``peers`` lists it as ready, on the same stages
    (``stages`` of them, none on ``exclude``)."""
    found = []
    for peer in peers:
        listing = peer.try_get("/v1/models")
        entry = next((m for m in (listing or {}).get("data", []) if m["id"] == model), None)
        if entry is None:
            return None
        hops = entry["meshnode"]["stages"]
        if (stages is not None and len(hops) != stages) or exclude in {h["node_id"] for h in hops}:
            return None
        found.append(entry)
    return found[0] if all(e["meshnode"] == found[0]["meshnode"] for e in found) else None


def serve(peer: PeerProcess, model: str) -> dict[str, Any]:
    """POST /api/model with the seeds' ModelSelectionPayload, retried until the peer has heard (by gossip) of a
    peer that holds the model."""
    selection = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z",
                 "model_selection": {"model_id": model, "model_name": model, "selected_at": "2024-01-01T00:00:00Z",
                                     "selection_reason": "User selected from desktop interface"},
                 "training_config": {"learning_rate": 0.00002, "batch_size": 32, "epochs": 100,
                                     "enable_distributed": True}}

    def ask() -> dict[str, Any] | None:
        try:
            return api_get(peer.api, "/api/model", method="POST", body=selection)
        except MeshError as err:
            if err.code != "UNKNOWN_MODEL":
                raise
            return None
    return wait_for(ask, 15, what=f"a peer to advertise {model}")


def request(peer: PeerProcess, body: dict[str, Any]) -> dict[str, Any]:
    return api_get(peer.api, "/api/request", method="POST", timeout=120.0, body=body)


class Streamer(threading.Thread):
    """Reads a streamed completion in the background, recording each token id as it arrives."""

    def __init__(self, peer: PeerProcess, path: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.peer, self.path, self.body = peer, path, body
        self.tokens: list[int] = []
        self.arrivals: list[float] = []
        self.text = ""
        self.final: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in stream_events(self.peer.api, self.path, self.body, timeout=120.0):
                choice = event["choices"][0]
                self.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                if "token_id" in event.get("meshnode", {}):
                    self.tokens.append(event["meshnode"]["token_id"])
                    self.arrivals.append(time.monotonic())
                if choice["finish_reason"] is not None:
                    self.final = event
        except BaseException as exc:  # reported by the test
            self.error = exc


def kill_middle_stage_during(driver: PeerProcess, peers: list[PeerProcess], entry: dict[str, Any], path: str,
                             body: dict[str, Any], after_tokens: int, also: Streamer | None = None
                             ) -> tuple[Streamer, PeerProcess, float]:
    """Stream ``body`` from ``driver`` (and ``also``, started alongside); once ``after_tokens`` tokens arrived
    on both, kill -9 the middle stage's peer. Returns the finished streamer, the victim and the seconds
    from the kill to the next token."""
    hops = entry["meshnode"]["stages"]
    victim = next(p for p in peers if p.node_id == hops[1]["node_id"])
    assert victim is not driver and (also is None or also.peer is not victim)
    s = Streamer(driver, path, body)
    s.start()
    streams = [s] if also is None else [s, also]
    if also is not None:
        also.start()
    wait_for(lambda: all(len(x.tokens) >= after_tokens or x.error or not x.is_alive() for x in streams), 60,
             interval=0.01, what=f"{after_tokens} streamed tokens")
    assert all(x.error is None and x.is_alive() for x in streams), [(x.error, len(x.tokens)) for x in streams]
    assert s.error is None and s.is_alive(), (s.error, len(s.tokens))
    killed_at, seen = time.monotonic(), len(s.tokens)
    victim.proc.kill()
    victim.proc.wait()
    s.join(120)
    assert not s.is_alive() and s.error is None, s.error
    assert len(s.tokens) > seen, "nothing came after the kill"
    return s, victim, s.arrivals[seen] - killed_at


def test_two_families_fp32_and_int8_streams_survive_kill_9_of_the_middle_stage_then_run_on_the_two_survivors(
        tmp_path: Path) -> None:
    """Two families served at once on 3 real peers, c holding neither: a tiny fp32 Llama (oracle: transformers)
    and a tiny Qwen2 mixture of experts converted to int8 (oracle: the same shards in one process, in the compute
    dtype a plan over this machine picks). A kill -9 of the middle stage while a stream of each runs changes no
    token, and both models then run on the 2 survivors, still exactly."""
    from mesh.hardware import bf16_features
    from storage.formats import plan_compute

    tiny_llama().save_pretrained(tmp_path / "llama")
    tiny("qwen2_moe", max_position_embeddings=512).save_pretrained(tmp_path / "moe")
    models = {"llama": ("llama", []), "moe-int8": ("moe", ["--weights", "int8"])}
    needs: dict[str, int] = {}
    for name, (folder, weights) in models.items():
        for peer in ("a", "b"):  # c holds nothing: it fetches the shards of its stages from a and b
            assert cli(["models", "--data-dir", str(tmp_path / "mesh" / peer), "add", str(tmp_path / folder),
                        *weights, "--id", name]) == 0
        manifest = Store(tmp_path / "mesh" / "a" / "store", Identity.generate()).manifest(name)[0]
        needs[name] = sum(x.bytes for x in planner_layers(manifest, 2048))
    # Each peer offers 60% of what the bigger model needs: no peer runs it alone, any two can. The speed model
    # is pinned (one compute score and bandwidth, no start-up benchmark, no link pings: every hop costs
    # --hop-ms), so a noisy measurement never decides how many stages the throughput plan has: with measured
    # links a busy host's RTTs outweighed these tiny stages' compute and the plan left a peer out.
    offer = ("--max-layer-memory-mb", f"{0.6 * max(needs.values()) / 2**20:.6f}", "--hop-ms", "0.05",
             "--link-interval", "0", "--compute-gflops", "50", "--memory-bandwidth-gbps", "10",
             "--benchmark-seconds", "0", "--recovery-timeout", "10")
    with LocalMesh(tmp_path / "mesh", config_file=CONFIG, extra_args=offer) as mesh:
        a = mesh.start_peer("a")
        b, c = (mesh.wait_started(p) for p in [mesh.launch(n, a.addrs[:1]) for n in "bc"])
        peers = [a, b, c]
        wait_for(lambda: agreed(peers), 30, what="one coordinator")
        for name in models:  # asked on c, which holds neither model
            assert name in serve(c, name)["requested"]
        entries = {name: wait_for(lambda n=name: served(peers, n, stages=3), 60, what=f"{name} on 3 stages")
                   for name in models}
        # The peers gossip their real bf16 features: the compute dtype is what the model's formats (int8, and
        # the router left in float32) call for on this CPU.
        formats = Store(tmp_path / "mesh" / "a" / "store", Identity.generate()).manifest("moe-int8")[0].formats
        assert "int8" in formats
        assert c.get("/api/model?model=moe-int8")["models"][0]["compute_dtype"] == plan_compute(
            list(formats), [bf16_features()])
        want = {"llama": reference(tiny_llama(), PROMPT, 120),
                "moe-int8": local_reference(tmp_path / "mesh" / "a", "moe-int8", PROMPT, 300)}

        # kill -9 the middle stage of the llama plan while a 120-token generation streams from stage 0's peer,
        # and one of the int8 mixture from another survivor (3 stages on 3 peers: the victim is on its route too).
        entry = entries["llama"]
        driver = next(p for p in peers if p.node_id == entry["meshnode"]["stages"][0]["node_id"])
        victim_id = entry["meshnode"]["stages"][1]["node_id"]
        other = next(p for p in peers if p is not driver and p.node_id != victim_id)
        body = {"model": "llama", "prompt": PROMPT, "max_tokens": 120, "temperature": 0, "ignore_eos": True,
                "stream": True}
        # (300 tokens: still streaming when the kill comes, however the two streams' starts fall)
        int8 = Streamer(other, "/v1/completions", {**body, "model": "moe-int8", "max_tokens": 300})
        s, victim, recovery = kill_middle_stage_during(driver, peers, entry, "/v1/completions", body, 10,
                                                       also=int8)
        assert s.tokens == want["llama"], "the failover changed the generated tokens"
        assert s.final["choices"][0]["finish_reason"] == "length"
        assert s.final["meshnode"]["failovers"] >= 1 and len(s.final["meshnode"]["epochs"]) >= 2
        int8.join(120)
        assert int8.error is None and int8.tokens == want["moe-int8"], "the failover changed the int8 MoE tokens"
        assert int8.final["meshnode"]["failovers"] >= 1
        print(f"kill -9 of the middle stage: next token {recovery:.2f}s later, 120 + 300 tokens identical "
              "(fp32 Llama, int8 Qwen2 MoE)")

        # Both models now run on the two survivors, still exactly.
        survivors = [p for p in peers if p is not victim]
        for name in models:
            wait_for(lambda n=name: served(survivors, n, stages=2, exclude=victim.node_id), 60,
                     what=f"{name} on the 2 survivors")
            got = request(survivors[1], {"model": name, "prompt": PROMPT, "max_tokens": 24, "ignore_eos": True})
            assert got["token_ids"] == want[name][:24] and len(got["route"]) == 2, name


def test_smollm2_chat_streams_the_single_process_text_and_survives_kill_9(
        tmp_path: Path, smollm2_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2 as its GGUF ships (int4 + int8 shards, bf16 compute): one peer holds it, the others fetch their
    stages' shards; the mesh's chat answer equals ``generate --local`` and says Paris; a kill -9 of the middle
    stage mid-answer leaves the text identical."""
    import shutil

    shutil.copytree(smollm2_store.root, tmp_path / "peer-a" / "store")  # a has it; b and c fetch from a
    with LocalMesh(tmp_path, config_file=CONFIG, extra_args=("--compute-gflops", "50")) as mesh:
        # Served once all three agree, so the first plan already spans them (a model requested while peers
        # are still joining is planned on the first ones; a join improves it only past --reassign-threshold).
        peers = mesh.start_star(3)  # peer-a, then peer-b and peer-c at once
        wait_for(lambda: agreed(peers), 30, what="one coordinator")
        serve(peers[0], SMOLLM2)
        question = "What is the capital of France?"
        capsys.readouterr()
        assert cli(["generate", "--local", "--data-dir", str(tmp_path / "peer-a"), "--model", SMOLLM2, "--json",
                    "--max-tokens", "32", question]) == 0
        local = json.loads(capsys.readouterr().out)
        assert "Paris" in local["text"] and local["timings"]["compute_dtype"] == "bfloat16", local
        entry = wait_for(lambda: served(peers, SMOLLM2, stages=3), 90, what="SmolLM2 on 3 stages")
        assert peers[0].get(f"/api/model?model={SMOLLM2}")["models"][0]["compute_dtype"] == "bfloat16"
        driver = next(p for p in peers if p.node_id == entry["meshnode"]["stages"][-1]["node_id"])

        s = Streamer(driver, "/v1/chat/completions", {"model": SMOLLM2, "temperature": 0, "max_tokens": 32,
                                                      "stream": True,
                                                      "messages": [{"role": "user", "content": question}]})
        s.run()
        assert s.error is None, s.error
        assert s.text == local["text"] and s.tokens == local["token_ids"], (s.text, local)
        assert s.final["choices"][0]["finish_reason"] == "stop"
        assert len(s.arrivals) > 3 and s.arrivals[-1] > s.arrivals[0]  # streamed, not sent at once
        capsys.readouterr()
        assert cli(["generate", question, "--api", peers[1].api, "--max-tokens", "32", "--json"]) == 0  # another
        mesh_json = json.loads(capsys.readouterr().out)
        assert mesh_json["text"] == local["text"] and mesh_json["token_ids"] == local["token_ids"]
        assert mesh_json["timings"]["ttft_ms"] > 0

        from inference.local import LocalModel
        from inference.tokenizer import chat_ids, text_ids

        reference_model = LocalModel(Store(tmp_path / "peer-a" / "store", Identity.generate()), SMOLLM2)
        # The seeds' InferenceRequestPayload at a peer that is no stage's driver: the plain-completion tokens.
        seed = {"device_id": "unique-device-identifier", "timestamp": "2024-01-01T00:00:00Z", "model_id": SMOLLM2,
                "input_data": {"text": "Hello, world!", "max_length": 16}}
        answer = request(peers[1], seed)
        hello = reference_model.generate(text_ids(reference_model.tokenizer, "Hello, world!"), 16)
        assert answer["success"] is True and answer["output"]["token_ids"] == hello.token_ids, answer
        assert [n["node_id"] for n in answer["selected_nodes"]] == [h["node_id"] for h in entry["meshnode"]["stages"]]
        assert answer["model_split_plan"]["total_layers"] == 33 and len(answer["model_split_plan"]["splits"]) == 3
        story = chat_ids(reference_model.tokenizer, [{"role": "user",
                                                      "content": "Write a short story about a lighthouse keeper."}])
        want_story = reference_model.generate(story, 48, stop=False).token_ids
        body = {"model": SMOLLM2, "prompt": story, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True}
        s, _, recovery = kill_middle_stage_during(driver, peers, entry, "/v1/completions", body, 8)
        assert s.tokens == want_story, (reference_model.tokenizer.decode(s.tokens),
                                        reference_model.tokenizer.decode(want_story))
        assert s.final["meshnode"]["failovers"] >= 1
        print(f"SmolLM2 int4/int8: kill -9 of the middle stage, next token {recovery:.2f}s later; 48 tokens identical")

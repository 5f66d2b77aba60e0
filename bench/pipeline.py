"""Pipeline inference over real peers against one process: SmolLM2-135M-Instruct from the store, greedy.

    .venv/bin/python bench/pipeline.py [--weights auto|float32|bfloat16|int8|int4] [--new-tokens 64]
                                       [--prompt-tokens 128] [--repeat 3] [--skip-recovery] [--data-dir DIR]
                                       [--concurrency-only]

The packaged GGUF is added once into a store in the format ``--weights`` picks (``auto``, the default and the
fastest measured so far: as it ships, int4 blocks + an int8 embedding and head, computed in bf16; the others
are converted while streaming the GGUF into shards, ~20 s), or taken from ``DIR/store`` when it is already
there (``--data-dir``: keep the converted store between runs). That store directory is copied into every
mesh peer's data dir, so nothing is converted or fetched per peer. Measured side by side in one run, every
mesh number also as a ratio to the single process:

1. single process: ``inference.local.LocalModel`` (what ``meshnode generate --local`` runs: the same stage
   code, kernels and compute dtype as the mesh, the compute dtype chosen as a plan over this machine
   would; prompt as one step, then one step per token), with ``torch.set_num_threads(1)`` (what each mesh
   peer gets: LocalMesh starts peers with OMP_NUM_THREADS=1) and with torch's default thread count. Warmed
   up once per setting; the settings alternate run by run. Its decode step is (total - TTFT) / (tokens - 1).
2. a 2-peer and a 3-peer mesh (``LocalMesh``, configs/local-3.toml, the store copied into every peer),
   driven through ``POST /api/request`` on stage 0's peer after a short warm-up. The peers choose the
   plan's compute dtype themselves (``GET /api/model?model=ID`` shows it; reported). TTFT is the driver's
   (from starting the generation to the first token); decode tok/s is (tokens - 1) / (total - TTFT), the
   same definition as the single process. Per-hop latency: each decode step's ``step_ms`` minus the sum
   of its stages' ``compute_ms`` (the forward in a worker thread, the last stage's sampling included),
   divided by the hops a token makes. With the driver on stage 0's peer a token makes one network hop per
   stage: stage 0 runs in the driver's process (no hop), then stage i -> stage i+1 for each of the S-1
   boundaries, then the last stage -> the driver: S hops. "tokens equal" compares the mesh's tokens with
   the single process' (1 thread): equality is the oracle.
3. recovery (3-peer mesh): a 200-token ``/v1/completions`` stream from stage 0's peer; after ~20 tokens
   the middle stage's process gets kill -9. Reported: time from the kill to the next token, the longest
   gap between tokens after the kill against the median gap before it, when the driver logged its
   failover, and whether all 200 tokens equal the uninterrupted single-process tokens.

4. the objectives: the 3 peers again, planned for ``--objective latency`` (one token's time: a model that fits
   one peer runs on one) against the throughput plan above (a stage per peer); single-stream decode tok/s.
5. the speed model: each stage's estimated decode time (the larger of its FLOPs over the peer's measured
   FLOP/s and its weight bytes over the peer's measured memory bandwidth, at the run's mean context) against
   its measured decode compute.

6. concurrency (``--concurrency-only`` runs just this): 1, 4 and 16 requests at once to 3 peers planned for
   latency, with one pipeline and with ``--replicas 2``: aggregate tok/s, p50/p99 TTFT and inter-token gap.

Everything runs on this machine's cores: peers, driver and the benchmark compete for them, so ratios are
for this box, not for peers on separate machines. Warnings, errors and lines that are not JSON in the
peers' logs are summarised at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from inference.local import LocalModel
from mesh.app.client import api_get, stream_events
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.errors import MeshError
from mesh.keyfile import load_or_create
from storage.store import Store

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local-3.toml")
MODEL = "smollm2-135m-instruct"  # the packaged GGUF; also the model id of --weights auto
WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4")
RECOVERY_TOKENS = 200
KILL_AFTER = 20
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a notebook and "
        "a flask of tea. From the gallery she watched the ships come in from the north, counted the gulls on "
        "the rocks and wrote down the colour of the sea. In winter the storms rolled over the island for days, "
        "and the light had to burn through rain, fog and spray so that no sailor would mistake the reef for "
        "open water. ")


# ---- the model and the prompt ------------------------------------------------------------------------


def model_store(data_dir: Path, weights: str) -> tuple[Store, str, float]:
    """The store of ``data_dir`` holding SmolLM2 in ``weights`` (streamed from the packaged GGUF now unless that
    version is there already), its model id, and the seconds adding took."""
    model_id = MODEL if weights == "auto" else f"{MODEL}-{weights}"
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / "store", load_or_create(data_dir))
    t0 = time.monotonic()
    store.add(MODEL, model_id=model_id, weights=weights)
    return store, model_id, time.monotonic() - t0


def prompt_ids(tok: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids of plain English text."""
    copies = 1
    while len(ids := list(tok(TEXT * copies, add_special_tokens=False)["input_ids"])) < n:
        copies *= 2
    return ids[:n]


# ---- single process ----------------------------------------------------------------------------------


def single_run(model: LocalModel, prompt: list[int], new: int) -> dict[str, Any]:
    """Greedy: the prompt as one step, then (new - 1) decode steps; no stop tokens; timings like the mesh's."""
    got = model.generate(prompt, new, stop=False)
    t = got.timings
    ttft, total = t["ttft_ms"], t["total_ms"]
    return {"tokens": got.token_ids, "ttft_ms": ttft, "total_ms": total,
            "step_ms": (total - ttft) / (new - 1) if new > 1 else float("nan"),
            "tok_s": t["decode_tokens_per_s"] or float("nan")}


def single_process(model: LocalModel, prompt: list[int], new: int, repeat: int, reference_tokens: int
                   ) -> tuple[dict[str, list[dict[str, Any]]], list[int], int]:
    """{"1": runs with one thread, "N": runs with torch's default N}, the 1-thread reference tokens
    (``reference_tokens`` long, for the recovery check) and N. Settings alternate run by run."""
    default = torch.get_num_threads()
    settings = {"1": 1, str(default): default}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    try:
        for threads in settings.values():
            torch.set_num_threads(threads)
            single_run(model, prompt, min(new, 8))  # warm-up
        for _ in range(repeat):
            for key, threads in settings.items():
                torch.set_num_threads(threads)
                runs[key].append(single_run(model, prompt, new))
        reference = runs["1"][0]["tokens"]
        if reference_tokens > new:
            torch.set_num_threads(1)
            reference = single_run(model, prompt, reference_tokens)["tokens"]
    finally:
        torch.set_num_threads(default)
    return runs, reference, default


# ---- meshes ------------------------------------------------------------------------------------------


def install(store: Store, base: Path, names: list[str]) -> None:
    """Copy the whole store into each peer's data dir (``base/name/store``): nothing to convert or fetch."""
    for name in names:
        shutil.copytree(store.root, base / name / "store")


def serve(peers: list[PeerProcess], model: str, *, one_per_peer: bool = True) -> dict[str, Any]:
    """Ask for the model and wait until every peer's /v1/models lists it on the same stages (on one stage
    per peer if the plan gets there within 45 s, else, or without ``one_per_peer``, on whatever the planner
    chose)."""
    def ask() -> dict[str, Any] | None:
        try:
            return api_get(peers[0].api, "/api/model", method="POST", body={"model_id": model})
        except MeshError as err:
            if err.code != "UNKNOWN_MODEL":
                raise
            return None  # not yet heard of a holder (every peer holds it, but the peer may not know itself)

    wait_for(ask, 20, what=f"the mesh to accept serving {model}")

    def listed(stages: int | None) -> dict[str, Any] | None:
        seen = []
        for p in peers:
            entry = next((m for m in (p.try_get("/v1/models") or {}).get("data", []) if m["id"] == model), None)
            if entry is None or (stages is not None and len(entry["meshnode"]["stages"]) != stages):
                return None
            seen.append(entry)
        return seen[0] if all(e["meshnode"]["stages"] == seen[0]["meshnode"]["stages"] for e in seen) else None

    if one_per_peer:
        try:
            return wait_for(lambda: listed(len(peers)), 45, what=f"{model} on {len(peers)} stages")
        except TimeoutError:
            pass
    return wait_for(lambda: listed(None), 30, what=f"{model} served")


def request(peer: PeerProcess, model: str, prompt: list[int], new: int) -> dict[str, Any]:
    return api_get(peer.api, "/api/request", method="POST", timeout=180.0,
                   body={"model": model, "prompt": prompt, "max_tokens": new, "ignore_eos": True})


def mesh_metrics(got: dict[str, Any], hops: int) -> dict[str, Any]:
    t = got["timings"]
    decode = list(zip(t["step_ms"][1:], t["compute_ms"][1:], strict=True))
    compute = [sum(c) for _, c in decode]
    overhead = [s - c for (s, _), c in zip(decode, compute, strict=True)]
    per_stage = [statistics.mean(c[i] for _, c in decode) for i in range(len(decode[0][1]))] if decode else []
    return {"tokens": got["token_ids"], "ttft_ms": t["ttft_ms"], "total_ms": t["total_ms"],
            "tok_s": t["decode_tokens_per_s"] or float("nan"),
            "step_ms": statistics.median(s for s, _ in decode) if decode else float("nan"),
            "compute_ms": statistics.median(compute) if compute else float("nan"),
            "hop_ms": statistics.mean(overhead) / hops if overhead else float("nan"),
            "prefill_compute_ms": sum(t["compute_ms"][0]), "per_stage_ms": per_stage,
            "failovers": got["failovers"]}


class Streamer(threading.Thread):
    """A streamed completion read in the background: token ids and their arrival times."""

    def __init__(self, peer: PeerProcess, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.peer, self.body = peer, body
        self.tokens: list[int] = []
        self.arrivals: list[float] = []
        self.epochs: list[list[int]] = []
        self.final: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in stream_events(self.peer.api, "/v1/completions", self.body, timeout=120.0):
                if "token_id" in event.get("meshnode", {}):
                    self.arrivals.append(time.monotonic())
                    self.tokens.append(event["meshnode"]["token_id"])
                    self.epochs.append(event["meshnode"]["epoch"])
                if event["choices"][0]["finish_reason"] is not None:
                    self.final = event
        except BaseException as exc:  # reported by the benchmark
            self.error = exc


def recovery(peers: list[PeerProcess], model: str, entry: dict[str, Any], driver: PeerProcess, coordinator: str,
             prompt: list[int], reference: list[int]) -> dict[str, Any]:
    hops = entry["meshnode"]["stages"]
    if len(hops) < 3:
        return {"skipped": f"the plan has {len(hops)} stages: no middle stage to kill"}
    victim = next(p for p in peers if p.node_id == hops[len(hops) // 2]["node_id"])
    s = Streamer(driver, {"model": model, "prompt": prompt, "max_tokens": RECOVERY_TOKENS, "temperature": 0,
                          "ignore_eos": True, "stream": True})
    s.start()
    wait_for(lambda: len(s.tokens) >= KILL_AFTER or s.error or not s.is_alive(), 90, interval=0.005,
             what=f"{KILL_AFTER} streamed tokens")
    if s.error is not None or not s.is_alive():
        raise RuntimeError(f"the stream ended before the kill: {s.error!r} after {len(s.tokens)} tokens")
    killed_wall, killed_at, seen = time.time(), time.monotonic(), len(s.tokens)
    victim.proc.kill()
    victim.proc.wait()
    s.join(150)
    if s.is_alive() or s.error is not None:
        raise RuntimeError(f"the stream after the kill: {'still running' if s.is_alive() else repr(s.error)}")
    gaps_before = [b - a for a, b in zip(s.arrivals[:seen], s.arrivals[1:seen], strict=False)]
    after = [killed_at, *s.arrivals[seen:]]
    failover = [r for r in driver.log_records() if r.get("event") == "failover" and r.get("ts", 0) >= killed_wall - 1]
    meshnode = s.final.get("meshnode", {})
    replay = next((i for i, e in enumerate(s.epochs) if e != s.epochs[0]), None)
    step_ms = meshnode.get("timings", {}).get("step_ms", [])
    return {"killed_after": seen, "victim_is_coordinator": victim.node_id == coordinator,
            "next_token_s": s.arrivals[seen] - killed_at if len(s.arrivals) > seen else float("nan"),
            "stall_s": max(b - a for a, b in itertools.pairwise(after)) if len(after) > 1 else float("nan"),
            "gap_before_ms": statistics.median(gaps_before) * 1000 if gaps_before else float("nan"),
            "detect_s": failover[0]["ts"] - killed_wall if failover else float("nan"),
            "failover_code": failover[0].get("code", "?") if failover else "none logged",
            "tokens": len(s.tokens), "equal": s.tokens == reference[:len(s.tokens)] and len(s.tokens) == len(reference),
            "replay_tokens": len(prompt) + replay if replay is not None else 0,
            "replay_steps": replay + 1 if replay is not None else 0,
            "replay_ms": step_ms[replay] if replay is not None and replay < len(step_ms) else float("nan"),
            "failovers": meshnode.get("failovers"), "epochs": meshnode.get("epochs"),
            "finish": (s.final.get("choices") or [{}])[0].get("finish_reason"),
            "stages_after": len(((driver.try_get("/v1/models") or {}).get("data") or [{}])[0].get("meshnode", {})
                                .get("stages", []))}


def run_mesh(base: Path, count: int, model: str, prompt: list[int], new: int, repeat: int, *, do_recovery: bool,
             reference: list[int], objective: str = "throughput") -> dict[str, Any]:
    """One mesh of ``count`` peers planning for ``objective`` (configs/local-3.toml pins throughput: a stage
    per peer; latency puts a model that fits one peer on one)."""
    args = ("--benchmark-seconds", "0.2", "--objective", objective)
    with LocalMesh(base, config_file=CONFIG, extra_args=args) as mesh:
        t0 = time.monotonic()
        peers = mesh.start_chain(count, prefix=f"m{count}" + ("l" if objective == "latency" else ""))
        coordinator, _ = wait_for(lambda: agreed(peers), 40, what="one coordinator")
        entry = serve(peers, model, one_per_peer=objective == "throughput")
        ready_s = time.monotonic() - t0
        stages = entry["meshnode"]["stages"]
        driver = next(p for p in peers if p.node_id == stages[0]["node_id"])
        compute = driver.get(f"/api/model?model={model}")["models"][0]["compute_dtype"]
        request(driver, model, prompt[:16], 4)  # warm-up: tokenizer, sessions, streams, first-use allocations
        runs = [mesh_metrics(request(driver, model, prompt, new), len(stages)) for _ in range(repeat)]
        rows = {n["node_id"]: n for n in driver.get("/api/nodes")["nodes"]}
        plan = driver.get(f"/api/plan?model={model}")["plans"][0]
        out: dict[str, Any] = {"stages": len(stages), "layers": [h["layers"] for h in stages], "runs": runs,
                               "ready_s": ready_s, "compute_dtype": compute, "objective": objective,
                               "why": plan.get("why", {}),
                               "gflops": [rows[h["node_id"]].get("compute_flops", 0.0) / 1e9 for h in stages],
                               "gbps": [rows[h["node_id"]].get("memory_bandwidth", 0.0) / 1e9 for h in stages],
                               "overhead_us": [rows[h["node_id"]].get("layer_overhead_us", {}).get(compute, 0.0)
                                               for h in stages],
                               "kernels": [rows[h["node_id"]].get("kernel_bandwidth", {}) for h in stages]}
        if do_recovery:
            try:
                out["recovery"] = recovery(peers, model, entry, driver, coordinator, prompt, reference)
            except (RuntimeError, TimeoutError, MeshError) as err:
                out["recovery"] = {"skipped": f"failed: {err}"}
    out["logs"] = log_summary(mesh.peers)
    return out


def log_summary(peers: list[PeerProcess]) -> list[str]:
    """Distinct warning/error lines and lines that are not JSON per peer (numbers masked so repeats group)."""
    lines = []
    for p in peers:
        counts: Counter[str] = Counter()
        for r in p.log_records():
            if r.get("level") in ("warning", "error", "critical"):
                msg = re.sub(r"\d+(\.\d+)?", "#", str(r.get("msg", "")))[:150]
                counts[f"{r['level']} {r.get('logger', '')}: {msg}{' [+traceback]' if 'exc' in r else ''}"] += 1
        for line in p.log_path.read_text(errors="replace").splitlines():  # not JSON: printed past the logger
            if line and not line.startswith(("{", "meshnode peer ", "  bootstrap address: ", "  api: ")):
                counts["(not JSON) " + re.sub(r"\d+(\.\d+)?", "#", line)[:150]] += 1
        lines += [f"{p.name}: {n}x {m}" for m, n in counts.most_common()]
    return lines


# ---- report ------------------------------------------------------------------------------------------


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", choices=WEIGHTS, default="auto",
                        help="weight format of the stored model (auto: as the GGUF ships, int4 + int8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per measured request")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per setup (medians are shown)")
    parser.add_argument("--skip-recovery", action="store_true", help="no kill -9 of the middle stage")
    parser.add_argument("--concurrency-only", action="store_true",
                        help="only the concurrent-streams table (replicas against one pipeline)")
    parser.add_argument("--data-dir", help="keep the store in DIR/store and reuse it (skips the conversion next "
                                           "time); the whole store is copied into every peer")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 16 or args.repeat < 1:
        parser.error("--new-tokens >= 2, --prompt-tokens >= 16, --repeat >= 1")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        store, model_id, add_s = model_store(Path(args.data_dir) if args.data_dir else root / "data", args.weights)
        install(store, root / "mesh2", ["m2-a", "m2-b"])
        install(store, root / "mesh3", ["m3-a", "m3-b", "m3-c"])
        local = LocalModel(store, model_id)  # the compute dtype a plan over this machine would choose
        prompt = prompt_ids(local.tokenizer, args.prompt_tokens)
        if args.concurrency_only:
            del local
            concurrency(store, root, model_id, prompt, args.new_tokens)
            return 0
        singles, reference, default_threads = single_process(
            local, prompt, args.new_tokens, args.repeat, 0 if args.skip_recovery else RECOVERY_TOKENS)
        info = {"model_id": model_id, "formats": "+".join(local.manifest.formats), "compute_dtype": local.compute,
                "add_s": add_s, "load_s": local.load_s}
        manifest = local.manifest
        del local
        meshes = {n: run_mesh(root / f"mesh{n}", n, model_id, prompt, args.new_tokens, args.repeat,
                              do_recovery=n == 3 and not args.skip_recovery, reference=reference)
                  for n in (2, 3)}
        install(store, root / "mesh3l", ["m3l-a", "m3l-b", "m3l-c"])
        latency = run_mesh(root / "mesh3l", 3, model_id, prompt, args.new_tokens, args.repeat, do_recovery=False,
                           reference=reference, objective="latency")
    report(args, info, singles, reference, default_threads, meshes, time.monotonic() - began)
    compare_objectives(args, meshes[3], latency, singles["1"], reference)
    speed_model(manifest, args, {"3 peers, throughput plan": meshes[3], "2 peers, throughput plan": meshes[2],
                                 "3 peers, latency plan": latency})
    return 0


STREAMS = (1, 4, 16)


def concurrency(store: Store, root: Path, model: str, prompt: list[int], new: int) -> None:
    """1, 4 and 16 concurrent requests to a 3-peer mesh planned for latency (SmolLM2 fits one peer: each
    pipeline is one stage) with one pipeline and with ``--replicas 2``: aggregate decode tok/s, p50/p99 TTFT
    and inter-token latency. The requests go to a peer of no pipeline when there is one (its driver spreads
    them)."""
    print("\n| pipelines | streams | aggregate tok/s | x 1 stream | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms "
          "| inter-token p99 ms | failed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for replicas in ("1", "2"):
        _concurrency_mesh(store, root / f"conc{replicas}", model, prompt, new, replicas)


def _concurrency_mesh(store: Store, base: Path, model: str, prompt: list[int], new: int, replicas: str) -> None:
    install(store, base, [f"c{replicas}-{x}" for x in "abc"])
    args = ("--benchmark-seconds", "0.2", "--objective", "latency", "--replicas", replicas,
            "--max-pipeline-sessions", "16")
    with LocalMesh(base, config_file=CONFIG, extra_args=args) as mesh:
        peers = mesh.start_chain(3, prefix=f"c{replicas}")
        wait_for(lambda: agreed(peers), 40, what="one coordinator")
        api_get(peers[0].api, "/api/model", method="POST", body={"model_id": model})

        def ready() -> list[list[str]] | None:
            plans = (peers[0].try_get(f"/api/plan?model={model}") or {}).get("plans") or []
            if not plans or len(plans[0]["replicas"]) != int(replicas):
                return None
            served = (peers[0].try_get("/v1/models") or {}).get("data", [])
            return [[s["assigned_node"] for s in r["splits"]] for r in plans[0]["replicas"]] if served else None

        pipelines = wait_for(ready, 120, what=f"{replicas} pipelines")
        time.sleep(3.0)  # every replica's stage loaded (the model is listed once its first route is ready)
        driver = next((p for p in peers if p.node_id not in {n for r in pipelines for n in r}), peers[0])
        request(driver, model, prompt[:16], 4)
        one = None
        for k in STREAMS:
            wall, ok = _burst(driver, model, prompt, new, k)
            tokens = sum(len(r["token_ids"]) for r in ok)
            ttft = sorted(r["timings"]["ttft_ms"] for r in ok) or [float("nan")]
            gaps = sorted(g for r in ok for g in r["timings"]["step_ms"][1:]) or [float("nan")]
            rate = tokens / wall
            one = one or rate
            print(f"| {replicas} | {k} | {rate:.1f} | {rate / one:.2f} | {pct(ttft, 50):.0f} | {pct(ttft, 99):.0f} "
                  f"| {pct(gaps, 50):.1f} | {pct(gaps, 99):.1f} | {k - len(ok)} |")


def _burst(driver: PeerProcess, model: str, prompt: list[int], new: int, k: int
           ) -> tuple[float, list[dict[str, Any]]]:
    """``k`` requests at once from threads: (wall seconds, the answers that came)."""
    results: list[dict[str, Any] | None] = [None] * k

    def go(i: int) -> None:
        try:
            results[i] = request(driver, model, prompt, new)
        except MeshError:
            results[i] = None

    threads = [threading.Thread(target=go, args=(i,)) for i in range(k)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, [r for r in results if r is not None]


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def report(args: argparse.Namespace, info: dict[str, Any], singles: dict[str, list[dict[str, Any]]],
           reference: list[int], default_threads: int, meshes: dict[int, dict[str, Any]], elapsed: float) -> None:
    one, many = singles["1"], singles[str(default_threads)]
    base_ttft, base_tok = med(one, "ttft_ms"), med(one, "tok_s")
    many_ttft, many_tok = med(many, "ttft_ms"), med(many, "tok_s")
    want = reference[:args.new_tokens]
    mesh_dtypes = ", ".join(f"{n} peers {m['compute_dtype']}" for n, m in meshes.items())
    print(f"SmolLM2-135M-Instruct ({info['model_id']}), --weights {args.weights}: weights {info['formats']}; "
          f"compute dtype: single process {info['compute_dtype']}, mesh plans {mesh_dtypes}. Greedy, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (ignore_eos), median of {args.repeat}; "
          f"{os.cpu_count()} CPU cores on this machine. Mesh peers run with OMP_NUM_THREADS=1 each; ratios are "
          f"against the single process (LocalModel) with 1 thread and with {default_threads} (torch's default). "
          f"Store: added in {info['add_s']:.1f}s (0 when reused), LocalModel loaded in {info['load_s']:.1f}s.\n")
    odd = [f"{n} peers" for n, m in meshes.items() if m["compute_dtype"] != info["compute_dtype"]]
    if odd:
        print(f"NOTE: the mesh plan ({', '.join(odd)}) chose another compute dtype than the single process: "
              f"tokens need not be equal.\n")
    print("| setup | stages | TTFT ms | TTFT x (1t, {n}t) | decode tok/s | tok/s x (1t, {n}t) | decode step ms "
          "| compute ms/step | per-hop ms | tokens equal |".replace("{n}", str(default_threads)))
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |")
    for key, runs in singles.items():
        step = med(runs, "step_ms")
        eq = "oracle" if key == "1" else ("yes" if all(r["tokens"] == want for r in runs) else "no")
        print(f"| single process, {key} thread{'s' if key != '1' else ''} | 1 | {med(runs, 'ttft_ms'):.1f} "
              f"| {med(runs, 'ttft_ms') / base_ttft:.2f}, {med(runs, 'ttft_ms') / many_ttft:.2f} "
              f"| {med(runs, 'tok_s'):.1f} | {med(runs, 'tok_s') / base_tok:.2f}, {med(runs, 'tok_s') / many_tok:.2f} "
              f"| {step:.2f} | {step:.2f} | - | {eq} |")
    for n, m in meshes.items():
        runs = m["runs"]
        eq = "yes" if all(r["tokens"] == want for r in runs) else "no"
        print(f"| mesh, {n} peers | {m['stages']} | {med(runs, 'ttft_ms'):.1f} "
              f"| {med(runs, 'ttft_ms') / base_ttft:.2f}, {med(runs, 'ttft_ms') / many_ttft:.2f} "
              f"| {med(runs, 'tok_s'):.1f} | {med(runs, 'tok_s') / base_tok:.2f}, {med(runs, 'tok_s') / many_tok:.2f} "
              f"| {med(runs, 'step_ms'):.2f} | {med(runs, 'compute_ms'):.2f} | {med(runs, 'hop_ms'):.2f} | {eq} |")
    spread = [f"{name} {max(r['tok_s'] for r in runs) / min(r['tok_s'] for r in runs):.2f}x"
              for name, runs in [*((f"single {k}t", v) for k, v in singles.items()),
                                 *((f"mesh {n} peers", m["runs"]) for n, m in meshes.items())]]
    print(f"\nspread of decode tok/s over the {args.repeat} runs (max/min; single-process settings alternate run by "
          f"run): {', '.join(spread)}")
    single_step = med(one, "step_ms")
    for n, m in meshes.items():
        runs = m["runs"]
        stage_ms = ", ".join(f"{statistics.median(r['per_stage_ms'][i] for r in runs):.2f}"
                             for i in range(len(runs[0]["per_stage_ms"])))
        gflops = ", ".join(f"{g:.0f}" for g in m["gflops"])
        print(f"mesh, {n} peers: shards per stage {m['layers']} (0 embedding, 1-30 blocks, 31 norm, 32 head; "
              f"planned from the peers' start-up benchmarks: {gflops} GFLOP/s); ready "
              f"{m['ready_s']:.1f}s after the first start; decode compute per stage {stage_ms} ms (sum "
              f"{med(runs, 'compute_ms') / single_step:.2f}x the single 1-thread step); prefill compute "
              f"{med(runs, 'prefill_compute_ms'):.1f} ms vs TTFT {med(runs, 'ttft_ms'):.1f} ms; failovers "
              f"{sum(r['failovers'] for r in runs)}")
    rec = meshes.get(3, {}).get("recovery")
    if rec is not None:
        if "skipped" in rec:
            print(f"recovery: skipped ({rec['skipped']})")
        else:
            wait = rec["next_token_s"] - rec["detect_s"] - rec["replay_ms"] / 1000
            role = "was" if rec["victim_is_coordinator"] else "was not"
            print(f"recovery (3 peers, kill -9 of the middle stage after {rec['killed_after']} of {RECOVERY_TOKENS} "
                  f"tokens, streamed from stage 0's peer; the victim {role} the coordinator): next token "
                  f"{rec['next_token_s']:.2f}s after the kill = "
                  f"{rec['next_token_s'] * 1000 / rec['gap_before_ms']:.0f}x the median gap between tokens before it "
                  f"({rec['gap_before_ms']:.1f} ms); longest gap after the kill {rec['stall_s']:.2f}s. Breakdown: the "
                  f"driver logged its failover ({rec['failover_code']}) {rec['detect_s']:.2f}s after the kill, then "
                  f"waited about {wait:.2f}s for a ready route, then replayed {rec['replay_tokens']} tokens in the "
                  f"original {rec['replay_steps']} steps (the prompt, then one per token; pipelined) in "
                  f"{rec['replay_ms']:.0f} ms. {rec['tokens']} tokens, finish {rec['finish']}, "
                  f"failovers "
                  f"{rec['failovers']}, epochs {rec['epochs']}, {rec['stages_after']} stages after; tokens equal to "
                  f"the uninterrupted single process: {'yes' if rec['equal'] else 'no'}")
    mesh3 = meshes.get(3, {}).get("runs") or meshes[2]["runs"]
    n3 = meshes[3]["stages"] if 3 in meshes else meshes[2]["stages"]
    cores = os.cpu_count()
    ttft_loss, decode_loss = med(mesh3, "ttft_ms") / many_ttft, many_tok / med(mesh3, "tok_s")
    print(f"\nInterpretation: on this {cores}-core machine the mesh decodes at "
          f"{med(meshes[2]['runs'], 'tok_s') / base_tok:.2f}x ({meshes[2]['stages']} stages) and "
          f"{med(mesh3, 'tok_s') / base_tok:.2f}x ({n3} stages) the speed of one single-threaded process, with "
          f"{med(meshes[2]['runs'], 'ttft_ms') / base_ttft:.2f}x / {med(mesh3, 'ttft_ms') / base_ttft:.2f}x its TTFT. "
          f"A pipeline does not parallelise one sequence: every token passes every layer in order, so with one "
          f"request the stages take turns (at most one computes at any moment) and the mesh can at best match the "
          f"single process. It pays per token one hop per stage ({med(mesh3, 'hop_ms'):.2f} ms each with {n3} stages: "
          f"framing, a loopback write through libp2p's Noise + yamux, trio scheduling; everything in step_ms that is "
          f"not in a stage's compute_ms), and its stages' compute sums to "
          f"{med(mesh3, 'compute_ms') / single_step:.2f}x "
          f"the single process' decode step (each stage is its own transformers forward with its own set-up, plus a "
          f"handoff to a worker thread; the idle peers' heartbeats and gossip, and anything else running on the "
          f"{cores} cores, land on top; separating these would need a profile). CPU contention between the peers "
          f"themselves is small for one request because they take turns; it would matter with concurrent requests. "
          f"torch's {default_threads} threads make single-process decode {many_tok / base_tok:.2f}x as fast (batch-1 "
          f"decode reads every weight once per token and pays per-layer overhead) but prefill "
          f"{base_ttft / many_ttft:.2f}x as fast; against that default single process the {n3}-stage mesh (one "
          f"thread per peer) takes {ttft_loss:.2f}x the TTFT and {decode_loss:.2f}x the time per decoded token. "
          f"Two threads on two cores shared with other processes are fragile (they wait on each other when one is "
          f"descheduled): see the spread line. On "
          f"one box the mesh buys no speed; its case is memory (no peer holds the whole model) and surviving the loss "
          f"of a peer with identical tokens. Total run time {elapsed:.0f}s.")
    logs = [line for m in meshes.values() for line in m["logs"]]
    print("\npeer log warnings/errors (digits masked):" if logs else "\npeer logs: no warnings or errors")
    for line in logs:
        print(f"  {line}")


def compare_objectives(args: argparse.Namespace, throughput: dict[str, Any], latency: dict[str, Any],
                       single: list[dict[str, Any]], reference: list[int]) -> None:
    """Single-stream decode of the same 3 peers planned for latency and for throughput (run one after the other)."""
    want = reference[:args.new_tokens]
    print("\n| 3 peers, plan for | stages | layers per stage | planner's ms/token | decode tok/s | x single 1t "
          "| TTFT ms | tokens equal |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for name, m in (("latency", latency), ("throughput", throughput)):
        runs = m["runs"]
        eq = "yes" if all(r["tokens"] == want for r in runs) else "no"
        print(f"| {name} | {m['stages']} | {m['layers']} | {m['why'].get('ms_per_token', float('nan')):.2f} "
              f"| {med(runs, 'tok_s'):.1f} | {med(runs, 'tok_s') / med(single, 'tok_s'):.2f} "
              f"| {med(runs, 'ttft_ms'):.1f} | {eq} |")
    print(f"single-stream decode, latency plan / throughput plan: "
          f"{med(latency['runs'], 'tok_s') / med(throughput['runs'], 'tok_s'):.2f}x")


def speed_model(manifest: Any, args: argparse.Namespace, meshes: dict[str, dict[str, Any]]) -> None:
    """Each stage's decode time as the planner's speed model estimates it (the larger of FLOPs over the peer's
    FLOP/s and the bytes it streams through each weight kernel over that kernel's speed, plus its blocks times
    one block's dispatch overhead; all measured at the peer's start; at this run's mean context) against the
    measured decode compute of that stage."""
    from coordinator import search
    from coordinator.planner import Peer
    from coordinator.service import planner_layers

    context = args.prompt_tokens + args.new_tokens // 2
    print(f"\nspeed model vs measured decode compute per stage (context {context} tokens; estimates use each "
          f"peer's start-up benchmarks: GFLOP/s and GB/s, one thread each):")
    print("| mesh | stage | layers | GFLOP/s | memory GB/s | kernels GB/s (int4, int8, bf16) | block overhead us "
          "| FLOPs-bound ms | bytes-bound ms | overhead ms | estimate ms | measured ms | measured / estimate |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m in meshes.items():
        layers = planner_layers(manifest, context, m["compute_dtype"])
        pos = {x.index: i for i, x in enumerate(layers)}
        for i, (rng, gf, gb, us, kern) in enumerate(zip(m["layers"], m["gflops"], m["gbps"], m["overhead_us"],
                                                        m["kernels"], strict=True)):
            s, e = pos[rng[0]], pos[rng[1] - 1] + 1
            part = layers[s:e]
            flops, read, calls = (sum(x.flops_per_token for x in part), sum(x.read for x in part),
                                  sum(x.calls for x in part))
            peer = Peer("p", gf * 1e9, 0, bandwidth=gb * 1e9, overhead_s=us / 1e6, kernels=tuple(sorted(kern.items())))
            est = search.build(layers, [(peer, s, e)], search.Links()).stages[0].compute_s * 1000
            streamed = search.read_s(peer, read, search.reads_by_kernel(part)) * 1000
            got = statistics.median(r["per_stage_ms"][i] for r in m["runs"])
            speeds = ", ".join(f"{kern.get(k, 0) / 1e9:.1f}" for k in ("int4", "int8", "bfloat16"))
            print(f"| {name} | {i} | {rng} | {gf:.0f} | {gb:.1f} | {speeds} | {us:.0f} "
                  f"| {flops / (gf * 1e9) * 1000:.2f} | {streamed:.2f} | {calls * us / 1000:.2f} | {est:.2f} "
                  f"| {got:.2f} | {got / est:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

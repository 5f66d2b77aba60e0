"""The download queue with real peer processes on 127.0.0.1 and real files. A holds every model; B holds five of
the stress models and pulls from A (at 2 MB/s, 2 files at once); C pulls.

1. Priorities: B queues a large model at low priority, then a small one at high: once the high one moves, no file
   of the large one starts until every file of the high one has started.
2. ``meshnode models pull --pause low`` keeps the large model's bytes; ``--cancel`` of a third removes its
   partial files and leaves no registry entry.
3. Stress: ``meshnode models pull m0 ... m9`` on C (at 8 MB/s), from A and B, while B is killed (-9) mid-pull
   and restarted: every model ends ready, each byte arrived once (no file fetched twice: the norm and head shards
   that all ten share included), every shard's SHA256 checks, C's memory stays flat, the CLI shows a total.
4. B after its restart lists the paused transfer with the bytes it kept, and ``--resume`` finishes it fetching
   only what was missing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from tiny_models import tiny_llama

from mesh.app.cli import main as cli
from mesh.app.client import api_get
from mesh.app.localmesh import LocalMesh, PeerProcess, wait_for
from mesh.identity import Identity
from storage.manifest import Manifest
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
QUICK = ("--compute-gflops", "50", "--memory-bandwidth-gbps", "10", "--benchmark-seconds", "0")
STRESS = [f"m{i}" for i in range(10)]
ON_B = STRESS[:5]
#: C's RSS may grow by this much while it pulls the 10 models (~25 MB): buffers, not the files.
RSS_GROWTH = 16 * 2**20


def missing(store: Store, manifest: Manifest) -> int:
    """Bytes of ``manifest`` a pull into ``store`` fetches: its shards not in the store yet, and its files."""
    shards = {s.sha256: s.size for s in manifest.shards
              if not (store.registry.shard_dir / f"{s.sha256}.safetensors").exists()}
    return sum(shards.values()) + sum(f.size for f in manifest.files)


def add(store: Store, folder: Path, model: str, seed: int, **config: Any) -> Manifest:
    if not (folder / "config.json").exists():
        tiny_llama(seed=seed, **config).save_pretrained(folder)
    return store.add(str(folder), model_id=model)


def post(peer: PeerProcess, path: str, body: Any = None) -> Any:
    return api_get(peer.api, path, method="POST", body=body, timeout=5.0, token=peer.token)


def transfer(peer: PeerProcess, tid: str) -> dict[str, Any]:
    return peer.get(f"/api/transfers/{tid}")


def settled(peer: PeerProcess, tid: str) -> dict[str, Any]:
    """The transfer once nothing moves any more (a paused file's last chunk lands after the answer)."""
    last: list[dict[str, Any]] = []

    def still() -> dict[str, Any] | None:
        t = transfer(peer, tid)
        quiet = last and last[-1]["done_bytes"] == t["done_bytes"] and not any(
            f["state"] == "running" for f in t["files"])
        last.append(t)
        return t if quiet else None

    return wait_for(still, 10, interval=0.3, what=f"{tid} to settle")


def holds(peer: PeerProcess, ids: dict[str, list[str]]) -> bool:
    """Whether ``peer`` sees each node of ``ids`` ready and advertising (at least) those models."""
    nodes = peer.try_get("/api/nodes")
    if nodes is None:
        return False
    seen = {n["node_id"]: {m.split("@")[0] for m in n["installed_models"]} for n in nodes["nodes"]
            if n["status"] == "ready"}
    return all(set(models) <= seen.get(node, set()) for node, models in ids.items())


def test_priorities_pause_resume_cancel_and_ten_models_while_a_holder_restarts(tmp_path: Path) -> None:
    base, src = tmp_path / "mesh", tmp_path / "src"
    a_store = Store(base / "a" / "store", Identity.generate())
    b_store = Store(base / "b" / "store", Identity.generate())
    wide = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 10}  # ~6 MB, 15 files
    made = {"low": add(a_store, src / "low", "low", 1, **wide), "x": add(a_store, src / "x", "x", 2, **wide),
            "high": add(a_store, src / "high", "high", 3)}
    for i, m in enumerate(STRESS):  # ~2.4 MB each; their norm and head shards are the same bytes in all ten
        made[m] = add(a_store, src / m, m, 10 + i, hidden_size=128, intermediate_size=256)
        if m in ON_B:
            add(b_store, src / m, m, 10 + i)
    low_bytes = missing(b_store, made["low"])  # (B has the head and norm shards it shares with m0..m4)
    b_args = (*QUICK, "--parallel-downloads", "2", "--download-limit", "2.0")
    with LocalMesh(base, config_file=CONFIG) as mesh:
        a = mesh.start_peer("a", args=QUICK)
        b = mesh.launch("b", a.addrs[:1], args=b_args)
        c = mesh.wait_started(mesh.launch("c", a.addrs[:1], args=(*QUICK, "--download-limit", "8.0")))
        mesh.wait_started(b)
        wait_for(lambda: holds(b, {a.node_id: ["low", "x", "high"]}), 30, what="B to see what A holds")

        # 1. Priorities: the small model queued high overtakes the large one queued low before it.
        low = post(b, "/api/transfers", {"model": "low", "priority": "low"})["transfer"]
        wait_for(lambda: transfer(b, low["id"])["state"] == "running", 30, interval=0.02, what="the low one to move")
        high = post(b, "/api/transfers", {"model": "high", "priority": "high"})["transfer"]
        assert (low["priority"], high["priority"]) == (-10, 10)
        wait_for(lambda: transfer(b, high["id"])["state"] == "done", 30, interval=0.05, what="the high one")
        events = b.get("/api/transfers")["events"]
        # From the high one's first file done on, all its files wait for slots: the low one's must wait longer.
        moving = next(e["seq"] for e in events if e["event"] == "file_done" and e["transfer"] == high["id"])
        starts = [e for e in events if e["event"] == "file_started" and e["seq"] > moving]
        last_high = max(e["seq"] for e in starts if e["transfer"] == high["id"])
        low_after = [e["seq"] for e in starts if e["transfer"] == low["id"]]
        assert low_after and all(seq > last_high for seq in low_after), (low_after, last_high)
        assert any(e["event"] == "file_started" and e["transfer"] == low["id"] and e["seq"] < moving for e in events)

        # 2. Pause the low one mid-way (the CLI, by model id); cancel a third one.
        assert cli(["models", "pull", "--pause", "low", "--api", b.api]) == 0
        kept = settled(b, low["id"])
        assert kept["state"] == "paused" and 0 < kept["done_bytes"] < kept["total_bytes"] == low_bytes
        x = post(b, "/api/transfers", {"model": "x"})["transfer"]
        wait_for(lambda: transfer(b, x["id"])["done_bytes"] > 0, 30, interval=0.05, what="some of x")
        assert cli(["models", "pull", "--cancel", x["id"], "--api", b.api]) == 0  # by transfer id
        gone = settled(b, x["id"])
        assert gone["state"] == "cancelled"
        b_root = b.data_dir / "store"
        x_partials = {f".{s.sha256}.safetensors.partial" for s in made["x"].shards}
        wait_for(lambda: "x" not in [m["id"] for m in b.get("/api/models")], 10, what="x's entry gone")  # as before
        assert not x_partials & {p.name for p in b_root.rglob("*.partial")}
        assert gone["done_bytes"] > 0 and (b_root / "transfers").is_dir()
        # nothing left to resume: the record goes last, after the partials and the model's entry (a crash in
        # between leaves a record, and the cleanup runs again at the next start)
        record = b_root / "transfers" / f"{x['id']}.json"
        wait_for(lambda: not record.exists(), 10, what="the cancelled transfer's record removed")

        # 3. Stress: ten models at once on C from A and B, while B restarts.
        wait_for(lambda: holds(c, {a.node_id: STRESS, b.node_id: ON_B}), 30, what="C to see both holders")
        proc = psutil.Process(c.proc.pid)
        baseline = proc.memory_info().rss
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak.append(proc.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        pull = subprocess.Popen([sys.executable, "-m", "mesh.app.cli", "models", "pull", *STRESS, "--api", c.api],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="120"))
        try:
            def from_b() -> int:
                listed = c.try_get("/api/transfers")
                return sum(t["by_source"].get(b.node_id, 0) for t in listed["transfers"]) if listed else 0

            wait_for(lambda: from_b() > 300_000, 30, interval=0.05, what="B to serve C some bytes")
            b.proc.kill()
            at_kill = c.get("/api/transfers")["transfers"]
            assert sum(t["done_bytes"] for t in at_kill) < sum(m.size for k, m in made.items() if k in STRESS) / 2
            b.proc.wait()
            b = mesh.wait_started(mesh.launch("b", a.addrs[:1], args=b_args))
            out, _ = pull.communicate(timeout=120)
        finally:
            pull.kill()
            sampling.set()
            sampler.join()
        text = out.decode()
        assert pull.returncode == 0, text
        assert all(f"{m} (" in text for m in STRESS) and text.count("ready") >= len(STRESS), text
        assert "total 10/10 models" in text, text

        listed = c.get("/api/transfers")["transfers"]
        assert sorted(t["model"] for t in listed) == STRESS and all(t["state"] == "done" for t in listed)
        distinct = {s.sha256: s.size for m in STRESS for s in made[m].shards}
        files = sum(f.size for m in STRESS for f in made[m].files)  # each model's folder has its own
        assert len(distinct) < sum(len(made[m].shards) for m in STRESS)  # shards the models share
        received = sum(n for t in listed for n in t["by_source"].values())
        assert received == sum(distinct.values()) + files  # each byte once: no file fetched twice
        assert sum(t["by_source"].get(b.node_id, 0) for t in listed) > 300_000
        c_store = Store(c.data_dir / "store", Identity.generate())
        for m in STRESS:  # every shard and file: size and SHA256 (the manifest is A's or B's: same files)
            verified = c_store.verify(m)
            assert (verified.shards, verified.files) == (made[m].shards, made[m].files)
        assert max(peak) - baseline < RSS_GROWTH, (max(peak) - baseline, received)

        # 4. B's paused transfer came back with its bytes; resumed, it fetches only what was missing.
        back = transfer(b, low["id"])
        assert (back["state"], back["done_bytes"], back["total_bytes"]) == (
            "paused", kept["done_bytes"], kept["total_bytes"])
        assert cli(["models", "pull", "--resume", "low", "--api", b.api]) == 0
        wait_for(lambda: transfer(b, low["id"])["state"] == "done", 30, interval=0.1, what="the low one to finish")
        done = transfer(b, low["id"])
        assert done["done_bytes"] == done["total_bytes"] == low_bytes
        assert sum(n for k, n in done["by_source"].items() if k != "partial") == low_bytes - kept["done_bytes"]
        assert Store(b.data_dir / "store", Identity.generate()).verify("low") == made["low"]

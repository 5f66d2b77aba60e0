"""Three real peer processes on 127.0.0.1: C learns from gossip which peers hold a model, pulls it with
`meshnode models pull` (the CLI following the API's progress), survives kill -9 of a serving holder by
resuming from the other with the bytes it already had, and serves the result over HTTP with Range and
no way out of its store."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mesh.app.cli import main as cli
from mesh.app.localmesh import LocalMesh, PeerProcess, wait_for
from mesh.identity import Identity
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")


def model_folder(path: Path) -> Path:
    torch.manual_seed(0)  # ~9.6 MB: four 2.4 MB decoder layers, so a 1 MB/s holder is caught mid-shard
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True)).save_pretrained(path)
    return path


def raw_get(api: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request with the path sent exactly as given (no client-side normalisation of .. or %2e)."""
    url = urlsplit(api)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def holders_seen(c: PeerProcess, ids: set[str], entry: str) -> bool:
    nodes = c.try_get("/api/nodes")
    return nodes is not None and {n["node_id"] for n in nodes["nodes"]
                                  if entry in n["installed_models"] and n["status"] == "ready"} == ids


def test_pull_survives_kill_of_a_holder_and_serves_files_safely(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny")
    for name in ("a", "b"):
        assert cli(["models", "--data-dir", str(tmp_path / "mesh" / name), "add", str(folder), "--id", "tiny"]) == 0
    made = Store(tmp_path / "mesh" / "a" / "store", Identity.generate()).manifest("tiny")[0]
    entry = f"tiny@{made.revision}"

    with LocalMesh(tmp_path / "mesh", config_file=CONFIG) as mesh:
        a = mesh.start_peer("a", args=("--upload-limit", "1.0"))
        b = mesh.launch("b", a.addrs[:1], args=("--upload-limit", "1.0"))
        c = mesh.wait_started(mesh.launch("c", a.addrs[:1]))
        mesh.wait_started(b)
        wait_for(lambda: holders_seen(c, {a.node_id, b.node_id}, entry), 30, what="C to see both holders")

        pull = subprocess.Popen([sys.executable, "-m", "mesh.app.cli", "models", "pull", "tiny", "--api", c.api],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="100"))
        try:
            def a_is_mid_transfer() -> bool:
                t = c.try_get("/api/transfers")
                return bool(t and t["transfers"] and t["transfers"][0]["by_source"].get(a.node_id, 0) > 300_000)

            wait_for(a_is_mid_transfer, 30, interval=0.05, what="A to serve C some bytes")
            a.proc.kill()  # kill -9 mid-transfer
            a.proc.wait()
            out, _ = pull.communicate(timeout=60)
        finally:
            pull.kill()
        assert pull.returncode == 0, out.decode()
        assert b"tiny (" in out and b"ready" in out

        state = c.get("/api/transfers")
        (t,) = state["transfers"]
        assert t["state"] == "done" and t["done_bytes"] == t["total_bytes"] == made.size
        resumed = [ev for ev in state["events"] if ev["event"] == "resumed"]
        assert resumed and all(ev["peer"] == b.node_id and ev["offset"] > 0 for ev in resumed)
        assert t["resumed_bytes"] == sum(ev["offset"] for ev in resumed)
        # Bytes A delivered before it died were kept, not fetched again from B.
        assert t["by_source"][b.node_id] < made.size
        assert t["by_source"][a.node_id] + t["by_source"][b.node_id] == made.size

        # HTTP: the model as C now has it.
        model = c.get("/api/models/tiny")
        (version,) = model["versions"]
        assert model["default_version"] == version["version"] == made.revision and version["status"] == "ready"
        assert {f["path"]: f["checksum_sha256"] for f in version["files"]} == (
            {f.path: f.sha256 for f in made.files} | {s.name + ".safetensors": s.sha256 for s in made.shards})
        assert [m["id"] for m in c.get("/api/models")] == ["tiny"]
        base = f"/storage/models/tiny/{made.revision}"
        config = (folder / "config.json").read_bytes()
        status, _, body = raw_get(c.api, f"{base}/config.json")
        assert status == 200 and body == config
        status, headers, body = raw_get(c.api, f"{base}/config.json", {"Range": "bytes=10-19"})
        assert status == 206 and body == config[10:20]
        assert headers["content-range"] == f"bytes 10-19/{len(config)}"
        shard = made.shards[1]
        status, _, body = raw_get(c.api, f"{base}/{shard.name}.safetensors", {"Range": f"bytes={shard.size - 8}-"})
        assert status == 206 and len(body) == 8
        for path in (f"{base}/../../registry.json", f"{base}/..%2f..%2fregistry.json", f"{base}/%2e%2e",
                     "/storage/models//etc/passwd", f"/storage/models/tiny/{made.revision}/%2E%2E%5Cx",
                     "/storage/models/tiny/config.json", f"{base}/..%252f..%252f../x", f"{base}/%252e%252e"):
            status, _, body = raw_get(c.api, path)
            assert status == 400 and json.loads(body)["error"]["code"] == "INVALID_PATH", path
        for path in (f"{base}/registry.json", f"{base}/peer.log", "/storage/models/nope/v1/config.json"):
            status, _, body = raw_get(c.api, path)
            assert status == 404 and "code" in json.loads(body)["error"], path
        # A symlink out of the store where a listed file should be: refused, never followed.
        outside = tmp_path / "secret.txt"
        outside.write_text("not for the mesh")
        listed = c.data_dir / "store" / "models" / "tiny" / made.revision / "generation_config.json"
        listed.unlink()
        listed.symlink_to(outside)
        status, _, body = raw_get(c.api, f"{base}/generation_config.json")
        assert status == 404 and b"not for the mesh" not in body
        ranking = c.get("/api/model-usage/ranking")
        assert ranking[0]["model_id"] == "tiny" and ranking[0]["rank"] == 1 and ranking[0]["by_kind"]["download"] >= 3
        assert ranking[0]["request_count"] == 0  # downloads are not generation requests
        assert c.get("/api/health")["status"] == "ok"  # and the peer is fine after all of it

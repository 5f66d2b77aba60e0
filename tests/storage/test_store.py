"""The local store end to end: add from a folder, a GGUF file (the packaged SmolLM2) and the HF hub
(offline), list and show, verify; bad sources fail with codes and leave nothing half-registered."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mesh.app.cli import main
from mesh.errors import MeshError
from mesh.identity import Identity
from storage.registry import ModelNotAvailable
from storage.shards import shard_path
from storage.store import SourceError, Store

ALICE = Identity.from_seed(b"a" * 32)


def tiny_folder(path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True)).save_pretrained(path)
    return path


def test_add_a_local_folder_then_list_show_and_verify(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", ALICE)
    manifest = store.add(str(tiny_folder(tmp_path / "tiny")))
    assert manifest.model_id == "tiny" and manifest.revision.startswith("local-")
    assert store.verify("tiny").revision == manifest.revision
    (row,) = store.describe()
    (version,) = row["versions"]
    assert row["default_version"] == version["version"] == manifest.revision and version["status"] == "ready"
    assert version["layers"] == 2 + 3 and {f["path"] for f in version["files"]} >= {"config.json"}
    # Adding again is idempotent (same shards, same hashes).
    assert [s.sha256 for s in store.add(str(tmp_path / "tiny")).shards] == [s.sha256 for s in manifest.shards]
    # A damaged shard is found by verify.
    path = shard_path(store.registry.shard_dir, manifest.shards[1].sha256)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(MeshError) as err:
        store.verify("tiny")
    assert err.value.code == "SHARD_SIZE_MISMATCH"


def test_bad_sources_fail_with_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store", ALICE)
    with pytest.raises(SourceError):
        store.add(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no config\.json"):
        store.add(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache: offline, nothing to find
    with pytest.raises(SourceError, match=r"not reachable|cache") as err:
        store.add("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert err.value.code == "MODEL_SOURCE_UNAVAILABLE"
    with pytest.raises(ModelNotAvailable) as na:
        store.manifest("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert na.value.reason == "not_installed"


def test_the_hub_source_uses_the_hf_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A snapshot in the HF cache layout, as huggingface_hub leaves it after a download.
    cache = tmp_path / "hf" / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny_folder(cache / "snapshots" / commit)
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    store = Store(tmp_path / "store", ALICE)
    manifest = store.add("org/tiny")
    assert (manifest.model_id, manifest.revision) == ("org/tiny", commit)
    assert store.verify("org/tiny").total_layers == 5


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Hugging Face hub on 127.0.0.1 serving one repo, ``org/tiny``, the way huggingface_hub asks for it
    (revision info, the file tree, HEAD and GET of each file); HF_ENDPOINT points at it. Its requests are kept."""
    files = {p.name: p.read_bytes() for p in tiny_folder(tmp_path / "hub-src").iterdir()}
    commit = "89abcdef0123456789abcdef0123456789abcdef"

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def answer(self, body: bytes, headers: dict[str, str], send: bool = True) -> None:
            self.send_response(200)
            for k, v in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(k, v)
            self.end_headers()
            if send:
                self.wfile.write(body)

        def do_HEAD(self, send: bool = False) -> None:
            name = self.path.rpartition("/")[2]
            if f"/org/tiny/resolve/{commit}/" not in self.path or name not in files:
                self.send_error(404)
                return
            etag = hashlib.sha256(files[name]).hexdigest()
            self.answer(files[name], {"ETag": f'"{etag}"', "X-Repo-Commit": commit}, send)

        def do_GET(self) -> None:
            if self.path.startswith("/api/models/org/tiny/tree/"):
                tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()]
                self.answer(json.dumps(tree).encode(), {"Content-Type": "application/json"})
            elif self.path.startswith("/api/models/org/tiny/revision/"):
                info = {"id": "org/tiny", "sha": commit, "siblings": [{"rfilename": n} for n in files]}
                self.answer(json.dumps(info).encode(), {"Content-Type": "application/json"})
            else:
                self.do_HEAD(send=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, to this hub only (read at import, too)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    try:
        yield commit
    finally:
        server.shutdown()
        thread.join()


def test_a_hub_download_shows_the_projects_own_progress_and_no_tqdm(
        tmp_path: Path, hub: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[tuple[str, int, int | None, str]] = []
    manifest = Store(tmp_path / "store", ALICE).add("org/tiny", progress=lambda *step: steps.append(step))
    assert (manifest.model_id, manifest.revision) == ("org/tiny", hub)
    size = sum(f.stat().st_size for f in (tmp_path / "hub-src").iterdir() if f.suffix in (".json", ".safetensors"))
    downloads = [s for s in steps if s[0] == "download"]
    assert downloads[-1] == ("download", size, size, "B"), downloads  # every byte of config + weights counted
    n = len(manifest.shards)
    assert [s for s in steps if s[0] != "download"] == [("reading", 0, None, "")] + [
        ("shards", k, n, "shards") for k in range(1, n + 1)]
    capfd.readouterr()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cli-cache"))
    assert main(["models", "add", "org/tiny", "--data-dir", str(tmp_path / "cli")]) == 0  # a fresh store and cache
    err = capfd.readouterr().err
    assert "downloading from the hub" in err and "writing shards" in err and f"{n}/{n} shards" in err, err
    assert "it/s" not in err and "Fetching" not in err and "%|" not in err, err  # tqdm's marks
    assert "HTTP Request" not in err  # nor a log line per request


def test_cli_adds_the_packaged_smollm2_gguf_compact_and_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    """The packaged GGUF (Q4_1 + a Q8_0 embedding) stays compact: int4 and int8 shards, one copy of the
    weights, the whole data dir within 1.5x the GGUF file; adding it again is a no-op."""
    from conftest import smollm2_gguf

    data = str(tmp_path / "data")
    assert main(["models", "--data-dir", data, "add", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "ready, 33 shards, 33 layers" in out and "weights int4+int8" in out, out  # embedding, 30 blocks, ...
    assert "Q8_0 -> int8 (requantized" in out and "Q4_1 -> int4 (exact)" in out
    assert main(["models", "--data-dir", data, "list", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)
    (version,) = [v for v in model["versions"] if v["version"] == model["default_version"]]
    assert model["id"] == "smollm2-135m-instruct" and version["family"] == "llama"
    assert version["weights"] == "int4+int8" and version["compute_dtype"] == "bfloat16"
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= {f["path"] for f in version["files"]}
    assert {s["format"] for s in version["shards"]} == {"int4", "int8", "float32"}  # blocks, embedding, norm
    total = sum(f.stat().st_size for f in (tmp_path / "data").rglob("*") if f.is_file())
    assert total <= 1.5 * smollm2_gguf().stat().st_size, total
    assert not (tmp_path / "data" / "store" / "sources").exists()  # no second copy of the weights
    manifest_file = next((tmp_path / "data" / "store").rglob("manifest.cbor"))
    mtime = manifest_file.stat().st_mtime
    assert main(["models", "--data-dir", data, "add", "smollm2-135m-instruct"]) == 0
    assert manifest_file.stat().st_mtime == mtime
    assert main(["models", "--data-dir", data, "list"]) == 0
    assert "int4+int8" in capsys.readouterr().out
    assert main(["models", "--data-dir", data, "show", "nope"]) == 2


#: The seeds' GET /api/models entry (model-distribution-v2.md), keys and value types, version by version.
SEED_MODEL = {"id": str, "name": str, "versions": list, "default_version": str, "task": str, "languages": list}
SEED_VERSION = {"version": str, "size_bytes": int, "files": list, "checksum_sha256": str, "updated_at": str}


def test_the_model_list_has_the_seeds_shape(tmp_path: Path) -> None:
    import hashlib
    import re

    store = Store(tmp_path / "store", ALICE)
    manifest = store.add(str(tiny_folder(tmp_path / "tiny")))
    (row,) = store.describe()
    assert {k: type(row[k]) for k in SEED_MODEL} == SEED_MODEL
    (version,) = row["versions"]
    assert {k: type(version[k]) for k in SEED_VERSION} == SEED_VERSION
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", version["updated_at"])
    assert version["checksum_sha256"] == hashlib.sha256(store.manifest("tiny")[1]).hexdigest()
    served = {f["path"] for f in version["files"]}
    assert served == {f.path for f in manifest.files} | {s.name + ".safetensors" for s in manifest.shards}
    for f in version["files"]:  # every listed file is what the download endpoint serves, of that size
        assert set(f) >= {"path", "size_bytes"}
        assert store.download_path("tiny", manifest.revision, f["path"]).stat().st_size == f["size_bytes"]
    assert version["size_bytes"] == manifest.size


def test_the_ranking_counts_generation_requests_and_survives_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", ALICE)
    for model, kind, n in (("a", "generation", 2), ("b", "generation", 5), ("a", "download", 9), ("c", "shard", 1)):
        for _ in range(n):
            store.count(model, kind)
    want = [{"model_id": "b", "request_count": 5, "rank": 1, "by_kind": {"generation": 5}},
            {"model_id": "a", "request_count": 2, "rank": 2, "by_kind": {"download": 9, "generation": 2}},
            {"model_id": "c", "request_count": 0, "rank": 3, "by_kind": {"shard": 1}}]
    assert store.ranking() == want
    store.save_usage()
    assert Store(tmp_path / "store", ALICE).ranking() == want  # a restarted peer keeps its counts
    (tmp_path / "store" / "usage.json").write_text("{not json")
    assert Store(tmp_path / "store", ALICE).ranking() == []  # a broken file costs the counts, not the store

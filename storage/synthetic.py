"""Header-only Llama-family models: a ``config.json`` and a ``model.safetensors`` whose header describes
every tensor of a real architecture with no data behind it. Metadata, planning and benchmarks can then
work on a 70B-shaped model on a machine that could never hold its weights."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from storage.families.llama import Llama

#: Llama-3-70B's shapes: hidden, intermediate, vocab, layers, attention heads, key/value heads.
LLAMA3_70B = {"hidden": 8192, "inter": 28672, "vocab": 128256, "layers": 80, "heads": 64, "kv_heads": 8}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file with the header describing ``tensors`` and no tensor bytes."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def llama_shapes(folder: Path, *, hidden: int, inter: int, vocab: int, layers: int, heads: int, kv_heads: int,
                 dtype: str = "BF16") -> Path:
    """Write a header-only Llama model of these shapes into ``folder`` (untied head)."""
    folder.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    tensors = {"model.embed_tokens.weight": (dtype, [vocab, hidden]), "model.norm.weight": (dtype, [hidden]),
               "lm_head.weight": (dtype, [vocab, hidden])}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": (dtype, [hidden, hidden]),
                    p + "self_attn.k_proj.weight": (dtype, [kv_heads * hd, hidden]),
                    p + "self_attn.v_proj.weight": (dtype, [kv_heads * hd, hidden]),
                    p + "self_attn.o_proj.weight": (dtype, [hidden, hidden]),
                    p + "mlp.gate_proj.weight": (dtype, [inter, hidden]),
                    p + "mlp.up_proj.weight": (dtype, [inter, hidden]),
                    p + "mlp.down_proj.weight": (dtype, [hidden, inter]),
                    p + "input_layernorm.weight": (dtype, [hidden]),
                    p + "post_attention_layernorm.weight": (dtype, [hidden])}
    write_header_only(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps({
        "model_type": Llama.model_types[0], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "tie_word_embeddings": False}))
    return folder

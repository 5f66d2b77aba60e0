"""Synthetic GGUF files for tests: tiny Llama-shaped models with tensors of any GGUF type, and large Q8_0 files
written block by block. Types gguf-py cannot quantize (the K-quants) get random raw blocks with sane scales."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

Q = GGMLQuantizationType
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass(frozen=True)
class Shape:
    vocab: int = 72
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    context: int = 128
    experts: int = 0  # MoE (FAMILY_ARCHS' "experts"): experts per block, experts per token, each expert's ffn
    active_experts: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # Qwen 2 MoE's shared expert's ffn

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_tensors(s: Shape, head: bool = True, bias: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and HF shapes ([N, K]) of a Llama model, in llama.cpp's order (``bias``: Qwen2's q/k/v
    biases)."""
    kv = s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        out += [(f"blk.{i}.attn_norm.weight", (s.hidden,)), (f"blk.{i}.attn_q.weight", (s.hidden, s.hidden)),
                (f"blk.{i}.attn_k.weight", (kv, s.hidden)), (f"blk.{i}.attn_v.weight", (kv, s.hidden)),
                (f"blk.{i}.attn_output.weight", (s.hidden, s.hidden)), (f"blk.{i}.ffn_norm.weight", (s.hidden,)),
                (f"blk.{i}.ffn_gate.weight", (s.ffn, s.hidden)), (f"blk.{i}.ffn_up.weight", (s.ffn, s.hidden)),
                (f"blk.{i}.ffn_down.weight", (s.hidden, s.ffn))]
        if bias:
            out += [(f"blk.{i}.attn_q.bias", (s.hidden,)), (f"blk.{i}.attn_k.bias", (kv,)),
                    (f"blk.{i}.attn_v.bias", (kv,))]
    out.append(("output_norm.weight", (s.hidden,)))
    if head:
        out.append(("output.weight", (s.vocab, s.hidden)))
    return out


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def encode(qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random data of a tensor in ``qtype``: float arrays for F32/F16, raw uint8 rows for everything else."""
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.BF16:
        return quantize(w, qtype)
    if qtype in (Q.Q4_K, Q.Q6_K):  # random blocks, scales in a plausible range
        n_blocks = int(np.prod(shape)) // 256
        raw = rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        d = rng.uniform(2e-4, 1e-3, (n_blocks, 1))
        if qtype == Q.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            raw[:, 0:2], raw[:, 2:4] = _f16_bytes(d), _f16_bytes(rng.uniform(2e-4, 1e-3, (n_blocks, 1)))
        else:  # 128 bytes low bits, 64 bytes high bits, 16 int8 scales, d
            raw[:, 192:208] = rng.integers(-64, 64, (n_blocks, 16), dtype=np.int8).view(np.uint8)
            raw[:, 208:210] = _f16_bytes(d)
        return raw.reshape(*shape[:-1], -1)
    return quantize(w, qtype)


def write_llama(path: Path, types: Callable[[str, tuple[int, ...]], GGMLQuantizationType] | None = None,
                shape: Shape = Shape(), head: bool = True, arch: str = "llama", name: str = "tiny-llama",
                seed: int = 0) -> Path:
    """A tiny Llama GGUF with a small byte-level tokenizer and chat template. ``types(gguf_name, hf_shape)``
    chooses each tensor's type (default: F32)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_name(name)
    _shape_metadata(w, shape, eps=1e-5)
    _byte_level_tokenizer(w, shape.vocab)
    for tname, hf_shape in llama_tensors(shape, head, bias=arch == "qwen2"):
        qtype = types(tname, hf_shape) if types else Q.F32
        data = encode(qtype, hf_shape, rng)
        w.add_tensor(tname, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    return written(w, path)


def written(w: GGUFWriter, path: Path) -> Path:
    """Write out a GGUF whose metadata and tensors ``w`` holds (header, metadata, tensors) and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_big_q8(path: Path, shape: Shape) -> int:
    """A Llama GGUF whose matrices are all Q8_0 random blocks, written one tensor at a time (memory: the largest
    tensor); no tokenizer. Returns the file size."""
    rng = np.random.default_rng(1)
    tensors = llama_tensors(shape)
    w = GGUFWriter(path, "llama")
    w.add_name("big-q8")
    for add, value in ((w.add_block_count, shape.layers), (w.add_context_length, shape.context),
                       (w.add_embedding_length, shape.hidden), (w.add_feed_forward_length, shape.ffn),
                       (w.add_head_count, shape.heads), (w.add_head_count_kv, shape.kv_heads),
                       (w.add_rope_dimension_count, shape.head_dim), (w.add_vocab_size, shape.vocab)):
            add(value)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for tname, hf_shape in tensors:
        if len(hf_shape) == 1:
            w.add_tensor_info(tname, hf_shape, np.dtype(np.float32), hf_shape[0] * 4)
        else:
            n_blocks = hf_shape[0] * hf_shape[1] // 32
            w.add_tensor_info(tname, (hf_shape[0], hf_shape[1] // 32 * 34), np.dtype(np.uint8), n_blocks * 34,
                              raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    biggest = max(n * k for _, (n, *rest) in tensors for k in rest) // 32
    pool = rng.integers(-127, 128, (biggest, 34), dtype=np.int8).view(np.uint8)  # Q8_0 blocks: d f16, 32 int8
    pool[:, 0:2] = _f16_bytes(rng.uniform(1e-3, 1e-2, (biggest, 1)))
    for _, hf_shape in tensors:
        if len(hf_shape) == 1:
            w.write_tensor_data(np.ones(hf_shape, dtype=np.float32))
        else:
            w.write_tensor_data(pool[: hf_shape[0] * hf_shape[1] // 32])
    w.close()
    return path.stat().st_size


# -- tiny files of the other GGUF architectures (llama.cpp's tensor names and metadata keys per arch)

#: What each architecture's blocks hold besides the norm before attention, o_proj and the norm before the MLP:
#: separate or fused q/k/v, separate gate and up or one fused ``ffn_up`` [2I, H] (and ffn_down), per-head
#: q/k norms [D], Gemma's norms after attention and after the MLP; optional: q/k/v biases ("bias"), a mixture
#: of experts instead of the MLP ("experts": the router ``ffn_gate_inp`` [E, H] and 3-D ``ffn_{gate,up,down}_exps``
#: [E, I, H], [E, I, H], [E, H, I] in HF order), and Qwen 2 MoE's shared expert ("shared_expert":
#: ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` [H]).
FAMILY_ARCHS: dict[str, dict[str, bool]] = {
    "qwen3": {"fused": False, "qk_norm": True, "post_norms": False},
    "gemma2": {"fused": False, "qk_norm": False, "post_norms": True},
    "gemma3": {"fused": False, "qk_norm": True, "post_norms": True},
    "phi3": {"fused": True, "qk_norm": False, "post_norms": False},
    "qwen2moe": {"fused": False, "qk_norm": False, "post_norms": False, "bias": True, "experts": True,
                 "shared_expert": True},
    "qwen3moe": {"fused": False, "qk_norm": True, "post_norms": False, "experts": True},
}


def family_tensors(arch: str, s: Shape, head: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and HF shapes ([N, K]) of a ``FAMILY_ARCHS`` model, in llama.cpp's order."""
    kind = FAMILY_ARCHS[arch]
    d, q, kv = s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        b = f"blk.{i}"
        out.append((f"{b}.attn_norm.weight", (s.hidden,)))
        if kind["fused"]:
            out.append((f"{b}.attn_qkv.weight", (q + 2 * kv, s.hidden)))
        else:
            out += [(f"{b}.attn_q.weight", (q, s.hidden)), (f"{b}.attn_k.weight", (kv, s.hidden)),
                    (f"{b}.attn_v.weight", (kv, s.hidden))]
        if kind.get("bias"):
            out += [(f"{b}.attn_q.bias", (q,)), (f"{b}.attn_k.bias", (kv,)), (f"{b}.attn_v.bias", (kv,))]
        if kind["qk_norm"]:
            out += [(f"{b}.attn_q_norm.weight", (d,)), (f"{b}.attn_k_norm.weight", (d,))]
        out.append((f"{b}.attn_output.weight", (s.hidden, q)))
        if kind["post_norms"]:
            out.append((f"{b}.post_attention_norm.weight", (s.hidden,)))
        out.append((f"{b}.ffn_norm.weight", (s.hidden,)))
        if kind.get("experts"):
            e, i_ = s.experts, s.expert_ffn
            out += [(f"{b}.ffn_gate_inp.weight", (e, s.hidden)), (f"{b}.ffn_gate_exps.weight", (e, i_, s.hidden)),
                    (f"{b}.ffn_down_exps.weight", (e, s.hidden, i_)), (f"{b}.ffn_up_exps.weight", (e, i_, s.hidden))]
            if kind.get("shared_expert"):
                out += [(f"{b}.ffn_gate_inp_shexp.weight", (s.hidden,)),
                        (f"{b}.ffn_gate_shexp.weight", (s.shared_ffn, s.hidden)),
                        (f"{b}.ffn_up_shexp.weight", (s.shared_ffn, s.hidden)),
                        (f"{b}.ffn_down_shexp.weight", (s.hidden, s.shared_ffn))]
        elif kind["fused"]:
            out += [(f"{b}.ffn_up.weight", (2 * s.ffn, s.hidden)), (f"{b}.ffn_down.weight", (s.hidden, s.ffn))]
        else:
            out += [(f"{b}.ffn_gate.weight", (s.ffn, s.hidden)), (f"{b}.ffn_up.weight", (s.ffn, s.hidden)),
                    (f"{b}.ffn_down.weight", (s.hidden, s.ffn))]
        if kind["post_norms"]:
            out.append((f"{b}.post_ffw_norm.weight", (s.hidden,)))
    out.append(("output_norm.weight", (s.hidden,)))
    if head:
        out.append(("output.weight", (s.vocab, s.hidden)))
    return out


def _shape_metadata(w: GGUFWriter, shape: Shape, eps: float) -> None:
    """The size keys llama.cpp writes for every architecture."""
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(shape.vocab)


def _byte_level_tokenizer(w: GGUFWriter, vocab: int) -> None:
    """write_llama's byte-level BPE vocabulary: 3 control tokens, single letters, then merged pairs."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]
    pairs = [a + b for a in "etaoinsh" for b in "etaoinsh"][: vocab - 3 - len(letters)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *letters, *pairs]
    assert len(tokens) == vocab, (len(tokens), vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([f"{p[0]} {p[1]}" for p in pairs])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)


def write_family(path: Path, arch: str, shape: Shape, head: bool = True, sliding_window: int | None = None,
                 types: Callable[[str, tuple[int, ...]], GGMLQuantizationType] | None = None,
                 std: float = 0.05, embedding_std: float | None = None, output_norm: float = 1.0,
                 seed: int = 0) -> Path:
    """A tiny GGUF of architecture ``arch`` (a ``FAMILY_ARCHS`` key) with the metadata keys llama.cpp writes
    for it and write_llama's tokenizer. Matrices are N(0, std^2) noise; norm vectors are stored as
    1 + N(0, 0.1^2), as a trained model's are (Gemma files store 1 + w, so its w is near 0 too), other vectors
    (biases, the shared expert's gate) as noise; the embedding
    is N(0, embedding_std^2) (default: std) and the final norm is stored as output_norm + N(0, 0.1^2) (large:
    large logits). ``types(gguf_name, hf_shape)`` chooses each tensor's type (default: F32; any type that
    gguf-py quantizes)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    _shape_metadata(w, shape, eps=1e-6)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    if arch == "gemma2":  # what llama.cpp writes (transformers 5.24 reads neither: its defaults are these)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if FAMILY_ARCHS[arch].get("experts"):  # what llama.cpp writes (transformers 5.24 reads no ffn length of these)
        w.add_expert_count(shape.experts)
        w.add_expert_used_count(shape.active_experts)
        w.add_expert_feed_forward_length(shape.expert_ffn)
        if FAMILY_ARCHS[arch].get("shared_expert"):
            w.add_expert_shared_feed_forward_length(shape.shared_ffn)
    _byte_level_tokenizer(w, shape.vocab)
    for tname, hf_shape in family_tensors(arch, shape, head):
        qtype = types(tname, hf_shape) if types else Q.F32
        if len(hf_shape) == 1 and "norm" in tname:  # a norm: about 1 (the final one: about output_norm)
            center = output_norm if tname == "output_norm.weight" else 1.0
            values = (center + 0.1 * rng.standard_normal(hf_shape)).astype(np.float32)
        else:
            sigma = embedding_std if tname == "token_embd.weight" and embedding_std is not None else std
            values = (sigma * rng.standard_normal(hf_shape)).astype(np.float32)
        data = values if qtype == Q.F32 else values.astype(np.float16) if qtype == Q.F16 else quantize(values, qtype)
        w.add_tensor(tname, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    return written(w, path)

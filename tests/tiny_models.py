"""Tiny random models and their oracles, shared by the process tests and the in-process ones (importable as
``tiny_models``: pytest puts tests/, the folder of the root conftest, on sys.path, as for ``gguf_files``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mesh.identity import Identity
from storage.store import Store


def tiny_llama(seed: int = 1, **config: object) -> LlamaForCausalLM:
    """A 4-block random Llama (GQA, tied head), ``config`` overriding any of its settings. The wide
    initializer keeps greedy text from collapsing onto one token, so equality tests keep their teeth."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": True, "initializer_range": 0.5,
        "max_position_embeddings": 512, **config}))


def tiny_gpt2(seed: int = 2, **config: object) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{
        "n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 128, "n_positions": 512, "initializer_range": 0.5,
        "bos_token_id": 1, "eos_token_id": 2, **config}))


def reference(model: torch.nn.Module, prompt: Sequence[int], new: int) -> list[int]:
    """Greedy tokens of the unsplit model with its own KV cache (no stop token)."""
    model.eval()
    ids, cache, out = torch.tensor([list(prompt)]), DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(int(logits.argmax(-1)))
            ids = torch.tensor([[out[-1]]])
    return out


def local_reference(data_dir: Path, model: str, prompt: Sequence[int], new: int, compute_dtype: str | None = None
                    ) -> list[int]:
    """The single-process reference: the model from ``data_dir``'s store through the same stage code, in
    ``compute_dtype`` (default: what a plan over this machine alone would choose)."""
    from inference.local import LocalModel

    local = LocalModel(Store(data_dir / "store", Identity.generate()), model, compute_dtype=compute_dtype)
    return local.generate(prompt, new, stop=False).token_ids

"""Tiny random models and their oracles, shared by the process tests and the in-process ones (importable as
``tiny_models``: pytest puts tests/, the folder of the root conftest, on sys.path, as for ``gguf_files``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

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


def chat_llama_folder(path: Path) -> Path:
    """``tiny_llama`` saved with a word-level tokenizer (words ``w0``...``w120``) and a chat template, so every
    generation route runs, chat included."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(path)
    words = ["<unk>", "<s>", "</s>", "Hello", ",", "world", "!", *(f"w{i}" for i in range(121))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path


def tiny_gpt2(seed: int = 2, **config: object) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{
        "n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 128, "n_positions": 512, "initializer_range": 0.5,
        "bos_token_id": 1, "eos_token_id": 2, **config}))


#: The sliding window of the windowed families' tiny configs.
WINDOW = 6
COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "initializer_range": 0.5, "max_position_embeddings": 256,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
#: family -> its tiny config (model_type and what sets the family apart).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama3": {"model_type": "llama", "tie_word_embeddings": False,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}},
    "mistral": {"model_type": "mistral", "sliding_window": WINDOW},
    "qwen2": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    # (a tied Gemma head collapses onto one token at the wide initializer: gemma2 unties it, gemma3 keeps it
    # tied, so its head reads the unscaled embedding, with a narrower one)
    "gemma2": {"model_type": "gemma2", "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": False},
    "gemma3": {"model_type": "gemma3_text", "head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "initializer_range": 0.05},
    "phi3": {"model_type": "phi3"},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "mlp_only_layers": [2]},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "head_dim": 16, "norm_topk_prob": True},
}

def tiny(name: str, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny random model of family ``name`` (a key of ``CONFIGS``): 4 blocks, 128 ids; ``config`` overrides."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{**COMMON, **CONFIGS[name], **config})
    return AutoModelForCausalLM.from_config(config).eval()


def greedy(model: torch.nn.Module, prompt: list[list[int]], new: int) -> tuple[list[int], torch.Tensor]:
    """The unsplit transformers model's greedy tokens with its own KV cache (no stop token: every step
    compared), and the last step's logits."""
    model.eval()
    ids, cache, out = torch.tensor(prompt), DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            out.append(int(logits.argmax(-1)))
            ids = torch.tensor([[out[-1]]])
    return out, logits


def run_stages(stages: Sequence[Any], prompt: list[list[int]], new: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens through ``stages`` (``inference.stage.Stage``s in pipeline order, a cache each), and the
    last step's logits: the split side of the equality oracle."""
    caches = [s.new_cache() for s in stages]
    ids, pos = torch.tensor(prompt), torch.arange(len(prompt[0]))[None]
    out: list[int] = []
    h = ids
    for _ in range(new):
        h = ids
        for stage, cache in zip(stages, caches, strict=True):
            h = stage.forward(h, pos, cache)
        out.append(int(h[:, -1].argmax(-1)))
        ids, pos = torch.tensor([[out[-1]]]), pos[:, -1:] + 1
    return out, h[:, -1]


def reference(model: torch.nn.Module, prompt: Sequence[int], new: int) -> list[int]:
    """Greedy tokens of the unsplit model with its own KV cache (no stop token)."""
    model.eval()
    ids, cache, out = torch.tensor([list(prompt)]), DynamicCache(config=model.config), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
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

"""A model's tokenizer and stop ids from its files, and how a prompt becomes token ids (the mesh's API and
``meshnode generate --local`` share this, so both feed a model exactly the same ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer in ``folder`` (with ``meshnode_stop_ids``), or None when the model has none."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.meshnode_stop_ids = stop_ids(folder, tok)
    return tok


def stop_ids(folder: Path, tokenizer: Any = None) -> frozenset[int]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for v in eos if isinstance(eos, list) else [eos]:
            if type(v) is int and v >= 0:
                ids.add(v)
    if tokenizer is not None and isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the model's chat template with the assistant's turn opened."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def text_ids(tok: Any, prompt: str) -> list[int]:
    """Token ids of a plain completion prompt (the tokenizer's special tokens added as it likes)."""
    return list(tok(prompt)["input_ids"])

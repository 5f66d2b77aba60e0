"""Qwen 2 / 2.5: the Llama layout with q/k/v biases, and an optional sliding window on the layers from
``max_window_layers`` on (``use_sliding_window``): ``layer_types`` says which, and a stage keeps the types of
its own blocks (``Family.stage_config``)."""

from __future__ import annotations

from typing import ClassVar

from storage.families.base import Family


class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    causal_lm: ClassVar[dict[str, str]] = {"qwen2": "Qwen2ForCausalLM"}
    gguf_archs = ("qwen2",)
    llama_blocks = True

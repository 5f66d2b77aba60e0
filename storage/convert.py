"""Converting a source's tensors into shards of the chosen weight format, one tensor at a time.

A source (a Hugging Face folder, a GGUF file) is a list of ``SourceTensor``: the tensor's name as
transformers knows it, its logical shape, its dtype in the source, the format ``auto`` keeps it in, and a
``read(fmt)`` that returns its stored tensors in a format (``storage.formats``). Nothing is read until a
shard is written, and each shard is written tensor by tensor, so converting a model of any size needs
memory for about one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SourceTensor:
    name: str  # e.g. "model.layers.3.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # logical shape, [out, in] for matrices
    source_dtype: str  # "BF16", "F32", "Q4_1", ...
    auto: str  # the format ``--weights auto`` stores it in: a float format, or int8/int4 for matrices
    read: Callable[[str], dict[str, torch.Tensor]]  # format -> the stored tensors (name -> tensor)
    exact: bool = True  # False when ``auto`` requantizes (Q8_0 -> int8 per channel, K-quants)

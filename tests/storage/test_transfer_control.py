"""Pause, resume and cancel, and their races, on whole peers in one process (``mesh.app.inproc``: the real library,
fetcher and stores on the memory transport, a virtual clock, a 1 MB/s download limit): a pause asked before the
fetch ran fetches nothing; a resume while a pause winds down carries on (each byte received once); a cancel
removes partial files, the registry entry and the record, also of a paused transfer; across a restart of the
peer a paused transfer comes back paused with its bytes and a running one starts again by itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
import trio.testing
from tiny_models import tiny_llama

from mesh.app.inproc import InProcessMesh, Peer
from mesh.config import Config
from storage.manifest import Manifest
from storage.transfer import Transfer

WIDE = {"hidden_size": 128, "intermediate_size": 256}  # ~2.4 MB: 2.4 s at 1 MB/s


def partials(p: Peer) -> list[str]:
    return sorted(x.name for x in p.node.store.root.rglob("*.partial"))


def records(p: Peer) -> list[str]:
    return sorted(x.name for x in (p.node.store.root / "transfers").glob("*.json"))


def received(t: Transfer) -> int:
    return sum(n for k, n in t.by_source.items() if k != "partial")


async def test_pause_resume_and_cancel_and_their_races_and_a_restart(tmp_path: Path,
                                                                     autojump_clock: trio.testing.MockClock) -> None:
    c = Config()
    config = dataclasses.replace(c, storage=dataclasses.replace(c.storage, download_limit_mb_s=1.0))
    async with InProcessMesh(tmp_path / "mesh", config) as mesh:
        made: dict[str, Manifest] = {}
        for seed, name in enumerate(("big", "gone", "kept", "moving")):
            tiny_llama(seed=seed, **WIDE).save_pretrained(tmp_path / name)
            made[name] = mesh.store("a").add(str(tmp_path / name), model_id=name)
        a, b = await mesh.start("a"), await mesh.start("b")
        await mesh.wait(lambda: b.node.library.holders("big", None), timeout=30, what="b to learn what a holds")
        lib = b.node.library

        # Paused before its task ran: nothing fetched. Resumed, then paused and resumed at once: done, bytes once.
        t = lib.start_fetch("big", None, None)
        assert lib.pause(t.id).state == "paused"
        await trio.sleep(1)
        assert t.state == "paused" and a.node.shard_server.sent_bytes == 0 and records(b) == [f"{t.id}.json"]
        lib.resume(t.id)
        await mesh.wait(lambda: t.done_bytes > 500_000, timeout=30, what="some bytes")
        lib.pause(t.id)
        assert lib.resume(t.id).state == "queued"  # while the pause winds down
        await mesh.wait(lambda: t.state == "done", timeout=60, what="big done")
        assert t.done_bytes == t.total_bytes == received(t) == made["big"].size
        assert b.node.store.verify("big") == made["big"] and records(b) == []

        # Cancelled while running, and a paused one cancelled: partial files, entry and record gone.
        g = lib.start_fetch("gone", None, None)
        await mesh.wait(lambda: g.done_bytes > 500_000, timeout=30, what="some of gone")
        assert lib.cancel(g.id).state == "cancelled"
        await mesh.wait(lambda: not records(b), timeout=10, what="gone's record removed")
        assert partials(b) == [] and "gone" not in b.node.store.registry.models
        k = lib.start_fetch("kept", None, None)
        await mesh.wait(lambda: k.done_bytes > 500_000, timeout=30, what="some of kept")
        lib.pause(k.id)
        await trio.sleep(1)
        assert partials(b) and b.node.store.registry.models["kept"]
        m = lib.start_fetch("moving", None, None)
        await mesh.wait(lambda: m.done_bytes > 500_000, timeout=30, what="some of moving")

        # A restart: the paused one comes back paused with its bytes, the moving one moves on by itself.
        kept_bytes = k.done_bytes
        mesh.kill("b")
        b = await mesh.start("b")
        lib = b.node.library
        back = b.node.fetcher.transfers
        assert (back[k.id].state, back[k.id].done_bytes, back[k.id].total_bytes) == ("paused", kept_bytes,
                                                                                     k.total_bytes)
        await mesh.wait(lambda: back[m.id].state == "done", timeout=120, what="moving to finish after the restart")
        assert b.node.store.verify("moving") == made["moving"]
        assert back[k.id].state == "paused"
        lib.resume(k.id)
        await mesh.wait(lambda: back[k.id].state == "done", timeout=60, what="kept to finish")
        assert received(back[k.id]) == k.total_bytes - kept_bytes  # only what it did not have
        assert b.node.store.verify("kept") == made["kept"] and records(b) == [] and partials(b) == []
        new = lib.start_fetch("gone", None, None)  # a new transfer gets a new id, after the restored ones
        assert int(new.id[1:]) > max(int(x[1:]) for x in (t.id, g.id, k.id, m.id))
        lib.cancel(new.id)
        await mesh.wait(lambda: not records(b), timeout=10, what="the last record removed")
        assert "gone" not in b.node.store.registry.models

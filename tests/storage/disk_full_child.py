"""Run by tests/storage/test_disk_full.py inside ``unshare -m`` with a small tmpfs mounted at argv[1]: the store
of the adding (and of the fetching) peer lives on it, the holder's store and the model's folder elsewhere.
Prints one JSON object: what each case raised and what it left on the small disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from mesh.errors import MeshError
from mesh.identity import Identity
from mesh.transport import Transport
from storage.store import Store
from storage.transfer import Fetcher, RateLimit, Server

LISTEN = ["/ip4/127.0.0.1/tcp/0"]


def fill(disk: Path, leave: int = 0) -> Path:
    """A file that takes all of the small disk's free space but ``leave`` bytes (tmpfs counts in pages)."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    st = os.statvfs(disk)
    left = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while left:
            try:
                left -= os.write(fd, b"\0" * min(left, 1 << 20))
            except OSError:  # full
                break
    finally:
        os.close(fd)
    return filler


def leftovers(store: Store) -> dict[str, object]:
    root = store.root
    return {
        "partials": sorted(p.name for p in root.rglob("*.partial")),
        "tmp": sorted(p.name for p in root.rglob("*.tmp")) + sorted(p.name for p in (root / "tmp").glob("*")),
        "shards": len(list(store.registry.shard_dir.glob("*.safetensors"))),
        "whole": len([p for d in ("shards", "models") for p in (root / d).rglob("*")
                      if p.is_file() and not p.name.startswith(".")]),
        "locks": sorted(p.name for p in store.registry.lock_dir.glob("*.lock")),
        "versions": {m: {r: v.status for r, v in e.versions.items()} for m, e in store.registry.models.items()},
        "default": {m: e.default_version for m, e in store.registry.models.items()},
        "model_dirs": sorted(str(p.relative_to(root)) for p in (root / "models").glob("*/*")),
    }


def error(exc: MeshError) -> dict[str, str]:
    return {"code": exc.code, "message": str(exc)}


def add_cases(disk: Path, folder: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    store = Store(disk / "adder", Identity.generate())
    filler = fill(disk, leave=512 * 1024)  # half a MiB free: the model (~0.6 MB) and its headroom do not fit
    try:
        store.add(str(folder), model_id="tiny")
    except MeshError as exc:
        out["refused"] = error(exc) | leftovers(store)
    filler.unlink()

    store.add(str(folder), model_id="tiny", revision="r1")  # the version that must survive the next one
    fillers: list[Path] = []

    def report(step: str, done: int, total: int | None, unit: str) -> None:
        if step == "shards" and done == 2 and not fillers:  # two shards written: now the disk is full
            fillers.append(fill(disk))

    try:
        store.add(str(folder), model_id="tiny", revision="r2", progress=report)
    except MeshError as exc:
        out["filled"] = error(exc) | leftovers(store) | {"fillers": len(fillers)}
    for f in fillers:
        f.unlink()
    store.add(str(folder), model_id="tiny", revision="r2")  # room again: it goes through
    out["after"] = leftovers(store)
    return out


async def fetch_cases(disk: Path, folder: Path, holder_root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    holder_id, puller_id = Identity.generate(), Identity.generate()
    holder = Store(holder_root, holder_id)
    made = holder.add(str(folder), model_id="tiny")
    puller = Store(disk / "puller", puller_id)
    async with Transport.open(holder_id, LISTEN, loopback_only=True) as ht, \
            Transport.open(puller_id, LISTEN, loopback_only=True) as pt:
        server = Server(holder, upload=RateLimit(250_000))  # ~2.5 s for the model: time to fill the disk
        server.register(ht)
        await pt.connect(ht.addrs()[0])
        fetcher = Fetcher(pt, puller, parallel=1, backoff=0.05, timeout=5.0)

        filler = fill(disk, leave=512 * 1024)
        try:
            await fetcher.fetch_model("tiny", None, [ht.node_id])
        except MeshError as exc:
            out["refused"] = error(exc) | leftovers(puller) | {"sent": server.sent_bytes}
        filler.unlink()

        t = fetcher.new_transfer("tiny", None)
        fillers: list[Path] = []

        async def fill_after_the_first_file() -> None:
            while t.files_done < 1:
                await trio.sleep(0.01)
            fillers.append(await trio.to_thread.run_sync(fill, disk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill_after_the_first_file)
            try:
                await fetcher.fetch_model("tiny", None, [ht.node_id], transfer=t)
            except MeshError as exc:
                out["filled"] = error(exc) | leftovers(puller) | {"files_done": t.files_done, "state": t.state}
            nursery.cancel_scope.cancel()
        for f in fillers:
            f.unlink()
        server.upload = RateLimit(0)
        await fetcher.fetch_model("tiny", None, [ht.node_id])  # room again
        out["after"] = leftovers(puller) | {"verified": puller.verify("tiny") == made}
    return out


def main() -> None:
    disk, folder, holder_root = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    result = {"add": add_cases(disk, folder), "fetch": trio.run(fetch_cases, disk, folder, holder_root)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

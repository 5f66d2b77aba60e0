"""The model library of a running peer: the one owner of getting a model's files.

Where a manifest comes from (this peer's store, else a peer that holds the model; a manifest learned is kept
for ``manifest_ttl`` seconds), which peers hold a model (live members that advertise it, least loaded first),
what a stage needs on disk (its shards and the model's small files, fetched from the holders and
SHA256-checked before they are committed), and the download queue users control through the API: model
fetches started with ``start_fetch``, each a ``Transfer`` with a priority, which ``pause``, ``resume`` and
``cancel`` act on. A paused transfer keeps its bytes; its record (``<store>/transfers/<id>.json``, with the
signed manifest beside it) brings it back, paused, after a restart; a transfer that was queued or running
when the peer stopped starts again by itself, from the bytes it had.

Task (a child of the peer's nursery):
    run         - the nursery of the transfers (and their records, restored at start)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from mesh.errors import MeshError, NotFoundError, PeerError
from mesh.fsutil import atomic_write
from mesh.ids import ModelRef, NodeId
from mesh.ports import MeshView, Offload
from mesh.wire import NodeStatus
from storage.manifest import Manifest, Shard, open_manifest
from storage.queue import FINISHED, NORMAL, STATES, next_state
from storage.registry import Version, safe_name
from storage.shards import shard_path
from storage.store import Store
from storage.transfer import Fetcher, Job, Transfer, bytes_on_disk

log = logging.getLogger(__name__)

#: How long a manifest learned from a holder is used before it is asked for again (``storage.manifest_cache_ttl``).
MANIFEST_TTL = 300.0
#: How long a resumed or restored transfer waits for a peer that holds its model (after a restart, gossip takes
#: a few heartbeats to name the holders again), polling this often.
HOLDER_WAIT = 30.0
HOLDER_POLL = 0.5
TRANSFERS_DIR = "transfers"
RECORD_VERSION = 1


class TransferNotControllable(PeerError):
    """Pause, resume and cancel apply to the transfers users start; a stage's own fetch ends with its stage."""

    code = "TRANSFER_NOT_CONTROLLABLE"


class Library:
    def __init__(self, store: Store, fetcher: Fetcher, mesh: MeshView, offload: Offload, *,
                 manifest_ttl: float = MANIFEST_TTL) -> None:
        self.store, self.fetcher, self.mesh, self.offload = store, fetcher, mesh, offload
        self.manifest_ttl = manifest_ttl
        #: (model, revision or None) -> (when learned, on the trio clock; manifest; its signed bytes)
        self._manifests: dict[tuple[str, str | None], tuple[float, Manifest, bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self._running: set[str] = set()  # transfers whose task runs (a pause winds down inside it)

    @property
    def shard_dir(self) -> Path:
        return self.store.registry.shard_dir

    def holders(self, model: str, revision: str | None) -> list[NodeId]:
        """Live peers that advertise ``model`` (at ``revision``, if given), least loaded first."""
        found, ref = [], ModelRef(model, revision)
        for m in self.mesh.membership.members():
            if m.node_id == self.mesh.node_id or m.status == NodeStatus.OFFLINE:
                continue
            if any(ref.matches(entry) for entry in m.info.installed_models):
                found.append(m)
        found.sort(key=lambda m: (m.info.hardware.load, m.node_id))
        return [m.node_id for m in found]

    async def manifest(self, model: str, revision: str | None) -> tuple[Manifest, bytes]:
        """The signed manifest of ``model`` (at ``revision``, or the version found): the one learned in the last
        ``manifest_ttl`` seconds, else this peer's store, else any peer that advertises it.
        MODEL_NOT_AVAILABLE when nobody gives one."""
        now = trio.current_time()
        cached = self._manifests.get((model, revision))
        if cached is not None and now - cached[0] < self.manifest_ttl:
            return cached[1], cached[2]
        try:
            found = await self.offload(self.store.manifest, model, revision)
        except MeshError:
            found = None
            errors = []
            for holder in self.holders(model, revision):
                try:
                    found = await self.fetcher.fetch_manifest(holder, model, revision)
                    break
                except MeshError as err:
                    errors.append(f"{holder}: {err.code}")
                    log.info("manifest of %s from %s: %s %s", model, holder, err.code, err,
                             extra={"event": "manifest_failed", "code": err.code, "peer": holder})
            if found is None:
                why = "; ".join(errors) or "no peer holds it"
                raise NotFoundError(f"no manifest of {ModelRef(model, revision)} ({why})",
                                    code="MODEL_NOT_AVAILABLE") from None
        now = trio.current_time()  # learned now (the asking took a while)
        for key in [k for k, v in self._manifests.items() if now - v[0] >= self.manifest_ttl]:
            del self._manifests[key]
        self._manifests[(model, revision)] = self._manifests[(model, found[0].revision)] = (now, *found)
        return found

    def _installed(self, manifest: Manifest) -> bool:
        try:
            self.store.registry.require(manifest.model_id, manifest.revision)
        except MeshError:
            return False
        return True

    async def ensure(self, manifest: Manifest, shards: Sequence[Shard], *, priority: int = NORMAL
                     ) -> tuple[Path, dict[str, Path]]:
        """(folder with the model's files, shard SHA256 → file) with everything here; what is missing is
        fetched from the peers that hold the model (each file SHA256-checked before it is committed), queued at
        ``priority`` (``storage.queue``: a background prefetch asks for ``LOW``)."""
        store, shard_dir = self.store, self.shard_dir
        paths = {s.sha256: shard_path(shard_dir, s.sha256) for s in shards}
        if await self.offload(self._installed, manifest):
            return store.registry.model_dir(manifest.model_id, manifest.revision), paths
        folder = store.root / "stages" / safe_name(manifest.model_id) / safe_name(manifest.revision)
        jobs = [Job(s.name, s.sha256, s.size, paths[s.sha256], s.pieces, manifest.piece_size) for s in shards]
        jobs += [Job(f.path, f.sha256, f.size, folder / f.path, f.pieces, manifest.piece_size) for f in manifest.files]

        def missing() -> list[Job]:
            folder.mkdir(parents=True, exist_ok=True)
            shard_dir.mkdir(parents=True, exist_ok=True)
            return [j for j in jobs if not (j.dest.is_file() and j.dest.stat().st_size == j.size)]

        todo = await self.offload(missing)
        if todo:
            holders = self.holders(manifest.model_id, manifest.revision)
            if not holders:
                raise NotFoundError(f"{len(todo)} files of {manifest.model_id}@{manifest.revision} are missing here "
                                    "and no peer holds the model", code="MODEL_NOT_AVAILABLE")
            t = self.fetcher.new_transfer(manifest.model_id, manifest.revision, priority=priority)
            try:
                disk = await self.fetcher.on_disk(todo)
                t.plan(disk)
                await self.fetcher.check_space(t, disk)
                failures = await self.fetcher.fetch_files(todo, holders, t)
                if failures:
                    raise failures[0][1]
            except MeshError as err:
                t.state, t.error = "error", err.to_dict()
                raise
            t.state = "done"
            log.info("fetched %d files (%d bytes) of %s@%s for a stage", len(todo), t.done_bytes,
                     manifest.model_id, manifest.revision,
                     extra={"event": "stage_fetched", "model": manifest.model_id, "node_id": self.mesh.node_id})
        return folder, paths

    # ---- the download queue: transfers users start, pause, resume and cancel -------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for t in await self.offload(self._restore):
                self.fetcher.adopt(t)
                if t.state == "queued":  # it was queued or moving when the peer stopped: on it goes
                    self._spawn(t, wait=True)
            task_status.started()
            await trio.sleep_forever()

    def start_fetch(self, model: str, revision: str | None, source: str | None, *,
                    priority: int = NORMAL) -> Transfer:
        """Queue a fetch of a model from the peers that hold it, in the background; its progress is the returned
        Transfer (``/api/transfers``). ``source``: where to add it from if no peer can deliver it. A model that
        has a transfer in progress already gets that one (resumed, when it is paused)."""
        for t in self.fetcher.transfers.values():
            same = revision is None or t.revision in (revision, None)
            if t.user and t.model == model and same and t.state not in FINISHED:
                return self.resume(t.id) if t.state == "paused" else t
        t = self.fetcher.new_transfer(model, revision, priority=priority, user=True)
        t.source = source
        self._spawn(t, wait=False)
        return t

    def _user_transfer(self, transfer_id: str) -> Transfer:
        t = self.fetcher.transfers.get(transfer_id)
        if t is None:
            raise NotFoundError(f"no transfer {transfer_id!r}", code="UNKNOWN_TRANSFER")
        if not t.user:
            raise TransferNotControllable(f"{transfer_id} fetches a stage's files for this peer; it ends when they are "
                                          "here")
        return t

    def pause(self, transfer_id: str) -> Transfer:
        """Stop a queued or running transfer, keeping every byte it has (also across a restart)."""
        t = self._user_transfer(transfer_id)
        t.state = next_state(t.state, "pause")
        t.control = "pause"
        if t.scope is not None:
            t.scope.cancel()
        self.fetcher.event("paused", t, bytes=t.done_bytes)
        return t

    def resume(self, transfer_id: str) -> Transfer:
        """Queue a paused (or failed) transfer again; it continues from the bytes it has."""
        t = self._user_transfer(transfer_id)
        t.state = next_state(t.state, "resume")
        t.error = None
        self.fetcher.event("requeued", t, bytes=t.done_bytes)
        if t.id in self._running:  # its pause is still winding down: it starts again from there
            t.control = "resume"
        else:
            t.control = None
            self._spawn(t, wait=True)
        return t

    def cancel(self, transfer_id: str) -> Transfer:
        """Stop a transfer for good: its partial files are removed and its model left as it was before it."""
        t = self._user_transfer(transfer_id)
        t.state = next_state(t.state, "cancel")
        t.control = "cancel"
        self.fetcher.event("cancelled", t, bytes=t.done_bytes)
        if t.id in self._running:
            if t.scope is not None:
                t.scope.cancel()
        else:
            self._spawn(t, wait=False)  # nothing runs: the task only cleans up
        return t

    def _spawn(self, t: Transfer, *, wait: bool) -> None:
        assert self._nursery is not None, "transfers start after Library.run"
        self._running.add(t.id)
        self._nursery.start_soon(self._run, t, wait)

    async def _run(self, t: Transfer, wait: bool) -> None:
        """A transfer's task: fetch (until done, failed, paused or cancelled), then keep or drop its record. What
        a user asks meanwhile (``control``) is seen after every await: a resume while a pause winds down starts
        the fetch again, a cancel of a paused transfer only cleans up."""
        try:
            while True:
                if t.control == "resume":
                    t.control, wait = None, True
                if t.control is None:
                    await self.offload(self._save, t)
                    await self._fetch(t, wait)
                if t.control == "cancel" and t.state != "done":
                    removed = await self.fetcher.drop_partials(t)
                    await self.offload(self.fetcher.unregister, t)
                    t.state = "cancelled"
                    log.info("transfer %s of %s cancelled: %d partial files removed", t.id, t.model, removed,
                             extra={"event": "transfer_cancelled", "model": t.model})
                if t.control in ("pause", "cancel"):
                    t.control = None
                if t.state in ("done", "cancelled"):
                    await self.offload(self._forget, t)
                else:
                    await self.offload(self._save, t)
                if t.control is None or t.state == "done":  # nothing asked while the record was written
                    t.control = None
                    return
        finally:
            self._running.discard(t.id)

    async def _fetch(self, t: Transfer, wait: bool) -> None:
        add_from_source = None
        if t.source:
            source = t.source

            async def add_from_source(rev: str | None) -> None:
                await self.offload(functools.partial(self.store.add, source, revision=rev, model_id=t.model))

        with trio.CancelScope() as scope:
            t.scope = scope
            if t.control in ("pause", "cancel"):  # asked for while its record was written
                scope.cancel()
            try:
                holders = self.holders(t.model, t.revision)
                if wait and not holders and t.source is None:
                    with trio.move_on_after(HOLDER_WAIT):
                        while not (holders := self.holders(t.model, t.revision)):
                            await trio.sleep(HOLDER_POLL)
                await self.fetcher.fetch_model(t.model, t.revision, holders, source=add_from_source, transfer=t)
                self.store.count(t.model, "fetch")
            except MeshError as err:  # recorded on the transfer and logged by the fetcher
                log.warning("fetching %s failed: %s %s", t.model, err.code, err,
                            extra={"event": "fetch_failed", "code": err.code, "model": t.model})
            except Exception as exc:  # a bug in one fetch must not take the peer down
                log.exception("fetching %s failed unexpectedly", t.model,
                              extra={"event": "fetch_failed", "code": "INTERNAL", "model": t.model})
                t.state = "error"
                t.error = {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}
        t.scope = None

    # ---- records: a transfer that is not over survives a restart ------------------------------------

    @property
    def _records(self) -> Path:
        return self.store.root / TRANSFERS_DIR

    def _save(self, t: Transfer) -> None:
        doc = {"version": RECORD_VERSION, "id": t.id, "model": t.model, "revision": t.revision,
               "priority": t.priority, "seq": t.seq, "source": t.source, "state": t.state, "started": t.started,
               "files": list(t.files), "registered": t.registered,
               "previous": dataclasses.asdict(t.previous) if t.previous else None}
        atomic_write(self._records / f"{t.id}.json", json.dumps(doc, indent=1).encode())
        signed = self._records / f"{t.id}.manifest"
        if t.manifest is not None and not signed.exists():
            atomic_write(signed, t.manifest[1])

    def _forget(self, t: Transfer) -> None:
        for suffix in (".json", ".manifest"):
            (self._records / f"{t.id}{suffix}").unlink(missing_ok=True)

    def _restore(self) -> list[Transfer]:
        """The transfers the records keep, their progress read from the files on disk (a record that cannot be
        read is logged and left alone)."""
        found = []
        for path in sorted(self._records.glob("*.json")):
            try:
                found.append(self._restored(json.loads(path.read_text()), path))
            except (OSError, ValueError, KeyError, TypeError, MeshError) as exc:
                log.warning("transfer record %s unreadable (%s): ignored", path, exc,
                            extra={"event": "transfer_record_unreadable", "code": "STORE_IO"})
        return found

    def _restored(self, doc: dict[str, Any], path: Path) -> Transfer:
        if doc["version"] != RECORD_VERSION or doc["state"] not in STATES or doc["state"] in FINISHED - {"error"}:
            raise ValueError(f"not a record of an unfinished transfer: {doc.get('version')}, {doc.get('state')}")
        t = Transfer(id=str(doc["id"]), model=str(doc["model"]), revision=doc["revision"],
                     priority=int(doc["priority"]), seq=int(doc["seq"]), user=True, source=doc["source"],
                     started=float(doc["started"]),
                     state="queued" if doc["state"] == "running" else doc["state"],
                     registered=bool(doc["registered"]),
                     previous=Version(**doc["previous"]) if doc["previous"] else None)
        signed = path.with_suffix(".manifest")
        if signed.exists():
            t.manifest = manifest = (open_manifest(signed.read_bytes()), signed.read_bytes())
            jobs = self.fetcher.jobs_for(manifest[0])
            mine = set(doc["files"])
            for job in jobs:
                if job.name in mine:
                    t.join(job)
            disk = [(job, bytes_on_disk(job)) for job in jobs]
            for job, have in disk:
                if job.name in t.files:
                    t.files[job.name] |= {"done": have, "state": "done" if have == job.size else "queued"}
            t.plan(disk)
        log.info("transfer %s of %s restored %s: %d of %d bytes here", t.id, t.model, t.state, t.done_bytes,
                 t.total_bytes, extra={"event": "transfer_restored", "model": t.model})
        return t


"""The model library of a running peer: the one owner of getting a model's files.

Where a manifest comes from (this peer's store, else a peer that holds the model), which peers hold a model
(live members that advertise it, least loaded first), what a stage needs on disk (its shards and the
model's small files, fetched from the holders and SHA256-checked before they are committed), and the model
fetches users start through the API (``start_fetch``; their progress is a ``Transfer``).

Task (a child of the peer's nursery):
    run         - the nursery of the fetches started with ``start_fetch``
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from mesh.errors import MeshError, NotFoundError
from mesh.ids import ModelRef, NodeId
from mesh.ports import MeshView, Offload
from mesh.wire import NodeStatus
from storage.manifest import Manifest, Shard
from storage.registry import safe_name
from storage.shards import shard_path
from storage.store import Store
from storage.transfer import Fetcher, Job, Transfer

log = logging.getLogger(__name__)


class Library:
    def __init__(self, store: Store, fetcher: Fetcher, mesh: MeshView, offload: Offload) -> None:
        self.store, self.fetcher, self.mesh, self.offload = store, fetcher, mesh, offload
        self._manifests: dict[tuple[str, str], tuple[Manifest, bytes]] = {}
        self._nursery: trio.Nursery | None = None

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
        """The signed manifest of ``model`` (at ``revision``, or the version found): this peer's store
        first, then any peer that advertises it. MODEL_NOT_AVAILABLE when nobody gives one."""
        if revision is not None and (model, revision) in self._manifests:
            return self._manifests[(model, revision)]
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
        self._manifests[(model, found[0].revision)] = found
        return found

    def _installed(self, manifest: Manifest) -> bool:
        try:
            self.store.registry.require(manifest.model_id, manifest.revision)
        except MeshError:
            return False
        return True

    async def ensure(self, manifest: Manifest, shards: Sequence[Shard]) -> tuple[Path, dict[str, Path]]:
        """(folder with the model's files, shard SHA256 → file) with everything here; what is missing is
        fetched from the peers that hold the model (each file SHA256-checked before it is committed)."""
        store, shard_dir = self.store, self.shard_dir
        paths = {s.sha256: shard_path(shard_dir, s.sha256) for s in shards}
        if await self.offload(self._installed, manifest):
            return store.registry.model_dir(manifest.model_id, manifest.revision), paths
        folder = store.root / "stages" / safe_name(manifest.model_id) / safe_name(manifest.revision)
        jobs = [Job(s.name, s.sha256, s.size, paths[s.sha256]) for s in shards]
        jobs += [Job(f.path, f.sha256, f.size, folder / f.path) for f in manifest.files]

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
            t = self.fetcher.new_transfer(manifest.model_id, manifest.revision)
            t.total_bytes, t.files_total = sum(j.size for j in todo), len(todo)
            try:
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

    # ---- fetches started by users -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start_fetch(self, model: str, revision: str | None, source: str | None) -> Transfer:
        """Fetch a model from the peers that hold it, in the background; its progress is the returned
        Transfer (``/api/transfers``). ``source``: where to add it from if no peer can deliver it."""
        assert self._nursery is not None, "start_fetch before Library.run"
        transfer = self.fetcher.new_transfer(model, revision)
        add_from_source = None
        if source:
            async def add_from_source(rev: str | None) -> None:
                await self.offload(functools.partial(self.store.add, source, revision=rev, model_id=model))

        async def fetch() -> None:
            try:
                await self.fetcher.fetch_model(model, revision, self.holders(model, revision),
                                               source=add_from_source, transfer=transfer)
                self.store.count(model, "fetch")
            except MeshError as err:  # recorded on the transfer and logged by the fetcher
                log.warning("fetching %s failed: %s %s", model, err.code, err,
                            extra={"event": "fetch_failed", "code": err.code, "model": model})
            except Exception as exc:  # a bug in one fetch must not take the peer down
                log.exception("fetching %s failed unexpectedly", model,
                              extra={"event": "fetch_failed", "code": "INTERNAL", "model": model})
                transfer.state = "error"
                transfer.error = {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}

        self._nursery.start_soon(fetch)
        return transfer

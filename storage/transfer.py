"""Peer-to-peer model transfer over the Transport's streams.

``/meshnode/manifest/1``  request ``{"model", "revision"}`` → reply ``{"ok": true, "manifest": <signed bytes>}``
``/meshnode/shard/1``     request ``{"sha256", "offset"}`` → reply ``{"ok": true, "size", "offset"}`` followed by
                          the raw bytes from ``offset`` to the end of the shard (or model file)

Every request and reply header is one length-prefixed CBOR frame; a refusal is
``{"ok": false, "code", "message"}`` and closes the stream. A peer only serves content listed in one of its
ready manifests, by hash: never a partial file, never a path.

The receiving side (``Fetcher``) streams bytes into ``.<name>.partial`` beside the destination while hashing
them, whole and per piece (``storage.pieces``; no shard is ever held whole in memory); only an exact size and
SHA256 match is renamed into place. A broken transfer keeps its partial file and resumes from its last byte
with the next holder, after re-checking every complete piece it holds; a piece that does not match its
manifest hash is cut off and fetched again, from the next holder (with an older manifest, without piece
hashes, a whole-file mismatch deletes the file: which bytes are bad cannot be known). Files move
``parallel`` at a time over every transfer, in the queue's order (``storage.queue``: priority, then the
order transfers were queued in), each tried from every holder up to ``retries`` rounds with exponential
backoff, the model source last. A file already being fetched by this process is waited for, never fetched
twice; one being fetched by another process sharing the store holds its file lock (``LOCK_HELD``). What a
transfer needs is checked against the free disk before its first byte (``INSUFFICIENT_STORAGE``); a disk
that fills anyway stops the transfer, removes its partial files and leaves the model as it was.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import trio

from mesh.errors import DecodeError, LocalError, MeshError, PeerError
from mesh.fsutil import atomic_write
from mesh.ids import NodeId
from mesh.transport import Stream, Transport
from mesh.wire import Reader, loads_cbor
from storage.manifest import MAX_MANIFEST, Manifest, open_manifest
from storage.pieces import PieceCheck, PieceHashMismatch
from storage.queue import FINISHED, NORMAL, Slots, next_state
from storage.registry import StoreLock, Version
from storage.shards import ShardHashMismatch, ShardSizeMismatch, shard_path
from storage.store import MANIFEST_FILE, InsufficientStorage, Store, disk_full, task_lock

log = logging.getLogger(__name__)

MANIFEST_PROTOCOL = "/meshnode/manifest/1"
SHARD_PROTOCOL = "/meshnode/shard/1"
#: Bytes per read/write while streaming a file; what is lost at most when a holder dies mid-transfer.
CHUNK = 256 * 1024
MAX_REQUEST = 4096
MAX_REPLY_HEADER = 4096
#: Deadline of one stream operation during a transfer (a holder that stalls this long is given up).
TRANSFER_TIMEOUT = 10.0
#: Finished transfers kept for the API, and progress events kept for ``/api/transfers``.
KEEP_TRANSFERS = 32
KEEP_EVENTS = 1000


class TransferFailed(PeerError):
    code = "TRANSFER_FAILED"


class ManifestMismatch(PeerError):
    """A holder answered with the manifest of another model or revision than asked for."""

    code = "MANIFEST_MISMATCH"


def _dumps(obj: dict[str, Any]) -> bytes:
    return cbor2.dumps(obj)


def _refusal(err: MeshError) -> bytes:
    return _dumps({"ok": False, "code": err.code, "message": str(err)[:500]})


def _reply(data: bytes, what: str) -> Reader:
    """A reply header; the refusal it carries is raised as a PeerError with the holder's code."""
    r = Reader(loads_cbor(data, MAX_REPLY_HEADER if what != "manifest" else MAX_MANIFEST + 1024), what)
    if not r.flag("ok"):
        raise PeerError(f"refused: {r.text('message', '')}", code=r.text("code", "REFUSED")[:64])
    return r


def _hex_digest(text: str, where: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise DecodeError(f"{where}: {text[:80]!r} is not a hex SHA256")
    return text


# ---- rate limit ----------------------------------------------------------------------------------


class RateLimit:
    """Bytes per second shared by every transfer that uses it (0: unlimited). A virtual clock: each
    ``take`` books its bytes after the ones booked before it, and sleeps until its slot."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self._next = 0.0

    def piece(self, size: int) -> int:
        """How many bytes to move at a time under this limit: at most an eighth of a second's budget,
        so a stream sharing the limit with others still makes progress well within a deadline."""
        return size if self.rate <= 0 else max(4096, min(size, int(self.rate / 8)))

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            await trio.sleep_until(start)


# ---- serving -------------------------------------------------------------------------------------


class Server:
    """Answers manifest and shard requests from a Store. Every refusal is a reply with a code."""

    def __init__(self, store: Store, *, upload: RateLimit | None = None) -> None:
        self.store = store
        self.upload = upload or RateLimit(0)
        self.sent_bytes = 0  # shard and model-file bytes served, for GET /metrics

    def register(self, transport: Transport, *, max_concurrent: int = 8) -> None:
        transport.handle(MANIFEST_PROTOCOL, self.serve_manifest, max_concurrent=max_concurrent,
                         timeout=TRANSFER_TIMEOUT)
        transport.handle(SHARD_PROTOCOL, self.serve_shard, max_concurrent=max_concurrent, timeout=TRANSFER_TIMEOUT)

    async def _request(self, stream: Stream, what: str) -> Reader | None:
        """The request frame, or None after answering a malformed one with a refusal and its code."""
        try:
            return Reader(loads_cbor(await stream.receive_frame(MAX_REQUEST), MAX_REQUEST), what)
        except DecodeError as err:  # oversize frames included
            log.info("%s from %s refused: %s %s", what, stream.peer, err.code, err,
                     extra={"event": "request_refused", "code": err.code, "peer": stream.peer})
            await stream.send_frame(_refusal(err))
            return None

    async def serve_manifest(self, stream: Stream) -> None:
        if (r := await self._request(stream, "manifest request")) is None:
            return
        try:
            model, revision = r.text("model"), r.opt_text("revision")
            _, signed = await trio.to_thread.run_sync(self.store.manifest, model, revision)
        except MeshError as err:
            log.info("manifest request from %s refused: %s %s", stream.peer, err.code, err,
                     extra={"event": "manifest_refused", "code": err.code, "peer": stream.peer})
            await stream.send_frame(_refusal(err))
            return
        self.store.count(model, "manifest")
        await stream.send_frame(_dumps({"ok": True, "manifest": signed}))

    async def serve_shard(self, stream: Stream) -> None:
        if (r := await self._request(stream, "shard request")) is None:
            return
        try:
            sha256, offset = _hex_digest(r.text("sha256"), "shard request.sha256"), r.integer("offset")
            path, model = await trio.to_thread.run_sync(self.store.blob, sha256)
            f = await trio.open_file(path, "rb")
        except (MeshError, OSError) as exc:
            err = exc if isinstance(exc, MeshError) else LocalError(f"cannot read it: {exc}", code="STORE_IO")
            log.info("shard request from %s refused: %s %s", stream.peer, err.code, err,
                     extra={"event": "shard_refused", "code": err.code, "peer": stream.peer})
            await stream.send_frame(_refusal(err))
            return
        async with f:
            size = os.fstat(f.fileno()).st_size
            if not 0 <= offset <= size:
                await stream.send_frame(_refusal(PeerError(f"offset {offset} outside 0..{size}",
                                                           code="OFFSET_OUT_OF_RANGE")))
                return
            if offset == 0:
                self.store.count(model, "shard")
            await stream.send_frame(_dumps({"ok": True, "size": size, "offset": offset}))
            await f.seek(offset)
            piece = self.upload.piece(CHUNK)
            while chunk := await f.read(piece):
                await self.upload.take(len(chunk))
                await stream.write(chunk)
                self.sent_bytes += len(chunk)


# ---- progress ------------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One model fetch (or the files of a stage), as the API and the CLI show it, and the queue's handle on it:
    its priority and place in the queue, and whether a user may pause, resume or cancel it."""

    id: str
    model: str
    revision: str | None
    priority: int = NORMAL
    seq: int = 0  # the order it was queued in: its files go before those of later transfers of its priority
    user: bool = False  # started by a user (``Library.start_fetch``): it may be paused, resumed and cancelled
    source: str | None = None  # where a user's transfer adds the model from if no peer can deliver it
    started: float = field(default_factory=time.time)
    state: str = "queued"  # storage.queue.STATES
    error: dict[str, str] | None = None
    total_bytes: int = 0
    done_bytes: int = 0
    resumed_bytes: int = 0  # bytes not fetched again because a partial file (this run's or older) had them
    files_total: int = 0
    files_done: int = 0
    by_source: dict[str, int] = field(default_factory=dict)  # bytes received per holder (discarded ones too)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # per file: size, done, state, source
    active: int = 0  # its files that hold a download slot now
    manifest: tuple[Manifest, bytes] | None = field(default=None, repr=False)  # once known (a resume needs it)
    registered: bool = False  # it set the registry entry to downloading; ``previous`` is what was there
    previous: Version | None = None
    control: str | None = None  # what a user asked of its running fetch: pause, cancel, resume (after a pause)
    scope: trio.CancelScope | None = field(default=None, repr=False)  # its fetch, while one runs
    _samples: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=64))
    _resumed: dict[str, int] = field(default_factory=dict)
    _order: dict[str, int] = field(default_factory=dict)  # file -> its place in the transfer (queue rank)

    def plan(self, disk: Sequence[tuple[Job, int]]) -> None:
        """The transfer's files, each with the bytes of it on disk now (its size when whole). A file new to the
        transfer joins it, unless it is whole already (fetched before, maybe for another model: not this
        transfer's progress); a file it knows keeps its progress (a resume)."""
        for job, have in disk:
            if job.name not in self.files and have != job.size:
                self.join(job)
        self.files_total = len(disk)
        self.files_done = sum(1 for job, have in disk if have == job.size)
        self._totals()

    def join(self, job: Job) -> None:
        """``job`` is part of this transfer from now on, with its own progress."""
        if job.name not in self.files:
            self.files[job.name] = {"name": job.name, "size": job.size, "done": 0, "state": "queued", "source": None}
            self._order[job.name] = len(self._order)
            self._totals()

    def _totals(self) -> None:
        self.total_bytes = sum(f["size"] for f in self.files.values())
        self.done_bytes = sum(f["done"] for f in self.files.values())

    def order(self, name: str) -> int:
        return self._order.get(name, len(self._order))

    def skip(self, name: str) -> None:
        """``name`` turned out whole (another transfer fetched it meanwhile): not part of this one's progress."""
        f = self.files.pop(name, None)
        if f is not None:
            self.total_bytes -= f["size"]
            self.done_bytes -= f["done"]
        self.files_done += 1

    def file_done(self, name: str) -> None:
        self.files_done += 1
        if name in self.files:
            self.at(name, self.files[name]["size"])
            self.files[name]["state"] = "done"

    def moving(self, name: str, delta: int) -> None:
        """One of its files took (+1) or gave back (-1) a download slot."""
        self.active += delta
        if name in self.files and self.files[name]["state"] != "done":
            self.files[name]["state"] = "running" if delta > 0 else "queued"
        if self.active and self.state == "queued":
            self.state = next_state(self.state, "start")
        elif not self.active and self.state == "running":
            self.state = next_state(self.state, "wait")

    def add(self, n: int, source: str, name: str = "") -> None:
        self.done_bytes += n
        self.by_source[source] = self.by_source.get(source, 0) + n
        if name in self.files:
            self.files[name]["done"] += n
            self.files[name] |= {"state": "running", "source": source}
        now = time.monotonic()
        if not self._samples or now - self._samples[-1][0] >= 0.1:
            self._samples.append((now, self.done_bytes))

    def at(self, name: str, offset: int) -> None:
        """``name`` has ``offset`` bytes on disk: bytes found that were not counted yet (a partial file left by an
        earlier run) count as from ``partial``; bytes dropped (a bad piece) no longer count."""
        f = self.files.get(name)
        if f is None:
            return
        delta = offset - f["done"]
        f["done"] = offset
        self.done_bytes += delta
        if delta > 0:
            self.by_source["partial"] = self.by_source.get("partial", 0) + delta
        elif delta < 0:
            self._samples.clear()

    def resume(self, name: str, offset: int) -> None:
        """A file continues from ``offset``: bytes kept are counted once per file, however many retries."""
        counted = self._resumed.get(name, 0)
        if offset > counted:
            self.resumed_bytes += offset - counted
            self._resumed[name] = offset

    def discard(self, name: str) -> None:
        """The bytes of ``name`` failed verification and were deleted: progress goes back."""
        self.at(name, 0)
        self.resumed_bytes -= self._resumed.pop(name, 0)
        self._samples.clear()

    def speed(self) -> float:
        """Bytes per second over the last few seconds."""
        now = time.monotonic()
        recent = [s for s in self._samples if now - s[0] <= 5.0]
        if len(recent) < 2 or recent[-1][0] == recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def snapshot(self) -> dict[str, Any]:
        speed = self.speed() if self.state == "running" else 0.0
        left = self.total_bytes - self.done_bytes
        return {
            "id": self.id, "model": self.model, "revision": self.revision, "state": self.state,
            "priority": self.priority, "controllable": self.user,
            "error": self.error, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
            "resumed_bytes": self.resumed_bytes, "files_total": self.files_total, "files_done": self.files_done,
            "by_source": dict(self.by_source), "bytes_per_s": round(speed),
            "files": [dict(f) for f in self.files.values()],
            "eta_s": round(left / speed, 1) if speed > 0 else None,
            "elapsed_s": round(time.time() - self.started, 3),
        }


@dataclass(frozen=True, slots=True)
class Job:
    """One file to fetch: a shard (content-addressed) or a model file (config, tokenizer), with its manifest's
    piece hashes (none from a version-1 manifest)."""

    name: str
    sha256: str
    size: int
    dest: Path
    pieces: bytes = b""
    piece_size: int = 0

    @property
    def partial(self) -> Path:
        return self.dest.with_name(f".{self.dest.name}.partial")


class _Held:
    """A store lock this process holds while it works, renewed as the work goes on (``tick``), so only a holder
    that stopped working loses it when its timeout passes."""

    def __init__(self, lock: StoreLock, timeout: float) -> None:
        self.lock, self.every, self.last = lock, timeout / 4, time.monotonic()

    async def tick(self) -> None:
        if time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        await trio.to_thread.run_sync(self.lock.renew, time.time())


# ---- fetching ------------------------------------------------------------------------------------


class Fetcher:
    """Fetches models and files from the peers that hold them, ``parallel`` files at a time over every transfer
    (``storage.queue.Slots``: higher priority first, then the order transfers were queued in)."""

    def __init__(self, transport: Transport, store: Store, *, parallel: int = 3, retries: int = 3,
                 backoff: float = 0.5, download: RateLimit | None = None, timeout: float = TRANSFER_TIMEOUT) -> None:
        self.transport = transport
        self.store = store
        self.parallel = parallel
        self.retries = retries
        self.backoff = backoff
        self.download = download or RateLimit(0)
        self.timeout = timeout
        self.transfers: dict[str, Transfer] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP_EVENTS)
        self.slots: Slots[int] = Slots(parallel)
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._queued = itertools.count(1)  # transfers' places in the queue
        self._tokens = itertools.count(1)  # one per file asking for a slot
        self._granted: dict[int, trio.Event] = {}  # a waiting slot token -> set when it holds a slot
        self._claims: dict[Path, int] = {}  # destination -> the slot token of the fetch that claimed it
        self._inflight: dict[Path, trio.Event] = {}  # destination -> set when its fetch ends
        self._models: dict[tuple[str, str | None], trio.Event] = {}
        self._busy: collections.Counter[NodeId] = collections.Counter()  # our downloads in flight per holder
        self.received_bytes = 0  # shard and model-file bytes received from holders, for GET /metrics

    # ---- progress events -------------------------------------------------------------------------

    def event(self, kind: str, t: Transfer, **fields: Any) -> None:
        ev = {"seq": next(self._seq), "time": round(time.time(), 3), "event": kind, "transfer": t.id,
              "model": t.model} | fields
        self.events.append(ev)
        log.info("transfer %s %s: %s", t.id, kind, " ".join(f"{k}={v}" for k, v in fields.items()),
                 extra={"event": f"transfer_{kind}", "model": t.model})

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["seq"] > seq]

    def new_transfer(self, model: str, revision: str | None, *, priority: int = NORMAL,
                     user: bool = False) -> Transfer:
        t = Transfer(id=f"t{next(self._ids)}", model=model, revision=revision, priority=priority,
                     seq=next(self._queued), user=user)
        self.adopt(t)
        self.event("queued", t, priority=priority)
        return t

    def adopt(self, t: Transfer) -> None:
        """Keep ``t`` (a new transfer, or one restored after a restart: later ids and places come after it)."""
        number = int(t.id[1:]) if t.id[1:].isdigit() else 0
        if number >= (nxt := next(self._ids)):
            nxt = number + 1
        self._ids = itertools.count(nxt)
        self._queued = itertools.count(max(next(self._queued), t.seq + 1))
        self.transfers[t.id] = t
        done = [k for k, v in self.transfers.items() if v.state in FINISHED]
        for k in done[: max(0, len(done) - KEEP_TRANSFERS)]:
            del self.transfers[k]

    def jobs_for(self, manifest: Manifest) -> list[Job]:
        """Every shard and model file of an installed model version, where the store keeps it."""
        registry = self.store.registry
        folder = registry.model_dir(manifest.model_id, manifest.revision)
        jobs = [Job(s.name, s.sha256, s.size, shard_path(registry.shard_dir, s.sha256), s.pieces, manifest.piece_size)
                for s in manifest.shards]
        return jobs + [Job(f.path, f.sha256, f.size, folder / f.path, f.pieces, manifest.piece_size)
                       for f in manifest.files]

    async def on_disk(self, jobs: Sequence[Job]) -> list[tuple[Job, int]]:
        """Each job with the bytes of it on disk: its size when whole, else its partial file's."""
        return await trio.to_thread.run_sync(lambda: [(j, bytes_on_disk(j)) for j in jobs])

    async def check_space(self, t: Transfer, disk: Sequence[tuple[Job, int]]) -> None:
        """INSUFFICIENT_STORAGE unless what ``t`` still needs fits beside what the other transfers still need.
        Before any byte of the transfer is written."""
        needed = sum(job.size - have for job, have in disk)
        reserved = sum(o.total_bytes - o.done_bytes for o in self.transfers.values()
                       if o is not t and o.state in ("queued", "running"))
        await trio.to_thread.run_sync(self.store.check_space, needed, f"{t.model} ({t.revision})", reserved)

    # ---- manifests -------------------------------------------------------------------------------

    async def fetch_manifest(self, peer: NodeId, model: str, revision: str | None) -> tuple[Manifest, bytes]:
        """The signed manifest of ``model`` from ``peer``, verified (signature, signer, schema)."""
        async with self.transport.open_stream(peer, MANIFEST_PROTOCOL, timeout=self.timeout) as stream:
            await stream.send_frame(_dumps({"model": model, "revision": revision}))
            r = _reply(await stream.receive_frame(MAX_MANIFEST + 1024), "manifest")
        signed = r.blob("manifest")
        manifest = open_manifest(signed)
        if manifest.model_id != model or (revision is not None and manifest.revision != revision):
            raise ManifestMismatch(f"{peer} answered {manifest.model_id}@{manifest.revision} "
                                   f"for {model}@{revision or '(default)'}")
        return manifest, signed

    # ---- whole models ----------------------------------------------------------------------------

    async def fetch_model(self, model: str, revision: str | None, holders: Sequence[NodeId], *,
                          source: Callable[[str | None], Awaitable[None]] | None = None,
                          transfer: Transfer | None = None) -> Manifest:
        """Fetch every shard and file of a model version from ``holders`` and install it (status
        downloading → verifying → ready, or error; a full disk leaves the entry as it was). ``source(revision)``,
        when given, is the last resort for what no holder could deliver (e.g. adding the model from the hub or a
        packaged file). A second call for the same model while one runs waits for it. Cancelling it (a pause)
        keeps every byte fetched; ``transfer`` (resumed) continues from them."""
        key = (model, revision)
        t = transfer or self.new_transfer(model, revision)
        while (running := self._models.get(key)) is not None:
            await running.wait()
        self._models[key] = done = trio.Event()  # no checkpoint between the check and this claim
        try:
            try:
                manifest = (await trio.to_thread.run_sync(self.store.manifest, model, revision))[0]
            except MeshError:
                pass
            else:  # already here (perhaps fetched by the call we just waited for)
                t.state, t.revision = "done", manifest.revision
                self.event("done", t, revision=manifest.revision, bytes=0, already_installed=True)
                return manifest
            try:
                return await self._fetch_model(t, model, revision, holders, source)
            except OSError as exc:
                raise _io_error(exc, f"store I/O failed while fetching {model}") from exc
        except MeshError as err:
            if t.control is not None:  # stopped on purpose: the user's pause or cancel decides what is kept
                raise
            t.state, t.error = "error", err.to_dict()
            self.event("failed", t, code=err.code, message=str(err))
            if t.registered and isinstance(err, InsufficientStorage):  # the model stays as it was
                await trio.to_thread.run_sync(self.store.release_headroom)
                await trio.to_thread.run_sync(self.unregister, t)
            elif t.registered:  # never leave the registry saying downloading/verifying
                await trio.to_thread.run_sync(self._mark_error, model, t.revision, err)
            raise
        finally:
            del self._models[key]
            done.set()

    async def _fetch_model(self, t: Transfer, model: str, revision: str | None, holders: Sequence[NodeId],
                           source: Callable[[str | None], Awaitable[None]] | None) -> Manifest:
        if t.manifest is None:
            if not holders:
                if source is None:
                    raise TransferFailed(f"no peer holds {model}@{revision or '(any)'}")
                return await self._from_source(t, model, revision, source, "all: no peer holds it")
            t.manifest = await self._first_manifest(t, model, revision, holders)
        manifest, signed = t.manifest
        rev = t.revision = manifest.revision
        registry = self.store.registry
        jobs = self.jobs_for(manifest)
        disk = await self.on_disk(jobs)
        t.plan(disk)
        self.event("started", t, revision=rev, files=len(jobs), bytes=t.total_bytes, holders=list(holders))
        await self.check_space(t, disk)  # before the registry or any file is written
        if not t.registered:
            t.previous = await trio.to_thread.run_sync(registry.version, model, rev)
            t.registered = True
        await trio.to_thread.run_sync(lambda: registry.set_status(model, rev, "downloading", source="mesh"))
        folder = registry.model_dir(model, rev)
        for d in (folder, registry.shard_dir):
            await trio.to_thread.run_sync(functools.partial(d.mkdir, parents=True, exist_ok=True))
        async with self._locked(task_lock(model, rev), model, rev, self.store.locks.task) as task:
            failures = await self.fetch_files(jobs, holders, t, held=(task,))
            if not failures:
                await trio.to_thread.run_sync(lambda: registry.set_status(model, rev, "verifying"))
                await trio.to_thread.run_sync(self._install, manifest, signed, jobs)
        if failures and source is not None:  # (the source takes the model's lock itself)
            return await self._from_source(t, model, rev, source, [j.name for j, _ in failures])
        if failures:  # fetch_model records the error status
            job, err = failures[0]
            raise TransferFailed(f"{len(failures)} of {len(jobs)} files could not be fetched; "
                                 f"{job.name}: {err.code} {err}")
        t.state = "done"
        self.event("done", t, revision=rev, bytes=t.done_bytes, resumed_bytes=t.resumed_bytes)
        return manifest

    async def _from_source(self, t: Transfer, model: str, revision: str | None,
                           source: Callable[[str | None], Awaitable[None]], missing: object) -> Manifest:
        """The last resort: the source installs the model itself (and its status)."""
        self.event("source_fallback", t, missing=missing)
        await source(revision)
        manifest = (await trio.to_thread.run_sync(self.store.manifest, model, revision))[0]
        t.state, t.revision = "done", manifest.revision
        self.event("done", t, revision=manifest.revision, source="model source")
        return manifest

    async def _first_manifest(self, t: Transfer, model: str, revision: str | None,
                              holders: Sequence[NodeId]) -> tuple[Manifest, bytes]:
        errors = []
        for peer in holders:
            try:
                return await self.fetch_manifest(peer, model, revision)
            except PeerError as err:
                self.event("manifest_refused", t, peer=peer, code=err.code, message=str(err))
                errors.append(f"{peer}: {err.code}")
        raise TransferFailed(f"no holder gave a valid manifest of {model}: {', '.join(errors)}")

    def _mark_error(self, model: str, revision: str | None, err: MeshError) -> None:
        try:
            version = self.store.registry.version(model, revision) if revision else None
            if revision is not None and version is not None and version.status in ("downloading", "verifying"):
                self.store.registry.set_status(model, revision, "error", error=f"{err.code}: {err}")
        except (MeshError, OSError) as exc:
            log.error("cannot record the failed fetch of %s@%s: %s", model, revision, exc,
                      extra={"event": "registry_write_failed", "model": model})

    def unregister(self, t: Transfer) -> None:
        """Put the registry entry of ``t``'s model back as it was before ``t`` began (a full disk, a cancel)."""
        if not t.registered or t.revision is None:
            return
        try:
            self.store.registry.restore(t.model, t.revision, t.previous)
            t.registered = False
        except (MeshError, OSError) as exc:
            log.error("cannot restore the registry entry of %s@%s: %s", t.model, t.revision, exc,
                      extra={"event": "registry_write_failed", "model": t.model})

    def _install(self, manifest: Manifest, signed: bytes, jobs: list[Job]) -> None:
        for job in jobs:  # each was hashed on arrival; a file deleted since is caught here
            if not job.dest.is_file() or job.dest.stat().st_size != job.size:
                raise ShardSizeMismatch(f"{job.name} is missing or changed after it was fetched")
        registry = self.store.registry
        atomic_write(registry.model_dir(manifest.model_id, manifest.revision) / MANIFEST_FILE, signed)
        registry.set_status(manifest.model_id, manifest.revision, "ready", size=manifest.size, source="mesh")

    async def drop_partials(self, t: Transfer) -> int:
        """Delete the partial files of a cancelled ``t`` that no other unfinished transfer needs; how many."""
        if t.manifest is None:
            return 0
        needed = {j.dest for o in self.transfers.values() if o is not t and o.state not in FINISHED and o.manifest
                  for j in self.jobs_for(o.manifest[0])} | set(self._inflight)
        drop = [j.partial for j in self.jobs_for(t.manifest[0]) if j.dest not in needed]
        return await trio.to_thread.run_sync(_unlink_all, drop)

    async def fetch_files(self, jobs: Sequence[Job], holders: Sequence[NodeId], t: Transfer, *,
                          held: Sequence[_Held] = ()) -> list[tuple[Job, MeshError]]:
        """Fetch ``jobs`` (each as the queue grants it a slot); the ones that failed, with why. A full disk
        stops them all: every partial file of ``jobs`` is removed and INSUFFICIENT_STORAGE raised."""
        failures: list[tuple[Job, MeshError]] = []
        full: list[InsufficientStorage] = []

        async with trio.open_nursery() as nursery:
            async def one(job: Job) -> None:
                try:
                    await self.fetch_file(job, holders, t, held=held)
                except InsufficientStorage as err:
                    full.append(err)
                    nursery.cancel_scope.cancel()  # the other files cannot be written either
                except MeshError as err:
                    failures.append((job, err))

            for job in jobs:
                nursery.start_soon(one, job)
        if full:
            await trio.to_thread.run_sync(_unlink_all, [j.partial for j in jobs if j.dest not in self._inflight])
            raise full[0]
        return failures

    # ---- one file --------------------------------------------------------------------------------

    async def fetch_file(self, job: Job, holders: Sequence[NodeId], t: Transfer, *,
                         held: Sequence[_Held] = ()) -> None:
        """Fetch ``job`` into place from the first holder that delivers it whole and intact, once the queue gives
        it a slot (under its file lock)."""
        while (running := self._inflight.get(job.dest)) is not None:
            if (token := self._claims.get(job.dest)) is not None:
                self.slots.bump(token, t.priority)  # whoever claimed it may be queued lower than we are
            await running.wait()  # the same file is being fetched (another model, another caller)
        if job.dest.is_file() and job.dest.stat().st_size == job.size:
            if t.files.get(job.name, {}).get("state") != "done":
                t.skip(job.name)  # committed files were verified when they arrived
            return
        self._inflight[job.dest] = done = trio.Event()
        try:
            t.join(job)
            async with self._slot(job, t), self._locked(file_lock_name(job), t.model, t.revision or "",
                                                         self.store.locks.file) as lock:
                await self._fetch_file(job, holders, t, (*held, lock))
        finally:
            del self._inflight[job.dest]
            done.set()

    @asynccontextmanager
    async def _slot(self, job: Job, t: Transfer) -> AsyncIterator[None]:
        """Hold one of the ``parallel`` download slots for ``job`` (waiting in the queue for it)."""
        token = next(self._tokens)
        self._claims[job.dest] = token
        holding = False
        try:
            if not self.slots.ask(token, t.priority, t.seq, t.order(job.name)):
                self._granted[token] = granted = trio.Event()
                await granted.wait()
            holding = True
            t.moving(job.name, +1)
            self.event("file_started", t, file=job.name)
            yield
        finally:
            if holding:
                t.moving(job.name, -1)
            self._claims.pop(job.dest, None)
            self._granted.pop(token, None)
            for waiter in self.slots.leave(token):  # a waiter cancelled meanwhile gives it back in its finally
                self._granted.pop(waiter).set()

    @asynccontextmanager
    async def _locked(self, name: str, model: str, version: str, timeout: float) -> AsyncIterator[_Held]:
        """The store lock ``name`` (LOCK_HELD when another live process holds it), released at the end."""
        try:
            lock = await trio.to_thread.run_sync(functools.partial(
                self.store.registry.lock, name, model=model, version=version, timeout=timeout))
        except OSError as exc:
            raise _io_error(exc, f"cannot take the lock {name}") from exc
        try:
            yield _Held(lock, timeout)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await trio.to_thread.run_sync(lock.release)

    async def _fetch_file(self, job: Job, holders: Sequence[NodeId], t: Transfer, held: Sequence[_Held]) -> None:
        errors: list[str] = []
        for round_ in range(self.retries):
            if round_:
                await trio.sleep(self.backoff * 2 ** (round_ - 1))
            # The holder with the fewest of our downloads in flight first (ties: the given order).
            for peer in sorted(holders, key=lambda p: self._busy[p]):
                try:
                    await self._download(peer, job, t, held)
                    t.file_done(job.name)
                    self.event("file_done", t, file=job.name, peer=peer)
                    return
                except PeerError as err:
                    errors.append(f"{peer[:12]}…: {err.code}")
                    self.event("attempt_failed", t, file=job.name, peer=peer, code=err.code, message=str(err))
        raise TransferFailed(f"{job.name}: every holder failed ({'; '.join(errors[-6:])})")

    async def _download(self, peer: NodeId, job: Job, t: Transfer, held: Sequence[_Held]) -> None:
        """One attempt from one holder: resume the partial file from its last good piece, check each piece as it
        arrives, commit only an exact match."""
        try:
            check, bad = await trio.to_thread.run_sync(_resume_point, job)
        except OSError as exc:
            raise _io_error(exc, f"cannot read {job.partial}") from exc
        if bad is not None:
            self.event("piece_rejected", t, file=job.name, peer="partial", piece=bad.index, offset=bad.offset)
        offset = check.position
        t.at(job.name, offset)
        if offset:
            t.resume(job.name, offset)
            self.event("resumed", t, file=job.name, peer=peer, offset=offset)
        self._busy[peer] += 1
        try:
            await self._stream_into(peer, job, t, check, held)
        finally:
            self._busy[peer] -= 1
            if not self._busy[peer]:
                del self._busy[peer]
        if not check.complete():
            await trio.to_thread.run_sync(functools.partial(job.partial.unlink, missing_ok=True))
            t.discard(job.name)  # which bytes are wrong cannot be known (no piece hashes): start over
            raise ShardHashMismatch(f"{job.name} from {peer}: SHA256 {check.hexdigest()[:16]}... is not "
                                    f"{job.sha256[:16]}...; discarded")
        await trio.to_thread.run_sync(os.replace, job.partial, job.dest)

    async def _stream_into(self, peer: NodeId, job: Job, t: Transfer, check: PieceCheck,
                           held: Sequence[_Held]) -> None:
        offset = check.position
        async with self.transport.open_stream(peer, SHARD_PROTOCOL, timeout=self.timeout) as stream:
            await stream.send_frame(_dumps({"sha256": job.sha256, "offset": offset}))
            r = _reply(await stream.receive_frame(MAX_REPLY_HEADER), "shard reply")
            size, at = r.integer("size"), r.integer("offset")
            if size != job.size or at != offset:
                raise ShardSizeMismatch(f"{peer} offers {job.name} as {size} bytes from {at}; "
                                        f"want {job.size} from {offset}")
            try:
                out = await trio.to_thread.run_sync(_open_partial, job.partial)
            except OSError as exc:
                raise await self._write_failed(job, t, exc) from exc
            try:
                left, piece = size - offset, self.download.piece(CHUNK)
                while left:
                    chunk = await stream.read_some(min(piece, left))  # deadline = silence, not size
                    self.received_bytes += len(chunk)
                    try:
                        await trio.to_thread.run_sync(_append, out, check, chunk)
                    except PieceHashMismatch as err:  # the partial ends at the bad piece's start again
                        if not err.offset:
                            await trio.to_thread.run_sync(functools.partial(job.partial.unlink, missing_ok=True))
                        t.add(len(chunk), peer, job.name)
                        t.at(job.name, err.offset)
                        self.event("piece_rejected", t, file=job.name, peer=peer, piece=err.index, offset=err.offset)
                        raise
                    left -= len(chunk)
                    t.add(len(chunk), peer, job.name)
                    for lock in held:
                        await lock.tick()
                    await self.download.take(len(chunk))
                await trio.to_thread.run_sync(_sync, out)
            except OSError as exc:
                raise await self._write_failed(job, t, exc) from exc
            finally:
                with contextlib.suppress(OSError):  # a full disk fails the flush again: already handled
                    out.close()

    async def _write_failed(self, job: Job, t: Transfer, exc: OSError) -> MeshError:
        """The error of a failed write; on a full disk the file's partial is removed first."""
        if not disk_full(exc):
            return LocalError(f"cannot write {job.partial}: {exc}", code="STORE_IO")
        await trio.to_thread.run_sync(functools.partial(job.partial.unlink, missing_ok=True))
        t.discard(job.name)
        return InsufficientStorage(f"the disk filled while {job.name} was written ({exc}); its partial file is "
                                   "removed")


def _io_error(exc: OSError, what: str) -> MeshError:
    if disk_full(exc):
        return InsufficientStorage(f"{what}: {exc}")
    return LocalError(f"{what}: {exc}", code="STORE_IO")


def file_lock_name(job: Job) -> str:
    """The lock name of the fetch of one destination file."""
    return f"file-{hashlib.sha256(str(job.dest).encode()).hexdigest()[:32]}"


def bytes_on_disk(job: Job) -> int:
    """Bytes of ``job`` on disk: its size when the file is in place, else what its partial file holds."""
    try:
        if job.dest.stat().st_size == job.size:
            return job.size
    except FileNotFoundError:
        pass
    try:
        return min(job.partial.stat().st_size, job.size)
    except FileNotFoundError:
        return 0


def _unlink_all(paths: Sequence[Path]) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _resume_point(job: Job) -> tuple[PieceCheck, PieceHashMismatch | None]:
    """The check of a file positioned after the bytes its partial file has, each complete piece verified: the
    partial is cut at the first bad piece (returned), and one longer than the file is garbage and removed."""
    check = PieceCheck(job.size, job.sha256, job.piece_size, job.pieces)
    try:
        have = job.partial.stat().st_size
    except FileNotFoundError:
        return check, None
    if have > job.size:
        job.partial.unlink()
        return check, None
    bad = None
    with open(job.partial, "rb") as f:
        left = have
        while left:
            chunk = f.read(min(CHUNK * 4, left))
            if not chunk:
                break
            try:
                check.update(chunk)
            except PieceHashMismatch as err:
                bad = err
                break
            left -= len(chunk)
    if not check.position:
        job.partial.unlink()
    elif check.position < have:
        os.truncate(job.partial, check.position)
    return check, bad


def _open_partial(partial: Path) -> Any:
    partial.parent.mkdir(parents=True, exist_ok=True)
    return open(partial, "ab")


def _append(out: Any, check: PieceCheck, chunk: bytes) -> None:
    """Write ``chunk`` and check it; a piece that does not match is cut off the file again."""
    out.write(chunk)
    try:
        check.update(chunk)
    except PieceHashMismatch:
        out.flush()
        out.truncate(check.position)
        raise


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())

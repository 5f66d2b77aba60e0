"""Crash-safe file writes (a reader sees the old file or the new one, never a torn one) and reads of
secret files that only their owner may read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mesh.errors import LocalError


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temp file in the same directory, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_private(path: Path) -> bytes:
    """The bytes of a secret file that only its owner may read or write (mode 0600 or stricter);
    LocalError ``INSECURE_PERMISSIONS`` when group or others have any access, so a secret that others
    could have read is never used. FileNotFoundError when there is no such file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        mode = os.fstat(fd).st_mode & 0o777  # the file that was opened, not a name swapped in between
        if mode & 0o077:
            raise LocalError(f"{path} has mode {mode:04o}: group or others may read it; run `chmod 600 {path}`",
                             code="INSECURE_PERMISSIONS")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)

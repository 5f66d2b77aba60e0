"""Real ``meshnode start`` processes on 127.0.0.1: used by ``meshnode demo``, the integration tests
and the benchmarks. Each peer gets its own data dir and a log file (JSON lines) in it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mesh.app.client import api_get, read_token_file
from mesh.app.node import NODE_FILE
from mesh.config import TOKEN_ENV
from mesh.credential import MEMBERSHIP_FILE
from mesh.errors import MeshError

T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the process that started it dies, so peers never outlive a
    killed test run or demo (a pytest that died of a signal once left three peers running). Linux only; the
    signal follows the starting *thread*, so a LocalMesh is driven from a thread that outlives it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def wait_for(check: Callable[[], T | None], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class PeerProcess:
    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    node_id: str = ""
    api: str = ""  # always a 127.0.0.1 URL, also for a peer whose API binds every interface
    addrs: list[str] = field(default_factory=list)
    token: str | None = None  # what ``get`` sends: the token the peer made in its data dir, if any

    @property
    def log_path(self) -> Path:
        return self.data_dir / "peer.log"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, path: str) -> Any:
        return api_get(self.api, path, timeout=3.0, token=self.token)

    def try_get(self, path: str) -> Any | None:
        try:
            return self.get(path)
        except MeshError:
            return None

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)


@dataclass
class LocalMesh:
    """Start and own peer processes; ``close()`` (or the context manager) kills whatever is left."""

    base_dir: Path
    config_file: str | None = None
    extra_args: tuple[str, ...] = ()
    peers: list[PeerProcess] = field(default_factory=list)
    #: An open mesh (``--open``); else closed: the first peer founds it, a later one joins with an invite
    #: from the peer whose address it bootstraps from (a restarted one is a member already).
    open: bool = False

    def invite(self, peer: PeerProcess, *, ttl: float = 600.0, uses: int = 1) -> str:
        """An invite token from ``peer`` (``POST /api/invite``)."""
        return api_get(peer.api, "/api/invite", method="POST", body={"ttl": ttl, "uses": uses},
                       token=peer.token)["token"]

    def _join_args(self, data_dir: Path, bootstrap: list[str], args: tuple[str, ...]) -> list[str]:
        if self.open or "--open" in (*self.extra_args, *args) or (data_dir / MEMBERSHIP_FILE).exists():
            return []
        for b in bootstrap:
            owner = next((p for p in self.peers if b in p.addrs and p.api and p.alive()), None)
            if owner is not None:
                return ["--join", self.invite(owner)]
        return []

    def start_peer(self, name: str, bootstrap: list[str] = (), *, timeout: float = 60.0,
                   args: tuple[str, ...] = ()) -> PeerProcess:
        """Start one peer and return once it listens (its node file names this process)."""
        return self.wait_started(self.launch(name, bootstrap, args=args), timeout)

    def launch(self, name: str, bootstrap: list[str] = (), *, args: tuple[str, ...] = ()) -> PeerProcess:
        """Start one peer's process and return at once (``wait_started`` waits until it listens)."""
        data_dir = self.base_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / NODE_FILE).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mesh.app.cli", "start", "--data-dir", str(data_dir), "--name", name,
               "--log-json"]
        if self.config_file:
            cmd += ["--config", self.config_file]
        for b in bootstrap:
            cmd += ["--bootstrap", b]
        cmd += self._join_args(data_dir, list(bootstrap), args)
        cmd += [*self.extra_args, *(("--open",) if self.open else ()), *args]
        log = open(data_dir / "peer.log", "ab")  # the child holds its own copy of the descriptor
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop(TOKEN_ENV, None)  # a token in the caller's shell is not these peers' (give --api-token in args)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=partial(_die_with_parent, os.getpid()) if sys.platform == "linux" else None)
        log.close()
        peer = PeerProcess(name, data_dir, proc)
        self.peers.append(peer)
        return peer

    @staticmethod
    def wait_started(peer: PeerProcess, timeout: float = 60.0) -> PeerProcess:
        """``peer`` once it listens, with its node id, API and addresses filled in; RuntimeError if it exits."""

        def started() -> dict[str, Any] | None:
            if not peer.alive():
                raise RuntimeError(f"peer {peer.name} exited with {peer.proc.returncode}; see {peer.log_path}")
            try:
                info = json.loads((peer.data_dir / NODE_FILE).read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == peer.proc.pid else None

        info = wait_for(started, timeout, what=f"peer {peer.name} to start")
        peer.node_id, peer.addrs = info["node_id"], info["addrs"]
        peer.api = info["api"].replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
        peer.token = read_token_file(peer.data_dir)
        return peer

    def start_chain(self, count: int, prefix: str = "peer") -> list[PeerProcess]:
        """Start ``count`` peers where each bootstraps from the previous one only (one after another)."""
        started: list[PeerProcess] = []
        for i in range(count):
            bootstrap = started[-1].addrs[:1] if started else []
            started.append(self.start_peer(f"{prefix}-{chr(ord('a') + i)}", bootstrap))
        return started

    def start_star(self, count: int, prefix: str = "peer", *, args: tuple[str, ...] = ()) -> list[PeerProcess]:
        """Start ``count`` peers: the first, then all the others at once, each bootstrapping from the first
        (they find each other through it)."""
        first = self.start_peer(f"{prefix}-a", args=args)
        rest = [self.launch(f"{prefix}-{chr(ord('a') + i)}", first.addrs[:1], args=args) for i in range(1, count)]
        return [first, *(self.wait_started(p) for p in rest)]

    def close(self, timeout: float = 10.0, *, drain: bool = False) -> None:
        """Stop every peer: at once by default (SIGTERM, then SIGINT, which a peer takes as "stop now": no
        drain_seconds of announcing itself as draining to a mesh that is going away, ~2.5 s per mesh in the
        tests), or with a drain; SIGKILL for any peer still there after ``timeout``."""
        for p in self.peers:
            p.signal(signal.SIGTERM)
        if not drain:
            time.sleep(0.05)  # two signals of one kind may reach the peer as one: the second is another kind
            for p in self.peers:
                p.signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in self.peers:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mesh_view(peer: PeerProcess) -> tuple[frozenset[tuple[str, str]], str | None, int] | None:
    """(node_id, status) pairs, coordinator and term as one peer sees them; None if it does not answer."""
    nodes = peer.try_get("/api/nodes")
    if nodes is None:
        return None
    return frozenset((n["node_id"], n["status"]) for n in nodes["nodes"]), nodes["coordinator"], nodes["term"]


def agreed(peers: list[PeerProcess], *, also_offline: list[str] = ()) -> tuple[str, int] | None:
    """(coordinator, term) when every peer lists every peer of ``peers`` as ready (and each id in
    ``also_offline`` as offline) and all name the same coordinator and term; else None."""
    expected = {(p.node_id, "ready") for p in peers} | {(i, "offline") for i in also_offline}
    views = [mesh_view(p) for p in peers]
    if any(v is None for v in views):
        return None
    if any(set(v[0]) != expected for v in views):  # type: ignore[index]
        return None
    leads = {(v[1], v[2]) for v in views}  # type: ignore[index]
    if len(leads) != 1:
        return None
    coordinator, term = next(iter(leads))
    return (coordinator, term) if coordinator in {p.node_id for p in peers} else None

"""``meshnode demo`` (``make demo``): a real local mesh on 127.0.0.1, shown working.

Starts N ``meshnode start`` processes chained by bootstrap (each knows only the previous one), waits
until every peer lists every peer as ready under one coordinator, prints the mesh, then kills the
coordinator with SIGKILL and shows the survivors detect it and agree on a new one.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

from mesh.cli import format_status
from mesh.config import Config
from mesh.localmesh import LocalMesh, agreed, wait_for

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local-3.toml"


def main(cfg: Config, config_path: str | None) -> int:
    base = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    count = cfg.demo.peers
    try:
        with LocalMesh(base, config_path or str(DEFAULT_CONFIG)) as mesh:
            print(f"starting {count} peers on 127.0.0.1 (each bootstraps from the previous one)...", flush=True)
            t0 = time.monotonic()
            peers = mesh.start_chain(count)
            for p in peers:
                print(f"  {p.name}: {p.addrs[0]}  api {p.api}", flush=True)
            coordinator, term = wait_for(lambda: agreed(peers), timeout=30, what="the mesh to converge")
            print(f"\nconverged in {time.monotonic() - t0:.1f}s: every peer lists all {count} as ready\n", flush=True)
            print(format_status(peers[-1].get("/api/nodes")), flush=True)
            if count < 2:
                return 0
            victim = next(p for p in peers if p.node_id == coordinator)
            survivors = [p for p in peers if p is not victim]
            print(f"\nkilling the coordinator ({victim.name}) with SIGKILL...", flush=True)
            victim.signal(signal.SIGKILL)
            t1 = time.monotonic()
            _, new_term = wait_for(lambda: agreed(survivors, also_offline=[victim.node_id]), timeout=20,
                                     what="a new coordinator")
            print(f"survivors marked it offline and agreed on a new coordinator in {time.monotonic() - t1:.1f}s "
                  f"(term {term} -> {new_term})\n", flush=True)
            print(format_status(survivors[0].get("/api/nodes")), flush=True)
            print("\nstopping the mesh (SIGTERM: drain, goodbye, exit)...", flush=True)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""Three real `meshnode start` processes on 127.0.0.1 with a chained bootstrap (B knows A, C knows B). A drain
(the CLI, then a clean exit) is in test_long_running's restart test; in process, tests/services."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from seed_payloads import DEVICE_INFO, NODE_INFO, TRAINING_STATUS

from mesh.app.client import api_get
from mesh.app.localmesh import LocalMesh, agreed, wait_for

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")


def test_chain_of_three_converges_then_survives_kill_of_the_coordinator(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, CONFIG, extra_args=("--benchmark-seconds", "0.1")) as mesh:
        t0 = time.monotonic()
        peers = mesh.start_chain(3)
        coordinator, term = wait_for(lambda: agreed(peers), timeout=15, what="3 peers ready, one coordinator")
        print(f"converged in {time.monotonic() - t0:.1f}s: coordinator {coordinator} term {term}")
        # Peer exchange: C only knew B, yet it is directly connected to A as well.
        c = peers[2]
        assert c.get("/api/node-health?node_id=" + peers[0].node_id)["is_healthy"] is True

        # The seeds' device reports, made to A by its own app, reach C (two hops of real gossip).
        a = peers[0]
        answers = [api_get(a.api, path, method="POST", body=body) for path, body in (
            ("/api/training-data", TRAINING_STATUS), ("/api/node-info", DEVICE_INFO), ("/api/node-info", NODE_INFO))]
        assert all(answer["success"] for answer in answers)

        def row_of_a_at_c() -> dict | None:
            row = next((n for n in c.get("/api/nodes")["nodes"] if n["node_id"] == a.node_id), None)
            return row if row and row["training"] and "network_bandwidth_mbps" in row["device"] else None

        row = wait_for(row_of_a_at_c, timeout=10, what="C to see what A's app reported")
        assert row["training"] == TRAINING_STATUS["training_status"]
        assert row["device"]["platform"] == "windows" and row["device"]["network_bandwidth_mbps"] == 1000
        if "gpu" in answers[1]["taken"]:  # A measures no GPU of its own: the reported one is gossiped
            assert [g["name"] for g in row["hardware"]["gpus"]] == ["NVIDIA RTX 3080"]
        assert c.get("/api/node-health?node_id=" + a.node_id)["training"] == TRAINING_STATUS["training_status"]

        victim = next(p for p in peers if p.node_id == coordinator)
        survivors = [p for p in peers if p is not victim]
        victim.signal(signal.SIGKILL)
        t1 = time.monotonic()
        new_coordinator, new_term = wait_for(
            lambda: agreed(survivors, also_offline=[victim.node_id]), timeout=10,
            what="survivors to agree on a new coordinator and mark the old one offline",
        )
        print(f"re-elected in {time.monotonic() - t1:.1f}s: {new_coordinator} term {new_term}")
        assert new_coordinator != coordinator and new_term > term
        health = survivors[0].get("/api/node-health?node_id=" + victim.node_id)
        assert health["status"] == "offline" and not health["is_healthy"] and health["issues"]

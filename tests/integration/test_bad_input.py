"""A hostile peer and a hostile HTTP client against real peers: every bad input is refused with its
code in the log, and the peer keeps serving."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import cbor2
import pytest
import trio

from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.errors import CODES
from mesh.gate import become_member
from mesh.identity import Identity
from mesh.transport import Transport
from mesh.wire import NODE_INFO, Hardware, NodeInfo, NodeStatus, encode_node_info, seal, seal_node_info

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")


def rejected_codes(peer: PeerProcess) -> set[str]:
    return {r["code"] for r in peer.log_records() if r.get("event") == "rejected"}


async def test_garbage_oversize_unsigned_and_forged_gossip_from_a_member(tmp_path: Path) -> None:
    """A closed mesh's gossip decoder is reached by members only: mallory joins with an invite, then sends."""
    mesh = LocalMesh(tmp_path, CONFIG, extra_args=("--benchmark-seconds", "0.05"))
    try:
        a, b = await trio.to_thread.run_sync(mesh.start_chain, 2)
        await trio.to_thread.run_sync(lambda: wait_for(lambda: agreed([a, b]), timeout=15, what="mesh"))
        token = await trio.to_thread.run_sync(mesh.invite, a)
        mallory = Identity.generate()
        forged_b = NodeInfo(node_id=b.node_id, incarnation=2**40, seq=1, status=NodeStatus.READY, version="x",
                            hardware=Hardware(cpu_cores=1, memory_gb=1, memory_free_gb=1))
        own = NodeInfo(node_id=mallory.node_id, incarnation=1, seq=1, status=NodeStatus.READY, version="x")
        future = cbor2.loads(encode_node_info(own)) | {"capability_schema_version": "9.9"}
        unsigned = cbor2.loads(seal_node_info(own, mallory))
        del unsigned["s"]
        wrong_sig = cbor2.loads(seal_node_info(own, mallory)) | {"s": bytes(64)}
        attacks = {
            "MALFORMED_MESSAGE": [b"\x00 plain garbage \xff", cbor2.dumps(unsigned)],
            "MESSAGE_TOO_LARGE": [b"\xa0" * (70 * 1024)],
            "BAD_SIGNATURE": [cbor2.dumps(wrong_sig)],
            "NODE_ID_CONFLICT": [seal_node_info(forged_b, mallory)],
            "INVALID_CAPABILITY_SCHEMA": [seal(NODE_INFO, cbor2.dumps(future), mallory)],
        }
        async with Transport.open(mallory, ["/ip4/127.0.0.1/tcp/0"]) as t:
            await become_member(t, token)  # a member: the gate lets its gossip through to the decoder
            await t.connect(a.addrs[0])
            async with t.subscribe("meshnode/v1/nodes"):
                await trio.sleep(2.5)  # let gossipsub graft us into a's mesh
                for _ in range(3):  # repeat: the first messages may race the subscription exchange
                    for payloads in attacks.values():
                        for data in payloads:
                            await t.publish("meshnode/v1/nodes", data)
                    await trio.sleep(0.5)
                    if set(attacks) <= rejected_codes(a):
                        break
        assert set(attacks) <= rejected_codes(a), rejected_codes(a)
        # Still serving: healthy, B still ready and unforged, and no bogus member got in.
        assert a.get("/api/health")["status"] == "ok"
        assert await trio.to_thread.run_sync(lambda: wait_for(lambda: agreed([a, b]), timeout=5, what="mesh"))
        ids = {n["node_id"] for n in a.get("/api/nodes")["nodes"]}
        assert ids == {a.node_id, b.node_id}
        row = next(n for n in a.get("/api/nodes")["nodes"] if n["node_id"] == b.node_id)
        assert row["version"] != "x"
    finally:
        await trio.to_thread.run_sync(mesh.close)


def _http(api: str, path: str, method: str = "GET", data: bytes = b"{") -> tuple[int, dict]:
    req = urllib.request.Request(api + path, method=method, data=data if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_garbage_to_the_http_api(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, CONFIG, extra_args=("--benchmark-seconds", "0.05")) as mesh:
        (a,) = mesh.start_chain(1)
        host, port = a.api.removeprefix("http://").split(":")
        for junk in [b"\x00\x01\x02garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"X" * 100_000]:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                try:
                    s.sendall(junk)
                    s.shutdown(socket.SHUT_WR)
                    s.recv(4096)
                except OSError:
                    pass  # the server may close on us; what matters is that it keeps serving
        status, body = _http(a.api, "/no/such/path")
        assert status == 404 and body["error"]["code"] == "NOT_FOUND" and body["error"]["message"]
        status, body = _http(a.api, "/api/node-health?node_id=12D3KooWnobody")
        assert status == 404 and body["error"]["code"] == "UNKNOWN_NODE"
        status, body = _http(a.api, "/api/nodes", method="POST")
        assert status == 405 and body["error"]["code"] == "METHOD_NOT_ALLOWED"
        # JSON bodies that are not JSON, not objects, or lack what the endpoint needs.
        for path, data, code in [
            ("/api/plan", b"{", "BAD_REQUEST"), ("/api/plan", b"[1]", "BAD_REQUEST"),
            ("/api/plan", b"{}", "MISSING_PARAMETER"), ("/api/transfers", b"\"x\"", "BAD_REQUEST"),
            ("/api/reassign-node", b'{"failed_nodes": "a"}', "MISSING_PARAMETER"),
            ("/api/reassign-node", b'{"failed_nodes": ["a"], "current_splits": 5, "model": "m"}',
             "MODEL_NOT_AVAILABLE"),
            ("/api/reassign-node", b'{"failed_nodes": ["a"], "request_id": 7}', "INVALID_PARAMETER"),
        ]:
            status, body = _http(a.api, path, method="POST", data=data)
            assert status == CODES[code].status and body["error"]["code"] == code, (path, data, body)
        status, body = _http(a.api, "/api/plan?model=nope")
        assert status == 404 and body["error"]["code"] == "NO_PLAN"
        status, body = _http(a.api, "/api/health")
        assert status == 200 and body["status"] == "ok"
        codes = {r.get("code") for r in a.log_records() if r.get("event") == "api_error"}
        assert {"NOT_FOUND", "UNKNOWN_NODE", "METHOD_NOT_ALLOWED"} <= codes

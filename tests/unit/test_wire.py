"""The wire codec: round trips, and every defect refused with its stable code."""

from __future__ import annotations

import cbor2
import pytest

from mesh.errors import PeerError
from mesh.identity import Identity, node_id_for_key
from mesh.wire import (
    MAX_GOSSIP_MESSAGE,
    NODE_INFO,
    Battery,
    GpuInfo,
    Hardware,
    NodeInfo,
    NodeStatus,
    encode_node_info,
    open_signed,
    seal,
    seal_node_info,
)

ME = Identity.from_seed(bytes(range(32)))


def info(**kw: object) -> NodeInfo:
    base = dict(
        node_id=ME.node_id,
        incarnation=1,
        seq=1,
        status=NodeStatus.READY,
        version="0.1.0",
        hardware=Hardware(
            gpus=(GpuInfo("H100", 80.0, 0.25),), cpu_cores=8, memory_gb=64.0, memory_free_gb=40.0,
            load=0.5, battery=Battery(80.0, False),
        ),
        compute_flops=1.5e11,
        installed_models=("smollm2-135m-instruct",),
        advanced_features={"kv_cache": True, "max_batch": 4},
        training={"is_running": True, "current_epoch": 45, "loss": 0.25},
        device={"platform": "windows", "arch": "x86_64"},
        memory_bandwidth=15.5e9,
        links={"12D3KooWpeerB": 0.42, "12D3KooWpeerC": 12.5},
        step_ms={"m@r:0:16:float32": 31.25},
        sessions={"m@r:0:16:float32": 3},
        layer_overhead_us={"float32": 317.5, "bfloat16": 410.0},
        kernel_bandwidth={"int4": 8.5e9, "int8": 1.02e10},
        addrs=("/ip4/127.0.0.1/tcp/4001/p2p/" + ME.node_id,),
        term=3,
        coordinator=ME.node_id,
    )
    base.update(kw)
    return NodeInfo(**base)  # type: ignore[arg-type]


def payload_dict(n: NodeInfo) -> dict:
    return cbor2.loads(encode_node_info(n))


def test_round_trip_is_exact() -> None:
    n = info()
    signed = open_signed(seal_node_info(n, ME))
    assert signed.message == n
    assert signed.public_key == ME.public_key


def test_node_id_is_the_libp2p_peer_id_of_the_key() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    kp = create_new_key_pair(ME.seed)
    assert ID.from_pubkey(kp.public_key).to_base58() == ME.node_id == node_id_for_key(ME.public_key)


def _code(data: bytes) -> str:
    with pytest.raises(PeerError) as err:
        open_signed(data)
    return err.value.code


def test_missing_schema_version_means_1_0() -> None:
    d = payload_dict(info())
    del d["capability_schema_version"]
    msg = open_signed(seal(NODE_INFO, cbor2.dumps(d), ME)).message
    assert msg.capability_schema_version == "1.0"


def test_unknown_schema_version_is_refused() -> None:
    d = payload_dict(info())
    d["capability_schema_version"] = "2.0"
    assert _code(seal(NODE_INFO, cbor2.dumps(d), ME)) == "INVALID_CAPABILITY_SCHEMA"


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xff\xff", b"garbage that is not cbor at all \x1f\x9f", cbor2.dumps([1, 2, 3]), cbor2.dumps("x")],
)
def test_garbage_is_malformed(data: bytes) -> None:
    assert _code(data) == "MALFORMED_MESSAGE"


def test_oversize_is_refused_before_decoding() -> None:
    assert _code(b"\x00" * (MAX_GOSSIP_MESSAGE + 1)) == "MESSAGE_TOO_LARGE"


def test_unsigned_and_wrongly_signed_are_refused() -> None:
    env = cbor2.loads(seal_node_info(info(), ME))
    env["s"] = bytes(64)
    assert _code(cbor2.dumps(env)) == "BAD_SIGNATURE"
    env = cbor2.loads(seal_node_info(info(), ME))
    del env["s"]
    assert _code(cbor2.dumps(env)) == "MALFORMED_MESSAGE"
    env = cbor2.loads(seal_node_info(info(), ME))
    env["p"] = env["p"][:-1] + bytes([env["p"][-1] ^ 1])  # one flipped bit in the payload
    assert _code(cbor2.dumps(env)) == "BAD_SIGNATURE"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", "1"),
        ("seq", True),
        ("status", "sleeping"),
        ("compute_flops", float("nan")),
        ("installed_models", [1, 2]),
        ("installed_models", ["m"] * 1000),
        ("hardware", {"gpus": []}),
        ("advanced_features", {"k": [1]}),
        ("training", {"loss": {"nested": 1}}),
        ("training", ["is_running"]),
        ("device", {"os": None}),
        ("node_id", "x" * 1000),
        ("memory_bandwidth", -1.0),
        ("memory_bandwidth", "fast"),
        ("links", {f"peer{i}": 1.0 for i in range(9)}),  # more than the nearest MAX_LINKS
        ("links", {"peer": -0.5}),
        ("links", {"peer": float("inf")}),
        ("links", {"peer": True}),
        ("links", {"peer": 1e9}),  # a round trip beyond a minute is not a link
        ("links", [["peer", 1.0]]),
        ("step_ms", {"m@r:0:16:float32": "fast"}),
        ("step_ms", {"k" * 1000: 1.0}),
        ("sessions", {"m@r:0:16:float32": -1}),
        ("sessions", {"m@r:0:16:float32": 1.5}),
        ("sessions", {"m@r:0:16:float32": True}),
        ("sessions", {"m@r:0:16:float32": 1 << 40}),
        ("layer_overhead_us", {"float32": -1.0}),
        ("layer_overhead_us", {f"dtype{i}": 1.0 for i in range(9)}),
        ("kernel_bandwidth", {"int4": -5.0}),
    ],
)
def test_wrong_types_are_refused_with_a_code(field: str, value: object) -> None:
    d = payload_dict(info())
    d[field] = value
    assert _code(seal(NODE_INFO, cbor2.dumps(d), ME)) == "MALFORMED_MESSAGE"


def test_unknown_kind_and_version() -> None:
    assert _code(seal("bogus", b"\xa0", ME)) == "UNKNOWN_MESSAGE_KIND"
    env = cbor2.loads(seal_node_info(info(), ME))
    env["v"] = 9
    assert _code(cbor2.dumps(env)) == "UNSUPPORTED_VERSION"


def test_identity_file_is_created_once_then_reused(tmp_path) -> None:
    import stat

    from mesh.errors import IdentityError
    from mesh.keyfile import IDENTITY_FILE, load_or_create

    first = load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / IDENTITY_FILE).stat().st_mode) == 0o600
    assert load_or_create(tmp_path).node_id == first.node_id
    (tmp_path / IDENTITY_FILE).write_text("not a key")
    with pytest.raises(IdentityError):
        load_or_create(tmp_path)

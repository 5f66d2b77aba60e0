"""Every message that crosses the wire, and its strict, bounded CBOR codec.

Messages are frozen, slotted dataclasses. Each travels inside a signed ``Envelope``: the CBOR payload,
the signer's raw ed25519 public key and a signature over a domain-separated copy of the payload. Decoding
checks the size before CBOR sees a byte, verifies the signature, and then validates every field's type;
any failure raises a ``PeerError`` subclass with a stable code and nothing else happens.

This module imports no I/O: the gossip driver, the simulator and the tests share it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cbor2

from mesh.errors import DecodeError, OversizeError, SchemaVersionError
from mesh.identity import Identity, verify
from mesh.ids import NodeId

#: Topics (gossipsub). Coordinator claims ride inside NodeInfo heartbeats (see docs/ARCHITECTURE.md).
NODES_TOPIC = "meshnode/v1/nodes"
PLANS_TOPIC = "meshnode/v1/plans"

#: A NodeInfo is about 1 KiB; 64 KiB leaves room for long model lists and stays far below gossipsub's
#: own 1 MiB frame limit, so one bad peer cannot make us parse megabytes per heartbeat.
MAX_GOSSIP_MESSAGE = 64 * 1024
MAX_STR = 256  # node names, model ids, addresses, feature names
MAX_LIST = 256  # gpus, addresses, models, features: a real node has a handful
#: A peer gossips the round-trip times to its nearest this many peers (the planner's link matrix).
MAX_LINKS = 8
#: The longest round trip a link may claim, ms (a minute: anything slower is not a link to plan over).
MAX_RTT_MS = 60_000.0
MAX_SESSIONS = 1 << 20  # a stage's sessions, as gossiped (far above any real table)
ENVELOPE_VERSION = 1
SUPPORTED_CAPABILITY_SCHEMAS = frozenset({"1.0"})
DEFAULT_CAPABILITY_SCHEMA = "1.0"
_SIGNING_DOMAIN = b"meshnode/envelope/v1\x00"


class NodeStatus(enum.StrEnum):
    """A peer's lifecycle. Transitions are listed in ``mesh.membership.SELF_TRANSITIONS``."""

    REGISTERING = "registering"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    memory_gb: float
    usage: float  # fraction of memory in use, 0..1


@dataclass(frozen=True, slots=True)
class Battery:
    level: float  # percent, 0..100
    charging: bool


@dataclass(frozen=True, slots=True)
class Hardware:
    gpus: tuple[GpuInfo, ...] = ()
    cpu_cores: int = 1
    memory_gb: float = 0.0
    memory_free_gb: float = 0.0
    load: float = 0.0  # 1-minute load average divided by cpu_cores
    battery: Battery | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The heartbeat every peer publishes on NODES_TOPIC (default once a second)."""

    node_id: NodeId
    incarnation: int  # start time in ms: a restarted peer has a higher one
    seq: int  # per-incarnation counter: (incarnation, seq) orders a peer's heartbeats
    status: NodeStatus
    version: str
    name: str = ""
    capability_schema_version: str = DEFAULT_CAPABILITY_SCHEMA
    hardware: Hardware = field(default_factory=Hardware)
    compute_flops: float = 0.0  # measured by a short matmul benchmark at start
    memory_bandwidth: float = 0.0  # bytes/s, measured by a short matrix-vector benchmark at start (0: unknown)
    layer_memory_bytes: int = 0  # memory offered for model layers (weights + KV cache)
    installed_models: tuple[str, ...] = ()
    serve_models: tuple[str, ...] = ()  # models this peer asks the mesh to serve ("id" or "id@revision")
    stages: tuple[str, ...] = ()  # pipeline stages loaded and ready here: "model@revision:start:end"
    accept_public_jobs: bool = True
    features_supported: tuple[str, ...] = ()
    advanced_features: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    addrs: tuple[str, ...] = ()  # full multiaddrs with /p2p/<node_id>
    api: str = ""  # host:port of the local HTTP API, informational
    term: int = 0  # the election term this peer follows
    coordinator: NodeId | None = None  # whom it follows; == node_id means it claims the term
    # What the device's own app reported of a training run (the seeds' training_status): is_running,
    # current_epoch, total_epochs, accuracy, loss, samples_processed. Empty when nothing was reported.
    training: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    # What the device's own app reported about itself (the seeds' DeviceInfoPayload metadata): platform,
    # app_version, os, arch, family. Empty when nothing was reported.
    device: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    # Round-trip times (ms, smoothed) to the nearest MAX_LINKS peers it pings: node id -> ms.
    links: Mapping[str, float] = field(default_factory=dict)
    # Measured decode step time (ms, smoothed) of each ready stage here: stage key (as in ``stages``) -> ms.
    step_ms: Mapping[str, float] = field(default_factory=dict)
    # Sessions each ready stage here is serving (a step within the last few seconds): stage key -> count.
    # With ``step_ms``, what drivers route new requests by (the least loaded pipeline).
    sessions: Mapping[str, int] = field(default_factory=dict)
    # Measured per-token dispatch time of one transformer block, µs, per compute dtype ("float32", ...).
    layer_overhead_us: Mapping[str, float] = field(default_factory=dict)
    # Measured bytes/s of each batch-1 weight kernel ("float32", "bfloat16", "int8", "int4").
    kernel_bandwidth: Mapping[str, float] = field(default_factory=dict)

    @property
    def claims_coordinator(self) -> bool:
        return self.coordinator == self.node_id


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: str
    payload: bytes
    public_key: bytes
    signature: bytes


def _signing_bytes(kind: str, payload: bytes) -> bytes:
    return _SIGNING_DOMAIN + kind.encode() + b"\x00" + payload


def seal(kind: str, payload: bytes, identity: Identity) -> bytes:
    """Sign ``payload`` and wrap it in an envelope, ready to publish."""
    env = {
        "v": ENVELOPE_VERSION,
        "t": kind,
        "p": payload,
        "k": identity.public_key,
        "s": identity.sign(_signing_bytes(kind, payload)),
    }
    return cbor2.dumps(env)


def loads_cbor(data: bytes, limit: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise OversizeError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return cbor2.loads(bytes(data))
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"not valid CBOR: {exc}") from None


def versioned(payload: bytes, what: str, version: int, *, key: str = "version",
              limit: int = MAX_GOSSIP_MESSAGE) -> Reader:
    """A Reader over a CBOR map of at most ``limit`` bytes whose ``key`` must be ``version``
    (MALFORMED_MESSAGE, MESSAGE_TOO_LARGE, UNSUPPORTED_VERSION otherwise)."""
    r = Reader(loads_cbor(payload, limit), what)
    found = r.integer(key)
    if found != version:
        raise DecodeError(f"{what} version {found} is not supported", code="UNSUPPORTED_VERSION")
    return r


def open_envelope(data: bytes, *, limit: int = MAX_GOSSIP_MESSAGE) -> Envelope:
    """Decode and verify an envelope. Raises DecodeError, OversizeError or SignatureError."""
    raw = loads_cbor(data, limit)
    r = Reader(raw, "envelope")
    version = r.integer("v")
    if version != ENVELOPE_VERSION:
        raise DecodeError(f"unknown envelope version {version}", code="UNSUPPORTED_VERSION")
    env = Envelope(kind=r.text("t"), payload=r.blob("p"), public_key=r.blob("k"), signature=r.blob("s"))
    verify(env.public_key, env.signature, _signing_bytes(env.kind, env.payload))
    return env


# ---- typed field reading -------------------------------------------------------------------------

T = TypeVar("T")
_REQUIRED: Any = object()


class Reader:
    """Reads typed fields out of a decoded CBOR map; every mismatch is a DecodeError naming the field.
    A field without a default is required."""

    __slots__ = ("_d", "_where")

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise DecodeError(f"{where}: expected a map, got {type(raw).__name__}")
        self._d = raw
        self._where = where

    def _get(self, key: str, default: Any) -> Any:
        if key in self._d:
            return self._d[key]
        if default is _REQUIRED:
            raise DecodeError(f"{self._where}: missing field {key!r}")
        return default

    def _fail(self, key: str, want: str, got: Any) -> DecodeError:
        return DecodeError(f"{self._where}.{key}: expected {want}, got {type(got).__name__}")

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._fail(key, "text", v)
        if len(v) > MAX_STR:
            raise DecodeError(f"{self._where}.{key}: text longer than {MAX_STR}")
        return v

    def opt_text(self, key: str) -> str | None:
        return None if self._get(key, None) is None else self.text(key)

    def blob(self, key: str) -> bytes:
        v = self._get(key, _REQUIRED)
        if not isinstance(v, bytes):
            raise self._fail(key, "bytes", v)
        return v

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, "integer", v)
        if not -(2**63) <= v < 2**63:
            raise DecodeError(f"{self._where}.{key}: integer out of range")
        return v

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._fail(key, "number", v)
        try:
            v = float(v)  # a CBOR bignum overflows here
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise DecodeError(f"{self._where}.{key}: number is not finite")
        return v

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._fail(key, "boolean", v)
        return v

    def array(self, key: str, item: Callable[[Any, str], T], *, limit: int = MAX_LIST,
              required: bool = False) -> tuple[T, ...]:
        """Each entry through ``item(value, where)``; at most ``limit`` entries; absent means empty
        unless ``required``."""
        v = self._get(key, _REQUIRED if required else [])
        if not isinstance(v, list):
            raise self._fail(key, "array", v)
        if len(v) > limit:
            raise DecodeError(f"{self._where}.{key}: at most {limit} entries, got {len(v)}")
        return tuple(item(x, f"{self._where}.{key}[{i}]") for i, x in enumerate(v))

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default)

    @property
    def fields(self) -> dict[Any, Any]:
        """The whole decoded map, unchecked."""
        return self._d


def _text_item(x: Any, where: str) -> str:
    if not isinstance(x, str) or len(x) > MAX_STR:
        raise DecodeError(f"{where}: expected text of at most {MAX_STR} characters")
    return x


def scalar_map(raw: Any, where: str) -> dict[str, str | int | float | bool]:
    if not isinstance(raw, dict) or len(raw) > MAX_LIST:
        raise DecodeError(f"{where}: expected a map of at most {MAX_LIST} entries")
    out: dict[str, str | int | float | bool] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_STR:
            raise DecodeError(f"{where}: keys must be short text")
        if not isinstance(v, str | int | float | bool) or (isinstance(v, str) and len(v) > MAX_STR):
            raise DecodeError(f"{where}.{k}: values must be text, numbers or booleans")
        out[k] = v
    return out


def _ms_map(raw: Any, where: str, limit: int, top: float) -> dict[str, float]:
    """text -> milliseconds in [0, top], at most ``limit`` entries."""
    if not isinstance(raw, dict) or len(raw) > limit:
        raise DecodeError(f"{where}: expected a map of at most {limit} entries")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_STR:
            raise DecodeError(f"{where}: keys must be short text")
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= top:
            raise DecodeError(f"{where}.{k}: expected milliseconds in [0, {top:g}], got {v!r}")
        out[k] = float(v)
    return out


def _count_map(raw: Any, where: str, limit: int, top: int) -> dict[str, int]:
    """text -> a whole number in [0, top], at most ``limit`` entries."""
    if not isinstance(raw, dict) or len(raw) > limit:
        raise DecodeError(f"{where}: expected a map of at most {limit} entries")
    out: dict[str, int] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or len(k) > MAX_STR:
            raise DecodeError(f"{where}: keys must be short text")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
            raise DecodeError(f"{where}.{k}: expected a whole number in [0, {top}], got {v!r}")
        out[k] = v
    return out


def _gpu(raw: Any, where: str) -> GpuInfo:
    r = Reader(raw, where)
    return GpuInfo(name=r.text("name"), memory_gb=r.number("memory_gb"), usage=r.number("usage", 0.0))


def _hardware(raw: Any, where: str) -> Hardware:
    r = Reader(raw, where)
    battery = None
    if (raw_battery := r.raw("battery", None)) is not None:
        b = Reader(raw_battery, f"{where}.battery")
        battery = Battery(level=b.number("level"), charging=b.flag("charging"))
    return Hardware(
        gpus=r.array("gpus", _gpu),
        cpu_cores=r.integer("cpu_cores"),
        memory_gb=r.number("memory_gb"),
        memory_free_gb=r.number("memory_free_gb"),
        load=r.number("load", 0.0),
        battery=battery,
    )


# ---- NodeInfo ------------------------------------------------------------------------------------

NODE_INFO = "node_info"


def encode_node_info(info: NodeInfo) -> bytes:
    hw = info.hardware
    return cbor2.dumps(
        {
            "node_id": info.node_id,
            "capability_schema_version": info.capability_schema_version,
            "incarnation": info.incarnation,
            "seq": info.seq,
            "status": info.status.value,
            "version": info.version,
            "name": info.name,
            "hardware": {
                "gpus": [{"name": g.name, "memory_gb": g.memory_gb, "usage": g.usage} for g in hw.gpus],
                "cpu_cores": hw.cpu_cores,
                "memory_gb": hw.memory_gb,
                "memory_free_gb": hw.memory_free_gb,
                "load": hw.load,
                "battery": None
                if hw.battery is None
                else {"level": hw.battery.level, "charging": hw.battery.charging},
            },
            "compute_flops": info.compute_flops,
            "memory_bandwidth": info.memory_bandwidth,
            "layer_memory_bytes": info.layer_memory_bytes,
            "installed_models": list(info.installed_models),
            "serve_models": list(info.serve_models),
            "stages": list(info.stages),
            "accept_public_jobs": info.accept_public_jobs,
            "features_supported": list(info.features_supported),
            "advanced_features": dict(info.advanced_features),
            "addrs": list(info.addrs),
            "api": info.api,
            "term": info.term,
            "coordinator": info.coordinator,
            "training": dict(info.training),
            "device": dict(info.device),
            "links": dict(info.links),
            "step_ms": dict(info.step_ms),
            "sessions": dict(info.sessions),
            "layer_overhead_us": dict(info.layer_overhead_us),
            "kernel_bandwidth": dict(info.kernel_bandwidth),
        }
    )


def decode_node_info(payload: bytes) -> NodeInfo:
    """Validate a NodeInfo payload. An unknown capability_schema_version is refused before anything
    else is read (its shape may differ); a missing one means "1.0"."""
    r = Reader(loads_cbor(payload, MAX_GOSSIP_MESSAGE), NODE_INFO)
    schema = r.text("capability_schema_version", DEFAULT_CAPABILITY_SCHEMA)
    if schema not in SUPPORTED_CAPABILITY_SCHEMAS:
        raise SchemaVersionError(
            f"capability_schema_version {schema!r} is not one of {sorted(SUPPORTED_CAPABILITY_SCHEMAS)}"
        )
    status_text = r.text("status")
    try:
        status = NodeStatus(status_text)
    except ValueError:
        raise DecodeError(f"node_info.status: unknown status {status_text!r}") from None
    coordinator = r.opt_text("coordinator")
    layer_memory = r.integer("layer_memory_bytes", 0)
    if layer_memory < 0:
        raise DecodeError("node_info.layer_memory_bytes: must not be negative")
    bandwidth = r.number("memory_bandwidth", 0.0)
    if bandwidth < 0:
        raise DecodeError("node_info.memory_bandwidth: must not be negative")
    return NodeInfo(
        node_id=NodeId(r.text("node_id")),
        capability_schema_version=schema,
        incarnation=r.integer("incarnation"),
        seq=r.integer("seq"),
        status=status,
        version=r.text("version"),
        name=r.text("name", ""),
        hardware=_hardware(r.raw("hardware"), "node_info.hardware"),
        compute_flops=r.number("compute_flops", 0.0),
        memory_bandwidth=bandwidth,
        layer_memory_bytes=layer_memory,
        installed_models=r.array("installed_models", _text_item),
        serve_models=r.array("serve_models", _text_item),
        stages=r.array("stages", _text_item),
        accept_public_jobs=r.flag("accept_public_jobs", True),
        features_supported=r.array("features_supported", _text_item),
        advanced_features=scalar_map(r.raw("advanced_features", {}), "node_info.advanced_features"),
        addrs=r.array("addrs", _text_item),
        api=r.text("api", ""),
        term=r.integer("term", 0),
        coordinator=None if coordinator is None else NodeId(coordinator),
        training=scalar_map(r.raw("training", {}), "node_info.training"),
        device=scalar_map(r.raw("device", {}), "node_info.device"),
        links=_ms_map(r.raw("links", {}), "node_info.links", MAX_LINKS, MAX_RTT_MS),
        step_ms=_ms_map(r.raw("step_ms", {}), "node_info.step_ms", MAX_LIST, MAX_RTT_MS),
        sessions=_count_map(r.raw("sessions", {}), "node_info.sessions", MAX_LIST, MAX_SESSIONS),
        layer_overhead_us=_ms_map(r.raw("layer_overhead_us", {}), "node_info.layer_overhead_us", 8, 1e6),
        kernel_bandwidth=_ms_map(r.raw("kernel_bandwidth", {}), "node_info.kernel_bandwidth", 8, 1e15),
    )


@dataclass(frozen=True, slots=True)
class Signed:
    """A verified message and the key that signed it."""

    message: NodeInfo
    public_key: bytes


_DECODERS: dict[str, Callable[[bytes], NodeInfo]] = {NODE_INFO: decode_node_info}


def seal_node_info(info: NodeInfo, identity: Identity) -> bytes:
    return seal(NODE_INFO, encode_node_info(info), identity)


def open_signed(data: bytes, *, limit: int = MAX_GOSSIP_MESSAGE) -> Signed:
    """Envelope → verified, typed message. Raises a PeerError subclass with a code on any defect."""
    env = open_envelope(data, limit=limit)
    decoder = _DECODERS.get(env.kind)
    if decoder is None:
        raise DecodeError(f"unknown message kind {env.kind!r}", code="UNKNOWN_MESSAGE_KIND")
    return Signed(decoder(env.payload), env.public_key)

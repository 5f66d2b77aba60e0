"""One frozen config tree: built-in defaults < a TOML file < command-line flags.

Every option is declared once in ``OPTIONS``: its config key (``section.key``), its CLI flag, its type
and its help. The CLI builds its flags from that table, so a key without a flag cannot exist.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.membership import MembershipConfig

#: The environment variable that sets ``api.token`` (over the file, under ``--api-token``).
TOKEN_ENV = "MESHNODE_API_TOKEN"
#: What an API token may hold: printable ASCII without spaces, so it travels in one header unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def valid_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = ""  # a human name shown in `meshnode status`; the node id stays the key's peer id
    data_dir: str = "~/.meshnode"  # identity key and (later) models live here
    accept_public_jobs: bool = True  # whether the coordinator may give this peer work
    min_free_memory_gb: float = 0.25  # below this the peer reports itself degraded
    benchmark_seconds: float = 0.3  # length of the start-up matmul benchmark (the compute score)
    # The compute score to advertise, GFLOP/s, instead of measuring one (0: measure). Pins a peer's share of
    # the layers where a benchmark is noisy (a busy machine, tests that need a given split).
    compute_gflops: float = 0.0
    # The memory bandwidth to advertise, GB/s, instead of measuring it (0: measure, for benchmark_seconds).
    memory_bandwidth_gbps: float = 0.0
    drain_seconds: float = 2.0  # how long a draining peer keeps announcing itself before going offline
    # Memory this peer offers for model layers (weights + KV cache), MiB; 0: what is available at start
    # less min_free_memory_gb.
    max_layer_memory_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True  # LAN discovery; binds UDP 5353 on every interface
    peer_exchange: bool = True  # dial members learned from gossip
    loopback_only: bool = False  # dial loopback addresses only (local meshes, tests)
    dial_interval: float = 2.0  # seconds between rounds of (re)dialing bootstrap peers and members
    open: bool = False  # an open mesh: no admission (anyone who can reach a peer takes part)
    join: str = ""  # an invite token to join a closed mesh with (``meshnode invite``)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = "127.0.0.1:8470"  # "" turns the HTTP API off
    # Every endpoint but GET /api/health then wants "Authorization: Bearer <token>". "" on a loopback bind:
    # the API is open; "" on any other bind: the peer uses (or creates) <data_dir>/api-token.
    token: str = ""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    json: bool = False  # one JSON object per line


@dataclass(frozen=True, slots=True)
class StorageConfig:
    parallel_downloads: int = 3  # shards fetched at once from peers
    retries: int = 3  # rounds over every holder of a shard, with exponential backoff, before giving up
    upload_limit_mb_s: float = 0.0  # serving shards to peers, MB/s (0: unlimited)
    download_limit_mb_s: float = 0.0  # fetching shards from peers, MB/s (0: unlimited)
    manifest_cache_ttl: float = 300.0  # seconds a manifest learned from a holder is used before asking again
    task_lock_timeout: float = 1800.0  # a model version being added or fetched: another process may take it after
    file_lock_timeout: float = 300.0  # one file being fetched (renewed while its bytes arrive)
    stale_lock_age: float = 3600.0  # lock files older than this are removed when the store opens


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    models: tuple[str, ...] = ()  # "id" or "id@revision": models the coordinator keeps a plan for
    hop_ms: float = 1.0  # cost of one activation hop between stages, per token (planner link cost)
    context_tokens: int = 2048  # KV cache every stage must have room for; FLOPs counted at this context
    reassign_threshold: float = 0.25  # bottleneck growth a reassignment may cause before a full replan
    republish_interval: float = 2.0  # seconds between republishing the current plans (late joiners)
    # What a plan minimises: "latency" (one token's time: every stage and every hop; one user's chat) or
    # "throughput" (the slowest stage: a full pipeline of concurrent sessions).
    objective: str = "latency"
    # Seconds between rounds of pinging peers (the measured link matrix); 0: no pings, every hop costs hop_ms.
    link_interval: float = 5.0
    # Pipelines per model: "1" (no replica), "N", or "auto" (another on the peers left while one fits and is
    # within 2x the first's cost); drivers spread sessions over them and fail over to one at once.
    replicas: str = "1"


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    serve: tuple[str, ...] = ()  # models ("id" or "id@revision") this peer asks the mesh to serve
    max_sessions: int = 64  # generations a stage runs at once; more are refused (TOO_MANY_SESSIONS)
    # Back-pressure at a driver: generations it runs at once on one model's pipeline; more wait in a queue of
    # at most max_queued_requests; past that a request is refused at once (429 MESH_BUSY, Retry-After).
    max_pipeline_sessions: int = 8
    max_queued_requests: int = 32
    session_idle_timeout: float = 120.0  # a stage frees a session's KV cache after this much silence
    step_timeout: float = 60.0  # the driver's wait for one step's token before it gives up on the route
    recovery_timeout: float = 60.0  # how long a generation waits for a working route after a failure
    # The compute dtype of the plans this peer makes as coordinator: "auto" (bf16 for compact weights when
    # every peer does bf16 arithmetic, fp32 otherwise), "float32" or "bfloat16".
    compute_dtype: str = "auto"


@dataclass(frozen=True, slots=True)
class DemoConfig:
    peers: int = 3  # how many local peers `meshnode demo` starts


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)  # timings and require_gpu
    api: ApiConfig = field(default_factory=ApiConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir).expanduser()


@dataclass(frozen=True, slots=True)
class Option:
    key: str  # "section.field"
    flag: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("node.name", "--name", "human-readable peer name"),
    Option("node.data_dir", "--data-dir", "directory for the identity key and models"),
    Option("node.accept_public_jobs", "--accept-public-jobs", "let the coordinator give this peer work"),
    Option("node.min_free_memory_gb", "--min-free-memory-gb", "report degraded below this free memory"),
    Option("node.benchmark_seconds", "--benchmark-seconds", "length of the start-up compute benchmark"),
    Option("node.compute_gflops", "--compute-gflops", "advertise this compute score (GFLOP/s) instead of measuring"),
    Option("node.memory_bandwidth_gbps", "--memory-bandwidth-gbps",
           "advertise this memory bandwidth (GB/s) instead of measuring"),
    Option("node.drain_seconds", "--drain-seconds", "seconds announced as draining before going offline"),
    Option("node.max_layer_memory_mb", "--max-layer-memory-mb",
           "MiB offered for model layers (0: available memory at start)"),
    Option("network.listen", "--listen", "multiaddr to listen on (repeatable)"),
    Option("network.bootstrap", "--bootstrap",
           "full multiaddr of a peer to join through, or an invite token (repeatable)"),
    Option("network.join", "--join", "invite token of a closed mesh to join (meshnode invite prints one)"),
    Option("network.open", "--open", "run an open mesh: no invites, anyone who reaches a peer takes part"),
    Option("network.mdns", "--mdns", "discover peers on the LAN with mDNS"),
    Option("network.peer_exchange", "--peer-exchange", "dial members learned from gossip"),
    Option("network.loopback_only", "--loopback-only", "dial loopback addresses only"),
    Option("network.dial_interval", "--dial-interval", "seconds between redial rounds"),
    Option("membership.heartbeat_interval", "--heartbeat-interval", "seconds between heartbeats"),
    Option("membership.suspect_after", "--suspect-after", "silence (s) before a peer is degraded"),
    Option("membership.offline_after", "--offline-after", "silence (s) before a peer is offline"),
    Option("membership.registering_for", "--registering-for", "seconds in registering after start"),
    Option("membership.forget_after", "--forget-after", "seconds before an offline peer is forgotten"),
    Option("membership.require_gpu", "--require-gpu", "only peers with a GPU may coordinate or serve"),
    Option("api.listen", "--api", "host:port of the local HTTP API ('' to disable)"),
    Option("api.token", "--api-token",
           f"token the HTTP API asks for (Authorization: Bearer TOKEN; default ${TOKEN_ENV})"),
    Option("storage.parallel_downloads", "--parallel-downloads", "shards fetched at once from peers"),
    Option("storage.retries", "--download-retries", "rounds over every holder of a shard before giving up"),
    Option("storage.upload_limit_mb_s", "--upload-limit", "MB/s when serving shards to peers (0: unlimited)"),
    Option("storage.download_limit_mb_s", "--download-limit", "MB/s when fetching shards (0: unlimited)"),
    Option("storage.manifest_cache_ttl", "--manifest-cache-ttl",
           "seconds a manifest learned from a holder is used before it is asked for again"),
    Option("storage.task_lock_timeout", "--task-lock-timeout",
           "seconds a model's add or fetch lock holds before another process may take it over"),
    Option("storage.file_lock_timeout", "--file-lock-timeout",
           "seconds a file's fetch lock holds without progress before another process may take it over"),
    Option("storage.stale_lock_age", "--stale-lock-age", "lock files older than this (s) are removed at start"),
    Option("coordinator.models", "--plan-model", "model (id or id@revision) to keep a plan for (repeatable)"),
    Option("coordinator.hop_ms", "--hop-ms", "planner cost of one activation hop between stages, ms per token"),
    Option("coordinator.context_tokens", "--context-tokens", "context every stage's KV cache must hold"),
    Option("coordinator.reassign_threshold", "--reassign-threshold",
           "bottleneck growth a reassignment may cause before a full replan (0.25: 25%%)"),
    Option("coordinator.republish_interval", "--republish-interval", "seconds between plan republishes"),
    Option("coordinator.objective", "--objective",
           "what plans minimise: latency (one token's time) or throughput (the slowest stage)"),
    Option("coordinator.link_interval", "--link-interval",
           "seconds between rounds of pinging peers (0: no link measurement; hops cost --hop-ms)"),
    Option("coordinator.replicas", "--replicas", "pipelines per model: 1, N or auto (as many as fit)"),
    Option("inference.serve", "--serve", "model (id or id@revision) to ask the mesh to serve (repeatable)"),
    Option("inference.max_sessions", "--max-sessions", "generations one stage runs at once"),
    Option("inference.session_idle_timeout", "--session-idle-timeout",
           "seconds of silence before a stage frees a session's KV cache"),
    Option("inference.step_timeout", "--step-timeout", "seconds the driver waits for one token"),
    Option("inference.max_pipeline_sessions", "--max-pipeline-sessions",
           "generations this peer drives at once on one model's pipeline (more wait in the queue)"),
    Option("inference.max_queued_requests", "--max-queued-requests",
           "requests that may wait for a pipeline slot; more are refused with 429 MESH_BUSY"),
    Option("inference.recovery_timeout", "--recovery-timeout",
           "seconds a generation waits for a working route after a stage fails"),
    Option("inference.compute_dtype", "--compute-dtype",
           "compute dtype of the plans this peer makes: auto, float32 or bfloat16"),
    Option("log.level", "--log-level", "debug, info, warning or error"),
    Option("log.json", "--log-json", "log one JSON object per line"),
    Option("demo.peers", "--peers", "number of local peers for `meshnode demo`"),
)


def _field_type(key: str) -> Any:
    section, name = key.split(".")
    section_cls = {f.name: f.default_factory for f in fields(Config)}[section]  # type: ignore[misc]
    default = getattr(section_cls(), name)
    return type(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; unset flags stay None so the file and defaults show through."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    for opt in OPTIONS:
        kind = _field_type(opt.key)
        dest = opt.key.replace(".", "__")
        if kind is bool:
            parser.add_argument(opt.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=opt.help)
        elif kind is tuple:
            parser.add_argument(opt.flag, dest=dest, action="append", default=None, help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=dest, type=kind, default=None, help=opt.help)


def _coerce(key: str, value: Any) -> Any:
    kind = _field_type(key)
    if kind is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _apply(config: Config, values: dict[str, Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = _coerce(key, value)
    for section, changes in sections.items():
        config = replace(config, **{section: replace(getattr(config, section), **changes)})
    return config


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config into ``{"section.key": value}``; unknown sections or keys are errors."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    known = {opt.key for opt in OPTIONS}
    flat: dict[str, Any] = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in known:
                raise ConfigError(f"{path}: unknown option {key!r}")
            flat[key] = value
    return flat


def build(args: argparse.Namespace | None = None, file: str | Path | None = None,
          environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file (``--config`` or ``file``), then the environment (``environ``: only
    ``MESHNODE_API_TOKEN``; the CLI passes ``os.environ``), then flags that were given."""
    path = file if file is not None else getattr(args, "config", None)
    values = load_file(path) if path else {}
    if environ is not None and environ.get(TOKEN_ENV):
        values["api.token"] = environ[TOKEN_ENV]
    if args is not None:
        for opt in OPTIONS:
            value = getattr(args, opt.key.replace(".", "__"), None)
            if value is not None:
                values[opt.key] = value
    try:  # sections validate themselves when built (MembershipConfig checks its timings)
        config = _apply(Config(), values)
        validate(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config


def validate(config: Config) -> None:
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(f"log.level: unknown level {config.log.level!r}")
    if not config.network.listen:
        raise ValueError("network.listen: at least one address is needed")
    st = config.storage
    if st.parallel_downloads < 1 or st.retries < 1:
        raise ValueError("storage.parallel_downloads and storage.retries must be at least 1")
    if st.upload_limit_mb_s < 0 or st.download_limit_mb_s < 0:
        raise ValueError("storage rate limits must not be negative (0 means unlimited)")
    if st.manifest_cache_ttl < 0:
        raise ValueError("storage.manifest_cache_ttl must not be negative (0: never cached)")
    if min(st.task_lock_timeout, st.file_lock_timeout, st.stale_lock_age) <= 0:
        raise ValueError("storage.task_lock_timeout, file_lock_timeout and stale_lock_age must be positive")
    if st.stale_lock_age < max(st.task_lock_timeout, st.file_lock_timeout):
        raise ValueError("storage.stale_lock_age must be at least the lock timeouts (a live lock is never stale)")
    co = config.coordinator
    if co.hop_ms < 0 or co.context_tokens < 1 or co.reassign_threshold < 0 or co.republish_interval <= 0:
        raise ValueError("coordinator: hop_ms and reassign_threshold must not be negative, context_tokens and "
                         "republish_interval must be positive")
    if co.objective not in ("latency", "throughput"):
        raise ValueError(f"coordinator.objective: latency or throughput, not {co.objective!r}")
    if co.link_interval < 0:
        raise ValueError("coordinator.link_interval must not be negative (0 turns link measurement off)")
    if not (co.replicas == "auto" or (co.replicas.isdigit() and int(co.replicas) >= 1)):
        raise ValueError(f"coordinator.replicas: auto or a whole number >= 1, not {co.replicas!r}")
    nd = config.node
    if nd.max_layer_memory_mb < 0 or nd.compute_gflops < 0 or nd.memory_bandwidth_gbps < 0:
        raise ValueError("node.max_layer_memory_mb, node.compute_gflops and node.memory_bandwidth_gbps must not "
                         "be negative (0: measured)")
    inf = config.inference
    if inf.max_sessions < 1 or min(inf.session_idle_timeout, inf.step_timeout, inf.recovery_timeout) <= 0:
        raise ValueError("inference: max_sessions must be at least 1 and its timeouts positive")
    if inf.max_pipeline_sessions < 1 or inf.max_queued_requests < 0:
        raise ValueError("inference: max_pipeline_sessions must be at least 1, max_queued_requests not negative")
    if inf.compute_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"inference.compute_dtype: auto, float32 or bfloat16, not {inf.compute_dtype!r}")
    if config.demo.peers < 1:
        raise ValueError("demo.peers must be at least 1")
    if config.api.token and not valid_token(config.api.token):
        raise ValueError("api.token: printable ASCII without spaces (it travels as Authorization: Bearer TOKEN)")


def is_loopback_bind(listen: str) -> bool:
    """Whether an ``api.listen`` (``host:port``, ``[v6]:port``, ``unix:PATH``) is reachable from this machine
    only: 127.0.0.0/8, ::1, ``localhost`` or a unix socket. Any other name, and an empty host (every
    interface), counts as reachable from elsewhere."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

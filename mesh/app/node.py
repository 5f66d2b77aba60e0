"""The composition root: one peer, one root nursery. ``Node`` builds every service from narrow parts (a
membership view, streams and gossip, the plan book, the model library, a clock, a signer, an executor),
wires what one must tell another as callbacks, and drives the pure peer core with time. Nothing imports
this package; ``mesh.app.main`` runs a peer on libp2p, ``mesh.app.inproc`` runs many on the memory twin.

Tasks (all children of one nursery, none fire-and-forget):
    heartbeats  - publish this peer's signed NodeInfo every heartbeat_interval (never blocked by a peer)
    receive     - feed gossip to the core; rejections logged with their code, never raised
    ticks       - failure detection, lifecycle and election, four times per heartbeat
    dialer      - (re)dial bootstrap peers and members learned from gossip (peer exchange), mDNS finds
    reaper      - close the connection of a member that fell silent (libp2p never notices a frozen peer)
    links       - ping a few connected members each link_interval: the smoothed RTTs its heartbeat
                  carries (the nearest ``MAX_LINKS``), from which the coordinator plans
    library     - model fetches started through the API (``Library.start_fetch``), in their own nursery
    stages      - the stages this peer runs (``inference.host.StageHost``); activation streams are routed
                  to it, and results for this peer's generations from it to the ``Driver``
    plans       - signed plans from the plans topic; while coordinating, planning and reassignment
                  (``coordinator.service.PlanService``)
    api         - the local HTTP API (started by ``mesh.app.main``)
    lifecycle   - drain on request or signal: draining for drain_seconds, then a goodbye, then exit
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import psutil
import trio

from coordinator.service import MAX_SUSPECT_REPORT, SUSPECT_PROTOCOL, PlanService
from inference.driver import Driver
from inference.host import StageHost
from inference.protocol import ACTIVATIONS_PROTOCOL
from inference.results import Results
from mesh import credential, hardware
from mesh.config import Config
from mesh.credential import Membership
from mesh.errors import MeshError, NotFoundError, PeerError
from mesh.gate import ADMIT_PROTOCOL, MEMBERS_TOPIC, Gate, refusal
from mesh.identity import Identity, node_id_for_key
from mesh.ids import ModelRef, NodeId, keep_ref
from mesh.links import LinkTable
from mesh.logs import Throttle
from mesh.membership import Forgotten, Member, StatusChanged
from mesh.peer import LeaderChanged, PeerCore, PeerEvent
from mesh.ports import Network, Offload, abandoning, threads
from mesh.tally import Tally
from mesh.transport import GossipMessage, is_loopback_addr, peer_id_of
from mesh.wire import NODES_TOPIC, PLANS_TOPIC, Battery, GpuInfo, NodeStatus, open_signed
from storage.library import Library
from storage.store import Store
from storage.transfer import Fetcher, RateLimit, Server

log = logging.getLogger(__name__)
VERSION = "0.1.0"
#: Dials in flight at once: a large mesh learned in one gossip round must not open hundreds of sockets.
MAX_CONCURRENT_DIALS = 8
NODE_FILE = "node.json"  # addresses of the running peer, for scripts and tests
#: The seeds' TrainingStatusPayload fields and their types (numbers: finite and not negative).
TRAINING_FIELDS = {"is_running": bool, "current_epoch": int, "total_epochs": int, "accuracy": float, "loss": float,
                   "samples_processed": int}
TRAINING_KINDS = {bool: "true or false", int: "a whole number >= 0", float: "a finite number >= 0"}
USAGE_SAVE_INTERVAL = 5.0  # seconds between saves of the request counts (a kill -9 loses at most these)
LINK_PINGS_PER_ROUND = 8  # members pinged per link_interval (the least recently pinged first)
LINK_PING_TIMEOUT = 2.0  # a ping slower than this counts as a failed link


#: Starts the HTTP API of a node in a nursery (``nursery.start(api, node, listen)``) and reports its URL.
ApiStarter = Callable[..., Awaitable[Any]]


class Node:
    def __init__(
        self, config: Config, identity: Identity, core: PeerCore, transport: Network,
        gpus: tuple[GpuInfo, ...], flops: float, store: Store, *, offload: Offload = threads,
        reads: Offload = abandoning, membership: Membership | None = None,
        wall_clock: Callable[[], float] = time.time, bandwidth: float = 0.0,
        overhead: dict[str, float] | None = None, kernels: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.core = core
        self.transport = transport
        self.gpus = gpus
        self.flops = flops
        self.bandwidth = bandwidth  # memory bandwidth, bytes/s (0: unknown)
        self.overhead = dict(overhead or {})  # compute dtype -> one block's dispatch time per token, s
        self.kernels = dict(kernels or {})  # weight kernel -> bytes/s it streams
        self.links = LinkTable()
        self.api_url = ""
        self.started_wall = time.time()
        self.drain_requested = trio.Event()
        self.finished = trio.Event()
        self._dial_failures: dict[str, str] = {}
        self._closed_peers: set[NodeId] = set()  # an open peer's record of closed-mesh peers it met (bounded
        # by the peers that reach it; they are refused, so each is met once)
        self._reject_throttle = Throttle(every=10.0)
        self.rejected = Tally()  # gossip refused here, by code (GET /metrics)
        st = config.storage
        self.store = store
        self.shard_server = Server(store, upload=RateLimit(st.upload_limit_mb_s * 1e6))
        self.fetcher = Fetcher(transport, store, parallel=st.parallel_downloads, retries=st.retries,
                               download=RateLimit(st.download_limit_mb_s * 1e6))
        self._installed: tuple[str, ...] = ()
        self.training: dict[str, str | int | float | bool] = {}  # the device app's last training report
        self.reported_gpu: GpuInfo | None = None  # what the device app reported where the peer measures none
        self.reported_battery: Battery | None = None
        self.device: dict[str, str | int | float | bool] = {}  # the app's metadata: platform, os, arch, ...
        self._serve: list[str] = list(config.inference.serve)  # models this peer asks the mesh to serve
        self.offload, self.reads = offload, reads
        # The services, each from the narrow parts it uses; the callbacks are the only paths between them.
        self.library = Library(store, self.fetcher, core, offload, manifest_ttl=st.manifest_cache_ttl)
        self.plans = PlanService(config, core, transport, identity, self.library, reject=self._reject,
                                 on_plan=lambda: self.stages.wake.set(), now=self.now, offload=offload,
                                 ping=self._ping_peer)
        self.results = Results(config.inference.session_idle_timeout)  # one table: host writes, driver reads
        self._beat_now = trio.Event()  # set: publish a heartbeat now (a stage became ready)
        self.stages = StageHost(config.inference, self.node_id, self.plans.book, self.library, transport,
                                self.results, now=self.now, offload=offload,
                                on_ready=lambda: self._beat_now.set())
        self.driver = Driver(config.inference, config.membership.offline_after, core, self.plans.book, self.library,
                             transport, self.stages, self.results, requested=self.serve_requests, offload=offload,
                             ping=self._ping_peer, report=self.report_failed_route,
                             connected=transport.connected_peers)
        # A closed mesh: members only, on every protocol (mesh.gate); None runs an open mesh.
        self.gate: Gate | None = None
        if membership is not None:
            data_dir = Path(config.node.data_dir).expanduser()

            async def save() -> None:
                await offload(credential.save, data_dir, membership)

            # certificates and invites carry wall-clock times (they outlive this process)
            self.gate = Gate(membership, identity, transport, clock=wall_clock, save=save)

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    # ---- time and events -------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return trio.current_time()

    def wall(self, t: float) -> float:
        """A monotonic core timestamp as Unix time."""
        return time.time() - (self.now() - t)

    def _log_events(self, events: list[PeerEvent]) -> None:
        for ev in events:
            if isinstance(ev, StatusChanged):
                log.info("peer %s: %s -> %s (%s)", ev.node_id, ev.old, ev.new, ev.reason,
                         extra={"event": "status_changed", "node_id": self.node_id, "peer": ev.node_id,
                                "old": ev.old and ev.old.value, "new": ev.new.value, "reason": ev.reason})
            elif isinstance(ev, LeaderChanged):
                log.info("coordinator %s (term %d), was %s (term %d)", ev.new.coordinator, ev.new.term,
                         ev.old.coordinator, ev.old.term,
                         extra={"event": "coordinator_changed", "node_id": self.node_id,
                                "coordinator": ev.new.coordinator, "term": ev.new.term})
                self.plans.on_leadership_changed()
            elif isinstance(ev, Forgotten):
                log.info("peer %s forgotten", ev.node_id,
                         extra={"event": "forgotten", "node_id": self.node_id, "peer": ev.node_id})

    def _reject(self, err: PeerError, sender: str) -> None:
        self.rejected.add(err.code)
        held_back = self._reject_throttle.allow((sender, err.code), self.now())
        if held_back is None:
            return
        more = f" ({held_back} more like it not logged)" if held_back else ""
        log.warning("rejected gossip from %s: %s %s%s", sender, err.code, err, more,
                    extra={"event": "rejected", "code": err.code, "node_id": self.node_id, "peer": sender,
                           "held_back": held_back})

    # ---- tasks -----------------------------------------------------------------------------------

    async def heartbeats(self) -> None:
        """One heartbeat per interval, and one at once when a stage became ready (drivers learn of the new
        route now, not up to an interval later)."""
        interval = self.config.membership.heartbeat_interval
        next_at = self.now()
        while True:
            await self.publish_heartbeat()
            next_at += interval
            if next_at < self.now():  # we fell behind (a stalled loop): do not burst to catch up
                next_at = self.now() + interval
            with trio.move_on_at(next_at):
                await self._beat_now.wait()
            if self._beat_now.is_set():  # an early beat: the next one an interval after it, never later
                self._beat_now = trio.Event()
                next_at = self.now()

    async def publish_heartbeat(self) -> None:
        # The store is read in a worker thread (it may be busy with a large add); a slow read keeps the
        # last list rather than delay the heartbeat.
        with trio.move_on_after(0.2):
            try:
                found = await self.reads(self.store.installed)
                self._installed = tuple(found)
            except (MeshError, OSError) as err:  # a broken registry.json must not stop the heartbeats
                code = getattr(err, "code", "STORE_IO")
                if self._reject_throttle.allow(("store", code), self.now()) is not None:
                    log.error("cannot read the model store: %s", err, extra={"event": "store_unreadable", "code": code})
        hw = hardware.snapshot(self.gpus)
        if not hw.gpus and self.reported_gpu is not None:  # the peer's own measurements win where both exist
            hw = dataclasses.replace(hw, gpus=(self.reported_gpu,))
        if hw.battery is None and self.reported_battery is not None:
            hw = dataclasses.replace(hw, battery=self.reported_battery)
        data, events = self.core.heartbeat(
            self.now(),
            hardware=hw,
            compute_flops=self.flops,
            addrs=tuple(self.transport.addrs()),
            installed_models=self._installed,
            serve_models=tuple(self._serve),
            stages=self.stages.ready(),
            api=self.api_url,
            training=self.training,
            device=self.device,
            memory_bandwidth=self.bandwidth,
            links=self.links.nearest(),
            step_ms=self.stages.step_times(),
            sessions=self.stages.active_sessions(),
            layer_overhead_us={k: round(v * 1e6, 3) for k, v in self.overhead.items()},
            kernel_bandwidth=self.kernels,
        )
        self._log_events(events)
        # A publish must never hold up the next heartbeat, whatever a peer's socket does.
        with trio.move_on_after(self.config.membership.heartbeat_interval) as scope:
            await self.transport.publish(NODES_TOPIC, data)
        if scope.cancelled_caught:
            log.warning("heartbeat publish took longer than the interval; skipped",
                        extra={"event": "publish_slow", "node_id": self.node_id})

    def accept_gossip(self, msg: GossipMessage) -> bool:
        """Topic validator: refuse (and do not relay) anything malformed, forged or oversize; in a closed mesh
        anything a non-member relayed or signed (the envelope is verified once, here), in an open one anything
        from a closed mesh's peers."""
        gate = self.gate
        if not (self._not_closed(msg) if gate is None else gate.relayed(msg)):
            return False
        if msg.sender == self.node_id:
            return True
        try:
            signed = open_signed(msg.data)
        except PeerError as err:
            self._reject(err, msg.sender)
            return False
        return gate is None or gate.signed_by_member(node_id_for_key(signed.public_key))

    async def receive(self) -> None:
        async with self.transport.subscribe(NODES_TOPIC) as messages:
            async for msg in messages:
                if msg.sender == self.node_id:
                    continue  # gossip echoes our own messages
                try:
                    self._log_events(self.core.receive(msg.data, self.now()))
                except PeerError as err:
                    self._reject(err, msg.sender)

    async def keep_usage(self) -> None:
        """Request counts (the model ranking) to disk every few seconds, when they changed."""
        while True:
            await trio.sleep(USAGE_SAVE_INTERVAL)
            try:
                await self.offload(self.store.save_usage)
            except OSError as err:  # a full disk must not stop the peer; the counts stay in memory
                log.warning("cannot save usage counts: %s", err, extra={"event": "usage_unsaved", "code": "STORE_IO"})

    async def ticks(self) -> None:
        while True:
            self._log_events(self.core.tick(self.now()))
            await trio.sleep(self.config.membership.heartbeat_interval / 4)

    def _dial_targets(self) -> list[str]:
        net = self.config.network
        connected = self.transport.connected_peers()
        targets: list[str] = []
        for addr in net.bootstrap:
            try:
                if peer_id_of(addr) not in connected:
                    targets.append(addr)
            except PeerError as err:
                log.error("bad bootstrap address %s: %s", addr, err, extra={"code": err.code})
        if net.peer_exchange:
            for m in self.core.membership.members():
                if m.node_id == self.node_id or m.node_id in connected or m.info.status == NodeStatus.OFFLINE:
                    continue  # connected already, or it said goodbye (it dials us when it comes back)
                if m.status != NodeStatus.OFFLINE and m.node_id < self.node_id:
                    continue  # both live: the lower id dials, so two peers do not open two connections
                # A peer that fell silent (frozen, crashed, cut off) is redialed from both sides every
                # round until it is forgotten: it may come back on the same address at any moment.
                for addr in m.info.addrs:
                    if addr.endswith(f"/p2p/{m.node_id}"):
                        targets.append(addr)
                        break
        if net.loopback_only:
            targets = [a for a in targets if is_loopback_addr(a)]
        return list(dict.fromkeys(targets))

    async def _dial(self, addr: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                peer = await self.transport.connect(addr)
            except PeerError as err:
                if self._dial_failures.get(addr) != str(err):
                    log.info("dial %s failed: %s", addr, err, extra={"event": "dial_failed", "code": err.code})
                self._dial_failures[addr] = str(err)
                return
        self._dial_failures.pop(addr, None)
        log.info("connected to %s", peer, extra={"event": "connected", "node_id": self.node_id, "peer": peer})

    async def dialer(self) -> None:
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_DIALS)
        while True:
            targets = self._dial_targets()
            for addr in set(self._dial_failures) - set(targets):  # forgotten peers: keep the dict bounded
                del self._dial_failures[addr]
            async with trio.open_nursery() as nursery:
                for addr in targets:
                    nursery.start_soon(self._dial, addr, limiter)
            await trio.sleep(self.config.network.dial_interval)

    async def reaper(self) -> None:
        """Close the connection of a member that fell silent: libp2p 0.8.1 never notices a frozen or
        vanished peer itself. Heartbeat silence is the liveness signal (it tolerates a missed beat); a
        connection younger than ``offline_after`` is spared, so a peer that just came back has time to
        speak before its old status counts against it."""
        m = self.config.membership
        while True:
            await trio.sleep(m.heartbeat_interval / 2)
            for member in self.core.membership.members():
                if member.status != NodeStatus.OFFLINE or member.node_id == self.node_id:
                    continue
                age = self.transport.connection_age(member.node_id)
                if age is not None and age >= m.offline_after:
                    log.info("closing the connection to silent peer %s", member.node_id,
                             extra={"event": "disconnect_silent", "node_id": self.node_id, "peer": member.node_id})
                    await self.transport.disconnect(member.node_id)

    async def measure_links(self) -> None:
        """Every ``coordinator.link_interval``: ping the connected members due (``LinkTable.due``), at once,
        each with its own deadline; a failed ping forgets that link's estimate. 0: never (hops cost hop_ms)."""
        if self.config.coordinator.link_interval == 0:
            return
        while True:
            await trio.sleep(self.config.coordinator.link_interval)
            members = {m.node_id for m in self.core.membership.members() if m.status != NodeStatus.OFFLINE}
            self.links.keep_only(members)
            connected = self.transport.connected_peers()
            due = self.links.due([p for p in members if p in connected and p != self.node_id], self.now(),
                                 LINK_PINGS_PER_ROUND)
            async with trio.open_nursery() as nursery:
                for peer in due:
                    nursery.start_soon(self._ping_link, peer)

    async def _ping_peer(self, peer: NodeId, timeout: float) -> float:
        return await self.transport.ping(peer, timeout=timeout)

    async def report_failed_route(self, nodes: list[NodeId], silent: list[NodeId]) -> None:
        """A driver's route through ``nodes`` failed (``silent``: those it just pinged in vain): the coordinator
        checks them (``PlanService.check_suspects``), here when this peer coordinates (its own driver's ping
        counts as the check), else over ``SUSPECT_PROTOCOL`` (the coordinator pings them itself). Raises
        PeerError when it cannot."""
        lead = self.core.leadership
        if lead.coordinator is None:
            return
        if lead.coordinator == self.node_id:
            await self.plans.check_suspects(nodes, reporter=self.node_id, unanswered=silent)
            return
        async with self.transport.open_stream(lead.coordinator, SUSPECT_PROTOCOL, timeout=2.0) as stream:
            await stream.send_frame(cbor2.dumps({"nodes": list(nodes)}))
            await stream.receive_frame(MAX_SUSPECT_REPORT)

    async def _ping_link(self, peer: NodeId) -> None:
        try:
            self.links.observe(peer, await self.transport.ping(peer, timeout=LINK_PING_TIMEOUT))
        except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            self.links.failed(peer)
            log.debug("link ping to %s failed: %s", peer, err, extra={"event": "link_failed", "peer": peer})

    async def mdns_dialer(self) -> None:
        limiter = trio.CapacityLimiter(MAX_CONCURRENT_DIALS)
        async with trio.open_nursery() as nursery:
            async for addr in self.transport.discovered:
                if self.config.network.loopback_only and not is_loopback_addr(addr):
                    continue
                if peer_id_of(addr) not in self.transport.connected_peers():
                    nursery.start_soon(self._dial, addr, limiter)

    async def lifecycle(self) -> None:
        await self.drain_requested.wait()
        log.info("draining", extra={"event": "draining", "node_id": self.node_id})
        self._log_events(self.core.drain(self.now()))
        await self.publish_heartbeat()
        await trio.sleep(self.config.node.drain_seconds)
        self._log_events(self.core.stop(self.now()))
        await self.publish_heartbeat()  # the goodbye: peers mark us offline at once
        await trio.sleep(0.2)  # let the goodbye leave before the host closes
        self.finished.set()

    def request_drain(self) -> None:
        self.drain_requested.set()

    # ---- models ----------------------------------------------------------------------------------

    def serve_requests(self) -> list[str]:
        return list(self._serve)

    async def request_serve(self, spec: str) -> dict[str, Any]:
        """Ask the mesh to serve ``spec`` ("id" or "id@revision"): gossiped with the heartbeat, the
        coordinator plans it, the peers it names load their stages. UNKNOWN_MODEL unless this peer or a
        live peer has it installed."""
        model, revision = ModelRef.of(spec)
        if not model or len(spec) > 256:
            raise PeerError("model_id must be a model id, or id@revision", code="INVALID_PARAMETER")
        local = any(ModelRef(model, revision).matches(entry) for entry in self._installed)
        if not local and not self.library.holders(model, revision):
            raise NotFoundError(f"no peer has {spec} installed (meshnode models add on one of them first)",
                                code="UNKNOWN_MODEL")
        self._serve = keep_ref(self._serve, spec)
        log.info("asked the mesh to serve %s", spec, extra={"event": "serve_requested", "model": model,
                                                             "node_id": self.node_id})
        await self.publish_heartbeat()  # the coordinator hears it now, not on the next beat
        self.plans.wake()
        return self.serving(model)

    def serving(self, model: str | None = None) -> dict[str, Any]:
        """What this peer asked to serve and what the mesh runs: each model's plan and stage readiness."""
        wanted = {ModelRef.of(s).model for s in self._serve} | set(self.plans.book.current)
        if model is not None:
            wanted = {model}
        rows = []
        for m in sorted(wanted):
            try:
                row = self.driver.status(m)
            except MeshError:
                row = {"model": m, "ready": False, "stages": []}
            errors = {k: v for k, v in (("plan", self.plans.errors.get(m)), ("stage", self.stages.errors.get(m)))
                      if v}
            rows.append(row | {"errors": errors})
        return {"requested": list(self._serve), "models": rows, "local": self.stages.view()}

    # ---- views for the API -----------------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        info = self.core.info
        out = dataclasses.asdict(info) if info is not None else {"node_id": self.node_id}
        out["status"] = self.core.status.value
        out["uptime_s"] = round(time.time() - self.started_wall, 3)
        # Whether the coordinator may give this peer work, and if not why (never silently ignored).
        why = []
        if self.config.membership.require_gpu and not self.gpus:
            why.append("require_gpu is set and this peer has no GPU: it gets no layers and cannot coordinate")
        if not self.config.node.accept_public_jobs:
            why.append("accept_public_jobs is off: the coordinator gives this peer no layers")
        out["eligible"], out["reason"] = not why, "; ".join(why) or None
        return out

    def nodes(self) -> dict[str, Any]:
        lead = self.core.leadership
        rows = []
        for m in self.core.membership.members():
            row = dataclasses.asdict(m.info)
            row["status"] = m.status.value
            row["reported_status"] = m.info.status.value
            row["last_seen"] = round(self.wall(m.last_seen), 3)
            row["is_coordinator"] = m.node_id == lead.coordinator
            row["is_self"] = m.node_id == self.node_id
            a = m.arrivals
            row["heartbeats"] = {"count": a.count, "total_s": round(a.total, 4), "mean_s": round(a.mean, 4),
                                 "min_s": round(a.min, 4),
                                 "max_s": round(a.max, 4), "off_pace": a.off_pace, "missed": a.missed}
            rows.append(row)
        return {"nodes": rows, "coordinator": lead.coordinator, "term": lead.term, "self": self.node_id}

    def _member(self, node_id: str) -> Member:
        m = self.core.membership.get(NodeId(node_id))
        if m is None:
            raise NotFoundError(f"no peer {node_id!r} in the membership table", code="UNKNOWN_NODE")
        return m

    def node_health(self, node_id: str) -> dict[str, Any]:
        m = self._member(node_id)
        now = self.now()
        issues = self.core.membership.issues(m, now)
        return {
            "node_id": m.node_id,
            "is_healthy": m.status == NodeStatus.READY and not issues,
            "status": m.status.value,
            "last_seen": round(self.wall(m.last_seen), 3),
            "current_load": m.info.hardware.load,
            "issues": issues,
            "training": dict(m.info.training),
        }

    def report_device(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/node-info``: the device's own app reports telemetry to its local peer, as the seeds'
        DeviceInfoPayload (``device_info``: gpu_type, gpu_usage %, gpu_memory_total/used GB, cpu_cores,
        total_memory_gb, battery_level %, is_charging) or NodeInfo payload (``node_info.capabilities``:
        gpu_type, gpu_memory_gb, ...). The peer gossips a reported GPU or battery only where it measures
        none itself; what it measures (cores, memory, load, the models its store holds) is never overridden.
        A reported ``network_bandwidth_mbps`` (which no peer measures) is gossiped in NodeInfo.device with the
        metadata. The answer names the fields taken and those the peer measures itself. INVALID_PARAMETER
        (nothing kept) for a bad value."""
        def number(d: dict[str, Any], key: str, top: float) -> float | None:
            v = d.get(key)
            if v is None:
                return None
            if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= top:
                raise PeerError(f"{key} must be a number in [0, {top:g}]", code="INVALID_PARAMETER")
            return float(v)

        def text(d: dict[str, Any], key: str) -> str | None:
            v = d.get(key)
            if v is not None and (not isinstance(v, str) or len(v) > 128):
                raise PeerError(f"{key} must be text of at most 128 characters", code="INVALID_PARAMETER")
            return v or None

        if isinstance(body.get("device_info"), dict):
            d, source = body["device_info"], "device_info"
            gpu_memory, used = number(d, "gpu_memory_total", 1e5), number(d, "gpu_memory_used", 1e5)
            usage = number(d, "gpu_usage", 100.0)
            level, charging = number(d, "battery_level", 100.0), d.get("is_charging")
            if charging is not None and type(charging) is not bool:
                raise PeerError("is_charging must be true or false", code="INVALID_PARAMETER")
        elif isinstance(body.get("node_info"), dict) and isinstance(body["node_info"].get("capabilities", {}), dict):
            d, source = body["node_info"].get("capabilities", {}), "node_info.capabilities"
            gpu_memory, used, usage, level, charging = number(d, "gpu_memory_gb", 1e5), None, None, None, None
            if "supported_models" in d and not (isinstance(d["supported_models"], list) and all(
                    isinstance(m, str) for m in d["supported_models"])):
                raise PeerError("supported_models must be a list of model ids", code="INVALID_PARAMETER")
        else:
            raise PeerError("device_info or node_info (an object) is required", code="MISSING_PARAMETER")
        gpu_type = text(d, "gpu_type")
        bandwidth = number(d, "network_bandwidth_mbps", 1e7)  # the peer does not measure its link's capacity
        meta = body.get("metadata")
        device: dict[str, str | int | float | bool] = {}
        if bandwidth is not None:
            device["network_bandwidth_mbps"] = bandwidth
        if meta is not None:
            if not isinstance(meta, dict) or not isinstance(meta.get("capabilities", {}) or {}, dict):
                raise PeerError("metadata must be an object (capabilities: an object)", code="INVALID_PARAMETER")
            for where, keys in ((meta, ("platform", "app_version")),
                                (meta.get("capabilities") or {}, ("os", "arch", "family"))):
                device |= {k: v for k in keys if (v := text(where, k)) is not None}
        taken, measured = [], []
        if gpu_type is not None:
            if self.gpus:
                measured.append("gpu")
            else:
                fraction = (used / gpu_memory if used is not None and gpu_memory else
                            usage / 100 if usage is not None else 0.0)
                self.reported_gpu = GpuInfo(gpu_type, gpu_memory or 0.0, min(1.0, fraction))
                taken.append("gpu")
        if level is not None:
            own = hardware.snapshot(()).battery
            if own is not None:
                measured.append("battery")
            else:
                self.reported_battery = Battery(level, bool(charging))
                taken.append("battery")
        if device:  # merged: the two payloads report different fields (metadata, link bandwidth)
            self.device = self.device | device
            taken += [k if k == "network_bandwidth_mbps" else f"metadata.{k}" for k in sorted(device)]
        # Measured here: cores, memory and load; the models are what this peer's own store holds.
        measured += [k for k in ("cpu_cores", "total_memory_gb", "max_memory_gb", "current_load",
                                 "supported_models") if k in d]
        return {"success": True, "message": "device telemetry merged into this peer's heartbeat",
                "node_id": self.node_id, "source": source, "taken": taken, "measured_here": sorted(measured)}

    def report_training(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/training-data`` (the seeds' TrainingStatusPayload): the device app's training status,
        kept and gossiped with every heartbeat from now on. Each known field is type- and range-checked
        (INVALID_PARAMETER otherwise, and nothing is kept); unknown fields are ignored and named."""
        status = body.get("training_status")
        if not isinstance(status, dict):
            raise PeerError("training_status (an object) is required", code="MISSING_PARAMETER")
        claimed = body.get("node_id")  # the app's own identifier, or this peer's id; another peer's is refused
        if claimed is not None and not isinstance(claimed, str):
            raise PeerError("node_id must be text or null", code="INVALID_PARAMETER")
        if claimed and claimed.startswith("12D3KooW") and claimed != self.node_id:
            raise PeerError(f"node_id {claimed[:64]!r} is another peer, not this one ({self.node_id})",
                            code="INVALID_PARAMETER")
        taken: dict[str, str | int | float | bool] = {}
        for key, kind in TRAINING_FIELDS.items():
            if key not in status or status[key] is None:
                continue
            value = status[key]
            ok = (type(value) is bool if kind is bool else
                  type(value) is int and 0 <= value < 2**53 if kind is int else
                  type(value) in (int, float) and math.isfinite(value) and value >= 0)
            if not ok:
                raise PeerError(f"training_status.{key} must be {TRAINING_KINDS[kind]}", code="INVALID_PARAMETER")
            taken[key] = value
        self.training = taken
        return {"success": True, "message": "training status kept; gossiped with every heartbeat",
                "node_id": self.node_id, "taken": sorted(taken), "ignored": sorted(set(status) - set(TRAINING_FIELDS)),
                "training_status": taken}

    # ---- a closed mesh's members ------------------------------------------------------------------

    def _not_closed(self, msg: GossipMessage) -> bool:
        """An open peer takes no gossip from a closed mesh's peers (they announce their credentials)."""
        return not ({msg.sender, msg.forwarder} & self._closed_peers)

    def _closed_peer_heard(self, msg: GossipMessage) -> bool:
        """A credential announcement reached this open peer: whoever sent or relayed it runs a closed mesh."""
        for peer in {msg.sender, msg.forwarder} - {None, self.node_id}:
            if peer not in self._closed_peers:
                self._reject(PeerError(f"{peer} runs a closed mesh; this peer an open one (--open)",
                                       code="MESH_MODE_MISMATCH"), peer)
                self._closed_peers.add(NodeId(peer))
        return False  # neither delivered nor relayed

    async def _hear_closed_peers(self) -> None:
        """Subscribed to the members topic (so closed peers' announcements reach the validator), and cut off
        from the closed peers found there."""
        async with self.transport.subscribe(MEMBERS_TOPIC) as messages, trio.open_nursery() as nursery:
            async def cut_off() -> None:
                while True:
                    for peer in self._closed_peers & self.transport.connected_peers():
                        await self.transport.disconnect(peer)
                    await trio.sleep(0.5)

            nursery.start_soon(cut_off)
            async for _ in messages:
                pass

    async def _refuse_closed(self, stream: Any) -> None:
        """An open peer asked for a credential by a closed one: they do not mix (both sides refuse)."""
        err = PeerError("this peer runs an open mesh (--open); a closed mesh's peer cannot join it",
                        code="MESH_MODE_MISMATCH")
        self._reject(err, stream.peer)
        await stream.send_frame(refusal(err))
        await self.transport.disconnect(stream.peer)

    def _closed(self) -> Gate:
        if self.gate is None:
            raise PeerError("this peer runs an open mesh (--open): it has no members to invite, list or revoke",
                            code="OPEN_MESH")
        return self.gate

    async def invite(self, ttl: float, uses: int) -> dict[str, Any]:
        """``POST /api/invite``: a token a new peer joins with (``meshnode start --join TOKEN``)."""
        gate = self._closed()
        addrs = tuple(a for a in self.transport.addrs()
                      if is_loopback_addr(a) or not self.config.network.loopback_only)
        inv = await gate.invite(ttl, uses, addrs)
        log.info("invite issued (expires in %.0f s, %d use%s)", ttl, uses, "" if uses == 1 else "s",
                 extra={"event": "invite_issued", "mesh": inv.mesh})
        return {"token": inv.token(), "mesh": inv.mesh, "issuer": inv.issuer, "expires_at": inv.expires,
                "uses": uses}

    async def revoke(self, node_id: str) -> dict[str, Any]:
        """``POST /api/revoke``: every member refuses ``node_id`` (and whom it admitted) once it hears this."""
        rev = await self._closed().revoke(node_id)
        if node_id in self.transport.connected_peers():
            await self.transport.disconnect(NodeId(node_id))
        return {"revoked": rev.revoked, "by": rev.by, "at": rev.at, "mesh": rev.mesh}

    def members(self) -> dict[str, Any]:
        """``GET /api/members``: who is a member, admitted when and by whom; whom this peer has admitted on a
        connection; who was revoked."""
        gate = self._closed()
        roster = gate.roster
        return {"mesh": roster.mesh, "founder": roster.root, "self": self.node_id,
                "members": [{"node_id": m.node_id, "admitted_by": m.admitted_by, "admitted_at": m.admitted_at,
                             "depth": m.depth, "connected": m.node_id in gate.admitted} for m in roster.members()],
                "revoked": sorted(roster.revocations)}

    async def ping(self, node_id: str, timeout: float) -> dict[str, Any]:
        """Round trip to a member over a fresh stream; PEER_TIMEOUT when it does not answer in time."""
        rtt = await self.transport.ping(self._member(node_id).node_id, timeout=timeout)
        return {"node_id": node_id, "rtt_ms": round(rtt * 1000, 3)}

    def runtime(self) -> dict[str, Any]:
        """Resource use of this process: what a long-running peer must keep flat."""
        proc = psutil.Process()
        with proc.oneshot():
            rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
        return {
            "tasks": _count_tasks(trio.lowlevel.current_root_task()),
            "rss_bytes": rss,
            "open_fds": fds,
            "threads": threads,
            "connections": len(self.transport.connected_peers()),
            "uptime_s": round(time.time() - self.started_wall, 3),
        }

    def coordinator(self) -> dict[str, Any]:
        lead = self.core.leadership
        return {"node_id": lead.coordinator, "term": lead.term}

    # ---- running ---------------------------------------------------------------------------------

    async def run(self, *, api: ApiStarter | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every task of the peer in one nursery, until it has drained (``request_drain``) or is cancelled.
        ``api``: how to start the HTTP API (``mesh.app.api.serve_api``) when ``config.api.listen`` is set."""
        t, inf, gate = self.transport, self.config.inference, self.gate
        t.set_validator(NODES_TOPIC, self.accept_gossip)
        if gate is None:
            t.set_validator(PLANS_TOPIC, lambda m: self._not_closed(m) and self.plans.accept_gossip(m))
            t.set_validator(MEMBERS_TOPIC, self._closed_peer_heard)
            self.shard_server.register(t)
            t.handle(ACTIVATIONS_PROTOCOL, self.stages.on_stream, max_concurrent=2 * inf.max_sessions + 16)
            t.handle(ADMIT_PROTOCOL, self._refuse_closed, max_concurrent=4, timeout=5.0)
            t.handle(SUSPECT_PROTOCOL, self.plans.on_suspect_stream, max_concurrent=8, timeout=5.0)
        else:  # the same, from members only
            t.set_validator(PLANS_TOPIC, lambda m: gate.accepts(m) and self.plans.accept_gossip(m))
            self.shard_server.register(gate.guarded(t))
            t.handle(ACTIVATIONS_PROTOCOL, gate.guard(ACTIVATIONS_PROTOCOL, self.stages.on_stream),
                     max_concurrent=2 * inf.max_sessions + 16)
            t.handle(SUSPECT_PROTOCOL, gate.guard(SUSPECT_PROTOCOL, self.plans.on_suspect_stream), max_concurrent=8,
                     timeout=5.0)
        async with trio.open_nursery() as nursery:
            if gate is not None:
                await nursery.start(gate.run)
            else:
                nursery.start_soon(self._hear_closed_peers)
            await nursery.start(self.library.run)
            await nursery.start(self.stages.keep)
            if api is not None and self.config.api.listen:
                self.api_url = await nursery.start(api, self, self.config.api.listen)
            log.info("peer %s listening on %s, api %s", self.node_id, " ".join(t.addrs()), self.api_url or "off",
                     extra={"event": "started", "node_id": self.node_id, "api": self.api_url})
            for task in (self.receive, self.heartbeats, self.ticks, self.dialer, self.reaper, self.lifecycle,
                         self.plans.receive, self.plans.coordinate, self.keep_usage, self.measure_links,
                         self.driver.reporting):
                nursery.start_soon(task)
            if self.config.network.mdns:
                nursery.start_soon(self.mdns_dialer)
            task_status.started()
            await self.finished.wait()
            with contextlib.suppress(OSError):
                self.store.save_usage()  # the last counts of a clean stop (a kill -9 loses a few seconds')
            nursery.cancel_scope.cancel()


def _count_tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_count_tasks(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

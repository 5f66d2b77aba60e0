"""The stages a peer runs: loaded from the plans that name it, served over ``/meshnode/activations/1``.

Tasks (children of the peer's nursery):
    keep        - follow the current plans: for every model whose plan gives this peer a range, fetch the
                  shards it lacks from the peers that hold them (SHA256-checked on arrival and again when
                  loaded), build the stage in a worker thread, then swap it in; a stage no plan names is
                  freed. Ready stages are gossiped (``NodeInfo.stages``), which is how drivers and
                  ``/v1/models`` know a model can run.
    sessions    - inbound activation streams (``on_stream``); the driver's local first stage runs as a
                  task here too (``open_local``)

A session is one stream from the previous hop. Step 0 names the route; the stage checks that it is the
stage the route says (same model, revision and range) and that the stream comes from the hop before it,
then opens the next hop once. Each step's tensor is checked (kind, dtype, shape, hidden size, token ids
inside the vocabulary, positions continuing the cache) before torch sees it; torch runs in a worker
thread, one step at a time per stage. Any error ends that session only: its cache is freed, an error
frame goes to the driver, and every other session goes on.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from coordinator.plans import PlanBook
from inference import protocol
from inference.frames import DTYPE_NAMES, Frame, FrameError, expect
from inference.protocol import ACTIVATIONS_PROTOCOL, Route, error_frame, route_of
from inference.results import Results
from inference.sampling import Sampling, sample
from inference.sessions import SessionTable
from inference.stage import Stage, dtype_of, verified_loader
from mesh.config import InferenceConfig
from mesh.errors import LocalError, MeshError, PeerError
from mesh.ids import NodeId, StageKey
from mesh.logs import Throttle
from mesh.ports import Clock, Library, Offload, Streams
from mesh.transport import Stream, StreamClosedError
from storage import queue

log = logging.getLogger(__name__)
#: Seconds before a stage that failed to load is tried again.
RETRY_LOAD = 5.0
#: An inbound activation stream must send its first frame within this many seconds.
FIRST_FRAME_TIMEOUT = 10.0
#: A session that stepped within this many seconds counts as served here (NodeInfo.sessions); one left idle
#: longer (its driver failed over, or waits on its client) does not load the stage.
ACTIVE_WITHIN = 5.0
#: Weight of a new decode step time in the smoothed one a stage gossips (NodeInfo.step_ms).
DECODE_ALPHA = 0.2


class StageNotReady(PeerError):
    code = "STAGE_NOT_READY"


@dataclass
class Loaded:
    model: str
    revision: str
    start: int
    end: int
    compute: str
    stage: Stage
    sessions: SessionTable
    vocab: int
    max_positions: int
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    loaded_at: float = field(default_factory=time.time)
    load_s: float = 0.0
    steps: int = 0
    decode_ms: float = 0.0  # smoothed time of one decode step (one token) in the stage, ms; 0 until one ran

    @property
    def key(self) -> str:
        return str(StageKey.make(self.model, self.revision, self.start, self.end, self.compute))


def fits(stages: list[Stage]) -> Callable[[dict[str, Any]], None]:
    """A header check run before the payload is read: one sequence, and a tensor one of ``stages`` can
    take (token ids for a first stage, hidden states of its size and dtype otherwise). An oversize or
    mismatched tensor is refused without reading (or buffering) its bytes."""
    def admit(header: dict[str, Any]) -> None:
        shape = header.get("shape")
        if shape is None:
            return
        if shape[0] != 1:
            raise FrameError(f"one sequence per session, got a batch of {shape[0]}", code="BAD_SHAPE")
        dtypes = []  # compute dtypes of the stages that take hidden states of this shape
        for st in stages:
            if len(shape) == 2 and st.first:
                return
            if len(shape) == 3 and not st.first and shape[2] == st.hidden:
                if header.get("dtype") == DTYPE_NAMES[st.dtype]:  # the plan's compute dtype, nothing else
                    return
                dtypes.append(DTYPE_NAMES[st.dtype])
        if dtypes:
            raise FrameError(f"expected {' or '.join(sorted(set(dtypes)))} activations, got {header.get('dtype')}",
                             code="BAD_DTYPE")
        raise FrameError(f"no stage here takes a tensor of shape {shape}", code="BAD_SHAPE")
    return admit


class Upstream:
    """Where a session's frames come from: a libp2p stream, or the driver on this peer."""

    def __init__(self, peer: NodeId, stream: Stream | None = None,
                 channel: trio.MemoryReceiveChannel[Frame] | None = None) -> None:
        self.peer, self.stream, self.channel = peer, stream, channel
        self.admit: Callable[[dict[str, Any]], None] | None = None

    async def receive(self, timeout: float) -> Frame:
        if self.stream is not None:
            return await protocol.receive(self.stream, timeout=timeout, admit=self.admit)
        assert self.channel is not None
        with trio.move_on_after(timeout):
            try:
                return await self.channel.receive()
            except trio.EndOfChannel:
                raise StreamClosedError("the driver closed the session") from None
        raise StreamClosedError(f"no frame from the driver for {timeout}s")


class StageHost:
    def __init__(self, config: InferenceConfig, node_id: NodeId, plans: PlanBook, library: Library,
                 streams: Streams, results: Results, *, now: Clock,
                 offload: Offload, on_ready: Callable[[], None] | None = None) -> None:
        self.node_id, self.plans, self.library, self.streams = node_id, plans, library, streams
        self.results, self.now, self.offload = results, now, offload  # results: for drivers on this peer
        inf = config
        self.max_sessions, self.idle_timeout = inf.max_sessions, inf.session_idle_timeout
        self.loaded: dict[str, Loaded] = {}  # model -> its stage here
        self.errors: dict[str, dict[str, Any]] = {}  # model -> why its stage could not be loaded
        self._failed: dict[str, tuple[str, float]] = {}  # model -> (stage key, when it failed)
        self._nursery: trio.Nursery | None = None
        self._throttle = Throttle(every=10.0)
        self._streams: collections.Counter[NodeId] = collections.Counter()  # open inbound streams per peer
        self.wake = trio.Event()
        self.on_ready = on_ready  # a stage became ready here (the node heartbeats at once)
        self.standby: set[str] = set()  # stage keys (model included) of fallback ranges whose shards are on disk
        self.warm: dict[str, Loaded] = {}  # stage key -> a standby range loaded ahead (idle peers only)
        self._prefetch: tuple[trio.CancelScope, trio.Event] | None = None  # the background prefetch, if any

    def ready(self) -> tuple[str, ...]:
        return tuple(sorted(s.key for s in self.loaded.values()))

    def step_times(self) -> dict[str, float]:
        """Ready stage key -> its smoothed decode step time, ms (stages that ran a decode step)."""
        return {s.key: round(s.decode_ms, 3) for s in self.loaded.values() if s.decode_ms > 0}

    def active_sessions(self) -> dict[str, int]:
        """Ready stage key -> sessions that stepped within ``ACTIVE_WITHIN`` s (stages serving any)."""
        now = self.now()
        return {s.key: n for s in self.loaded.values() if (n := s.sessions.active(now, ACTIVE_WITHIN))}

    # ---- following the plans --------------------------------------------------------------------

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                with trio.move_on_after(0.25):
                    await self.wake.wait()
                self.wake = trio.Event()
                await self._follow()

    async def _follow(self) -> None:
        me = self.node_id
        wanted: dict[str, tuple[str, int, int, str]] = {}
        for model, held in list(self.plans.current.items()):
            mine = next((a for p in held.plan.pipelines for a in p if a.node == me), None)
            if mine is not None:
                wanted[model] = (held.plan.revision, mine.start, mine.end, held.plan.compute_dtype)
        for model in [m for m in self.loaded if m not in wanted]:
            gone = self.loaded.pop(model)
            log.info("stage %s freed: no plan names this peer for it", gone.key,
                     extra={"event": "stage_freed", "model": model, "node_id": me})
        for model, (revision, start, end, compute) in wanted.items():
            key = str(StageKey.make(model, revision, start, end, compute))
            current = self.loaded.get(model)
            if current is not None and current.key == key:
                continue
            failed = self._failed.get(model)
            if failed is not None and failed[0] == key and self.now() - failed[1] < RETRY_LOAD:
                continue
            await self._stop_prefetch()  # a stage to load goes first: it may need the same files
            try:
                warm = self.warm.pop(key, None)  # a standby range loaded ahead: the takeover is instant
                self.warm.clear()  # this peer serves now: its memory is for the plan's stages
                self.loaded[model] = warm or await self._load(model, revision, start, end, compute)
                if warm is not None:
                    log.info("stage %s taken over from the warm standby", key,
                             extra={"event": "standby_taken", "model": model, "node_id": me})
                self.errors.pop(model, None)
                self._failed.pop(model, None)
                if self.on_ready is not None:
                    self.on_ready()
            except MeshError as err:
                self._load_failed(model, key, err)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:  # a broken shard or config file
                self._load_failed(model, key, LocalError(f"{type(exc).__name__}: {exc}", code="STAGE_LOAD_FAILED"))

        self._standby_follow()

    # ---- standby shards ---------------------------------------------------------------------------

    def _standby_wanted(self) -> list[tuple[str, str, int, int, str, str]]:
        """(model, revision, start, end, key) of every range a current plan names this peer the fallback for
        (and not the peer of): its shards should be on disk before they are needed."""
        me, out = self.node_id, []
        for model, held in list(self.plans.current.items()):
            for a in held.plan.assignments:
                if a.fallback == me and a.node != me:
                    key = str(StageKey.make(model, held.plan.revision, a.start, a.end, held.plan.compute_dtype))
                    out.append((model, held.plan.revision, a.start, a.end, held.plan.compute_dtype, key))
        return out

    def _standby_follow(self) -> None:
        """Start the background prefetch of standby ranges not on disk yet (one task at a time)."""
        wanted = self._standby_wanted()
        keep = {w[5] for w in wanted}
        self.standby &= keep  # ranges no plan names any more
        self.warm = {k: v for k, v in self.warm.items() if k in keep}
        todo = [w for w in wanted if w[5] not in self.standby]
        if not todo or self._prefetch is not None or self._nursery is None:
            return
        scope, done = trio.CancelScope(), trio.Event()
        self._prefetch = (scope, done)
        self._nursery.start_soon(self._prefetch_ranges, todo, scope, done)

    async def _stop_prefetch(self) -> None:
        if self._prefetch is not None:
            scope, done = self._prefetch
            scope.cancel()
            await done.wait()  # a file write in a worker thread finishes first: one writer per file

    async def _prefetch_ranges(self, todo: list[tuple[str, str, int, int, str, str]], scope: trio.CancelScope,
                               done: trio.Event) -> None:
        """Fetch (SHA256-checked) the shards of each standby range that are missing here, one range at a time;
        a peer that serves nothing also loads the range (a warm standby: the takeover costs no load).
        Cancelled whenever a stage must load. Never raises: a failure is logged and retried on a later plan."""
        try:
            with scope:
                for model, revision, start, end, compute, key in todo:
                    try:
                        manifest, _ = await self.library.manifest(model, revision)
                        shards = list(manifest.shards[start:end])
                        t0 = time.perf_counter()
                        await self.library.ensure(manifest, shards, priority=queue.LOW)  # after users' pulls
                        self.standby.add(key)
                        log.info("standby shards of %s on disk (%.2fs)", key, time.perf_counter() - t0,
                                 extra={"event": "standby_ready", "model": model, "node_id": self.node_id})
                        if not self.loaded and not self.warm:  # idle: its memory can hold the range ready
                            self.warm[key] = await self._load(model, revision, start, end, compute)
                    except (MeshError, OSError, ValueError, RuntimeError, KeyError) as err:
                        code = getattr(err, "code", "STAGE_LOAD_FAILED")
                        if self._throttle.allow(("standby", key, code), self.now()) is not None:
                            log.warning("cannot prefetch standby shards of %s: %s %s", key, code, err,
                                        extra={"event": "standby_failed", "code": code, "model": model})
        finally:
            self._prefetch = None
            done.set()

    def _load_failed(self, model: str, key: str, err: MeshError) -> None:
        self._failed[model] = (key, self.now())
        self.errors[model] = {**err.to_dict(), "stage": key, "at": time.time()}
        if self._throttle.allow(("load", key, err.code), self.now()) is not None:
            log.error("cannot load stage %s: %s %s", key, err.code, err,
                      extra={"event": "stage_load_failed", "code": err.code, "model": model})

    async def _load(self, model: str, revision: str, start: int, end: int, compute: str) -> Loaded:
        t0 = time.perf_counter()
        manifest, _ = await self.library.manifest(model, revision)
        if end > len(manifest.shards):
            raise LocalError(f"the plan gives this peer [{start}, {end}) of a model with {len(manifest.shards)} "
                             "layers", code="INVALID_STAGE")
        own = list(manifest.shards[start:end])
        by_name = {s.name: s for s in manifest.shards}
        if own[-1].tied_to and own[-1].tied_to in by_name and by_name[own[-1].tied_to] not in own:
            own.append(by_name[own[-1].tied_to])
        folder, _ = await self.library.ensure(manifest, own)  # (the shards are in the store's shard folder)
        config = json.loads(await self.offload((folder / "config.json").read_text))
        load = verified_loader(self.library.shard_dir)
        dtype = dtype_of(compute)
        stage = await self.offload(lambda: Stage(config, manifest.shards, start, end, load, dtype=dtype))
        vocab = int(config.get("vocab_size") or 0)
        max_pos = int(config.get("max_position_embeddings") or config.get("n_positions") or 1 << 20)
        loaded = Loaded(model, revision, start, end, compute, stage,
                        SessionTable(max_sessions=self.max_sessions, idle_timeout=self.idle_timeout),
                        vocab, max_pos, load_s=time.perf_counter() - t0)
        log.info("stage %s ready in %.2fs (%d shards)", loaded.key, loaded.load_s, end - start,
                 extra={"event": "stage_ready", "model": model, "node_id": self.node_id})
        return loaded

    # ---- sessions ---------------------------------------------------------------------------------

    async def on_stream(self, stream: Stream) -> None:
        """An inbound activation stream: a session from the previous hop, or results for a driver here.
        A peer may hold at most ``max_sessions`` of these at once, and must send its first frame within
        ``FIRST_FRAME_TIMEOUT``: idle streams cannot take every handler slot."""
        peer = stream.peer
        if self._streams[peer] >= self.max_sessions:
            await self._refuse(stream, "", 0, PeerError(f"{peer} has {self._streams[peer]} activation streams open "
                                                        "here, the most allowed", code="TOO_MANY_SESSIONS"))
            return
        self._streams[peer] += 1
        try:
            try:
                first = await protocol.receive(stream, timeout=FIRST_FRAME_TIMEOUT,
                                               admit=fits([s.stage for s in self.loaded.values()]))
                if first.kind in ("result", "error"):
                    await self.results.accept(stream, first)
                    return
            except PeerError as err:
                await self._refuse(stream, "", 0, err)
                return
            await self.serve_session(Upstream(peer, stream=stream), first, stream)
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def _refuse(self, stream: Stream | None, session: str, step: int, err: PeerError) -> None:
        log.info("activation session %s refused: %s %s", session or "-", err.code, err,
                 extra={"event": "session_refused", "code": err.code, "node_id": self.node_id})
        if stream is not None:
            with contextlib.suppress(PeerError):
                await protocol.send(stream, error_frame(session, step, err.code, str(err), self.node_id),
                                    timeout=1.0)

    def open_local(self, first: Frame) -> trio.MemorySendChannel[Frame]:
        """A session whose first stage is on this peer, driven from this peer: the driver sends its later
        frames into the returned channel (bounded: the driver waits when the stage is behind)."""
        assert self._nursery is not None
        send, receive = trio.open_memory_channel[Frame](4)
        self._nursery.start_soon(self._serve_local, Upstream(self.node_id, channel=receive), first)
        return send

    async def _serve_local(self, up: Upstream, first: Frame) -> None:
        """A local session runs in the host's nursery: a bug in it must end that session, not the host (the
        transport's handler boundary does this for remote sessions)."""
        try:
            await self.serve_session(up, first, None)
        except Exception:  # the documented boundary of one session
            log.exception("local activation session %s failed", first.session,
                          extra={"event": "session_failed", "code": "INTERNAL", "node_id": self.node_id})
            await self._notify(self.node_id, error_frame(first.session, 0, "INTERNAL", "the local stage failed",
                                                              self.node_id))

    def _trusted_driver(self, first: Frame, sender: NodeId) -> NodeId | None:
        """The driver named in a step 0, if the sender is the hop the route puts before this peer (so a
        refusal may be reported to that driver); None for anyone else (a stranger's refused frame must
        not reach, or fail, a real driver's session)."""
        try:
            route = route_of(first.extra)
        except PeerError:
            return None
        driver = first.extra.get("driver")
        index = next((i for i, h in enumerate(route.hops) if h.node == self.node_id), None)
        if not isinstance(driver, str) or index is None:
            return None
        return NodeId(driver) if sender == (driver if index == 0 else route.hops[index - 1].node) else None

    def _admit(self, first: Frame, sender: NodeId) -> tuple[Loaded, Route, int, NodeId, Sampling]:
        if first.kind not in ("tokens", "hidden") or first.step != 0:
            raise FrameError(f"a session starts with step 0 of tokens or hidden states, not {first.kind} "
                             f"step {first.step}", code="UNKNOWN_SESSION")
        route = route_of(first.extra)
        driver = first.extra.get("driver")
        if not isinstance(driver, str) or not driver:
            raise FrameError("step 0 must name the driver")
        sampling = Sampling.from_wire(first.extra.get("sampling", {}))
        me = self.node_id
        index = next((i for i, h in enumerate(route.hops) if h.node == me), None)
        if index is None:
            raise PeerError(f"this peer ({me}) is not on the route", code="NOT_IN_ROUTE")
        hop = route.hops[index]
        expected = driver if index == 0 else route.hops[index - 1].node
        if sender != expected:
            raise PeerError(f"stage {index} takes frames from {expected}, not {sender}", code="NOT_IN_ROUTE")
        loaded = self.loaded.get(route.model)
        if loaded is None or loaded.key != str(StageKey.make(route.model, route.revision, hop.start, hop.end,
                                                             route.compute)):
            have = loaded.key if loaded is not None else "nothing"
            raise StageNotReady(f"this peer has {have} loaded, not {route.model}@{route.revision} "
                                f"[{hop.start}, {hop.end}) in {route.compute}")
        return loaded, route, index, NodeId(driver), sampling

    async def serve_session(self, up: Upstream, first: Frame, stream: Stream | None) -> None:
        try:
            loaded, route, index, driver, sampling = self._admit(first, up.peer)
            session = loaded.sessions.step(first.session, 0, self.now(), loaded.stage.new_cache)
        except PeerError as err:
            await self._refuse(stream, first.session, first.step, err)
            trusted = self._trusted_driver(first, up.peer)
            if trusted is not None and err.code != "SESSION_EXISTS":  # the driver need not wait for a timeout
                await self._notify(trusted, error_frame(first.session, 0, err.code, str(err), self.node_id))
            return
        up.admit = fits([loaded.stage])
        last = index == len(route.hops) - 1
        next_node = driver if last else route.hops[index + 1].node
        frame = first
        try:
            async with contextlib.AsyncExitStack() as stack:
                send = await self._downstream(stack, next_node, first.session, None if last else driver)
                while True:
                    out = await self._step(loaded, session, frame, sampling, last)
                    await send(out)
                    frame = await up.receive(self.idle_timeout)
                    if frame.session != first.session:
                        raise FrameError(f"frame for session {frame.session} on the stream of {first.session}",
                                         code="UNKNOWN_SESSION")
                    if frame.kind == "end":
                        await send(Frame("end", frame.session, frame.step, frame.start))
                        return
                    loaded.sessions.step(first.session, frame.step, self.now(), loaded.stage.new_cache)
        except StreamClosedError as err:
            # The previous hop went away (its peer died, or the driver gave up): nothing to answer.
            log.info("session %s ended: %s", first.session, err,
                     extra={"event": "session_closed", "code": err.code, "node_id": self.node_id})
            if index > 0:  # a hop between stages broke: the driver learns now, not at its step timeout
                await self._notify(driver, error_frame(first.session, session.next_step, err.code,
                                                       f"{err} (stage {index})", self.node_id))
        except PeerError as err:
            await self._refuse(stream, first.session, frame.step, err)
            await self._notify(driver, error_frame(first.session, frame.step, err.code, str(err), self.node_id))
        finally:
            loaded.sessions.end(first.session)

    async def _downstream(self, stack: contextlib.AsyncExitStack, peer: NodeId, session: str,
                          driver: NodeId | None) -> Callable[[Frame], Awaitable[None]]:
        """How this stage sends its outputs: a stream to the next hop (or to the driver), or straight
        into the driver when it is this peer. Opened lazily, once per session. A next stage's refusal
        comes back on that stream (it may refuse a frame from its header alone, before it knows the
        session's driver); it is passed on to ``driver`` at once, so no generation waits for a step
        timeout to learn that a stage refused it."""
        if peer == self.node_id:
            async def local(frame: Frame) -> None:
                await self.results.deliver(frame, self.node_id)
            return local
        holder: list[Stream] = []

        async def remote(frame: Frame) -> None:
            if not holder:
                try:
                    holder.append(await stack.enter_async_context(
                        self.streams.open_stream(peer, ACTIVATIONS_PROTOCOL)))
                except PeerError as err:
                    raise StreamClosedError(f"cannot reach the next hop {peer}: {err.code} {err}",
                                            code="NEXT_HOP_FAILED") from None
                if driver is not None and self._nursery is not None:
                    scope = trio.CancelScope()
                    stack.callback(scope.cancel)  # the watcher ends with the session
                    self._nursery.start_soon(self._watch_refusals, scope, holder[0], peer, session, driver)
            try:
                await protocol.send(holder[0], frame)
            except PeerError as err:
                raise PeerError(f"the next hop {peer} failed: {err.code} {err}", code="NEXT_HOP_FAILED") from None
        return remote

    async def _watch_refusals(self, scope: trio.CancelScope, stream: Stream, peer: NodeId, session: str,
                              driver: NodeId) -> None:
        """Read what the next hop sends back on the session's stream (only ever a refusal) and tell the
        driver; a stream that merely closes is left to the step's own error handling. Runs in the host's
        nursery under ``scope`` (cancelled when the session ends) and never raises."""
        with scope:
            try:
                frame = await protocol.receive(stream, timeout=self.idle_timeout)
            except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await self._refused_downstream(frame, peer, session, driver)

    async def _refused_downstream(self, frame: Frame, peer: NodeId, session: str, driver: NodeId) -> None:
        if frame.kind == "error":
            code = str(frame.extra.get("code", "NEXT_HOP_FAILED"))[:64]
            message = str(frame.extra.get("message", ""))[:500]
            log.info("session %s: the next hop %s refused it: %s %s", session, peer, code, message,
                     extra={"event": "next_hop_refused", "code": code, "peer": peer, "node_id": self.node_id})
            await self._notify(driver, error_frame(session, frame.step, code, f"{message} (at {peer})", peer))

    async def _notify(self, driver: NodeId, frame: Frame) -> None:
        """Best effort: an error frame to the driver on its own stream (never raises)."""
        try:
            if driver == self.node_id:
                await self.results.deliver(frame, self.node_id)
                return
            with trio.move_on_after(2.0):
                async with self.streams.open_stream(driver, ACTIVATIONS_PROTOCOL, timeout=2.0) as s:
                    await protocol.send(s, frame)
        except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _step(self, loaded: Loaded, session: Any, frame: Frame, sampling: Sampling, last: bool) -> Frame:
        stage = loaded.stage
        if stage.first:
            x = expect(frame, kind="tokens", dtype=torch.int64, rank=2)
            if loaded.vocab and (int(x.min()) < 0 or int(x.max()) >= loaded.vocab):
                raise FrameError(f"token ids must be in [0, {loaded.vocab})", code="BAD_VALUES")
        else:
            x = expect(frame, kind="hidden", dtype=stage.dtype, rank=3, hidden=stage.hidden)
        if x.shape[0] != 1:
            raise FrameError(f"one sequence per session, got a batch of {x.shape[0]}", code="BAD_SHAPE")
        count = x.shape[1]
        if frame.start + count > loaded.max_positions:
            raise FrameError(f"positions up to {frame.start + count} exceed the model's {loaded.max_positions}",
                             code="CONTEXT_TOO_LONG")
        positions = torch.arange(frame.start, frame.start + count).unsqueeze(0)
        t0 = time.perf_counter()
        async with loaded.limiter:
            began = time.perf_counter()
            out = await self.offload(stage.forward, x, positions, session.cache)
            if last:
                logits = out[0, -1].float()
                token = await self.offload(sample, logits, sampling, frame.start + count)
            if count == 1:  # a decode step, without the wait for the limiter: what the planner estimates
                ms = (time.perf_counter() - began) * 1000
                loaded.decode_ms = ms if not loaded.decode_ms else loaded.decode_ms + DECODE_ALPHA * (
                    ms - loaded.decode_ms)
        loaded.sessions.done(session, self.now())
        loaded.steps += 1
        before = frame.extra.get("compute_ms")
        if not (isinstance(before, list) and all(isinstance(v, int | float) for v in before)):
            before = []
        timings = [*before, round((time.perf_counter() - t0) * 1000, 3)]
        extra: dict[str, Any] = {}
        if frame.step == 0:  # only what was checked at admission, re-encoded: no stranger's fields travel on
            extra = {**route_of(frame.extra).to_wire(), "driver": frame.extra["driver"],
                     "sampling": sampling.to_wire()}
        extra["compute_ms"] = timings[: protocol.MAX_ROUTE]
        if last:
            result = {"token": token, "compute_ms": extra["compute_ms"]}
            tensor = logits.view(1, 1, -1) if sampling.logits else None
            return Frame("result", frame.session, frame.step, frame.start, tensor, result)
        return Frame("hidden", frame.session, frame.step, frame.start, out, extra)

    # ---- views ------------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {"stages": [{"model": s.model, "revision": s.revision, "start": s.start, "end": s.end,
                            "sessions": len(s.sessions), "steps": s.steps, "load_s": round(s.load_s, 3),
                            "decode_ms": round(s.decode_ms, 3)}
                           for s in self.loaded.values()],
                "errors": self.errors}

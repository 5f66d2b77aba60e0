"""Where the results of this peer's generations wait for their driver.

The last stage of a route sends each step's result (or any stage an error) back to the route's driver: over
an inbound stream when the stage is another peer, directly when it is a stage on this peer. ``Results`` is
the one table of the generations waiting here, shared by the ``StageHost`` (which receives such frames) and
the ``Driver`` (which opens a generation and reads its results): neither knows the other. A frame for a
generation that is not waiting here (``UNKNOWN_SESSION``) or from a peer that may not send it
(``NOT_IN_ROUTE``: results only from the last stage, errors from any stage) is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from inference import protocol
from inference.frames import Frame
from inference.protocol import Route
from mesh.errors import PeerError
from mesh.ids import NodeId
from mesh.transport import Stream

RESULT_QUEUE = 8  # results waiting for the driver per session (back-pressure on the last stage)


@dataclass
class _Waiting:
    route: Route
    channel: trio.MemorySendChannel[Frame]


class Results:
    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout  # the most seconds between two frames of one result stream
        self._waiting: dict[str, _Waiting] = {}

    @contextlib.contextmanager
    def waiting(self, session: str, route: Route) -> Iterator[trio.MemoryReceiveChannel[Frame]]:
        """The results of ``session`` over ``route``, while the block runs (then frames for it are refused)."""
        send, receive = trio.open_memory_channel[Frame](RESULT_QUEUE)
        self._waiting[session] = _Waiting(route, send)
        try:
            yield receive
        finally:
            del self._waiting[session]
            send.close()
            receive.close()

    def _entry(self, frame: Frame, sender: NodeId) -> _Waiting:
        entry = self._waiting.get(frame.session)
        if entry is None:
            raise PeerError(f"no generation {frame.session} is waiting here", code="UNKNOWN_SESSION")
        allowed = entry.route.nodes if frame.kind == "error" else entry.route.nodes[-1:]
        if sender not in allowed:
            raise PeerError(f"{sender} may not send {frame.kind} frames for {frame.session}", code="NOT_IN_ROUTE")
        return entry

    async def deliver(self, frame: Frame, sender: NodeId) -> None:
        """A result or error for a generation waiting here, from a stage on this peer."""
        try:
            entry = self._entry(frame, sender)
            await entry.channel.send(frame)
        except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the generation is over (or failed over): nothing waits for this frame any more

    async def accept(self, stream: Stream, first: Frame) -> None:
        """An inbound stream of results (or an error) for one generation waiting here. PeerError when
        ``first`` is for no such generation or from a peer that may not send it."""
        entry = self._entry(first, stream.peer)
        frame = first
        while frame.kind in ("result", "error"):
            if frame.session != first.session:
                raise PeerError("results for another session on this stream", code="UNKNOWN_SESSION")
            try:
                await entry.channel.send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if frame.kind == "error":
                return
            frame = await protocol.receive(stream, timeout=self.idle_timeout)

"""``/meshnode/activations/1`` on the wire: frames over a libp2p stream, and the route a session takes.

One message = a 4-byte big-endian header length, the CBOR header (``inference.frames``), then exactly the
payload bytes the header announces. The receiver reads and checks the header before it reads a byte of
payload, so an oversize or malformed frame costs at most ``MAX_HEADER`` bytes.

Step 0 of a session carries, besides the tensor, what every stage needs to know about it::

    model, revision, epoch [term, epoch], route [[node, start, end], ...], driver, sampling {...}

Every stage forwards those fields unchanged to the next one; the last stage sends its results (kind
``result``: the sampled ``token``, the last position's logits when asked) straight to the driver, on a
stream of the same protocol whose first frame is a result. Errors travel the same way (kind ``error``,
``code`` and ``message``), so the driver learns at once why a step failed and where.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.frames import MAX_HEADER, Frame, FrameError, decode, decode_header, encode
from mesh.ids import NodeId, Span, check_spans
from mesh.transport import Stream
from storage.formats import COMPUTE_DTYPES

ACTIVATIONS_PROTOCOL = "/meshnode/activations/1"
MAX_ROUTE = 256  # stages in one route
_LEN = struct.Struct(">I")


async def send(stream: Stream, frame: Frame, *, timeout: float | None = None) -> None:
    header, payload = encode(frame)
    await stream.write(_LEN.pack(len(header)) + header + payload, timeout=timeout)


async def receive(stream: Stream, *, timeout: float | None = None,
                  admit: Callable[[dict[str, Any]], None] | None = None) -> Frame:
    """The next frame, checked (``inference.frames``); PeerErrors for anything malformed. ``admit``
    sees the checked header before a byte of payload is read, and may refuse it (raise)."""
    header, size = decode_header(await stream.receive_frame(MAX_HEADER, timeout=timeout))
    if admit is not None:
        admit(header)
    payload = await stream.read_exactly(size, timeout=timeout) if size else b""
    return decode(header, payload)


def error_frame(session: str, step: int, code: str, message: str, node: str) -> Frame:
    return Frame("error", session or "-", max(0, step), 0, None,
                 {"code": code, "message": message[:500], "node": node})



@dataclass(frozen=True, slots=True)
class Route:
    """The stages of one plan epoch, in pipeline order."""

    model: str
    revision: str
    epoch: tuple[int, int]  # (term, epoch) of the plan
    hops: tuple[Span, ...]  # node and shard range [start, end) per stage: equal to its plan's Plan.spans()
    compute: str = "float32"  # the plan's compute dtype: every stage runs in it, activations travel in it

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "revision": self.revision, "epoch": list(self.epoch),
                "route": [[h.node, h.start, h.end] for h in self.hops], "compute": self.compute}

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(NodeId(h.node) for h in self.hops)


def route_of(extra: dict[str, Any]) -> Route:
    """The route announced in a step-0 header, checked: contiguous ranges from 0, no node twice."""
    model, revision, epoch, raw = extra.get("model"), extra.get("revision"), extra.get("epoch"), extra.get("route")
    if not isinstance(model, str) or not model or not isinstance(revision, str) or not revision:
        raise FrameError("step 0 must name the model and revision")
    if not (isinstance(epoch, list) and len(epoch) == 2 and all(type(x) is int and x >= 0 for x in epoch)):
        raise FrameError("step 0 must carry the plan's [term, epoch]")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ROUTE:
        raise FrameError(f"route: expected 1 to {MAX_ROUTE} stages")
    hops = []
    for i, row in enumerate(raw):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and row[0]
                and type(row[1]) is int and type(row[2]) is int):
            raise FrameError(f"route[{i}]: expected [node, start, end]")
        hops.append(Span(row[0], row[1], row[2]))
    check_spans(hops, error=FrameError, what="route")
    compute = extra.get("compute", "float32")
    if compute not in COMPUTE_DTYPES:
        raise FrameError(f"route: compute dtype {compute!r} is not one of {', '.join(COMPUTE_DTYPES)}",
                         code="BAD_DTYPE")
    return Route(model, revision, (epoch[0], epoch[1]), tuple(hops), compute)

"""Connection churn against one running peer: many fresh libp2p hosts (a new key each time), each of
which connects, pings over a new stream, and goes away. Used by the churn test and ``bench/churn.py``.

    python -m mesh.churn /ip4/127.0.0.1/tcp/PORT/p2p/ID --count 1000 --burst 50

prints one JSON object: connect latencies (seconds), failures with their codes, and the wall time.
Only loopback addresses are dialed.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from mesh.errors import LocalError, PeerError
from mesh.identity import Identity
from mesh.transport import Transport, is_loopback_addr, peer_id_of


@dataclass
class ChurnResult:
    connect_s: list[float] = field(default_factory=list)
    ping_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def visit(addr: str, result: ChurnResult, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """A fresh host with a fresh key: connect, ping, report ``started``, then leave. (Closing a libp2p
    0.8.1 connection takes ~0.2 s of fixed sleeps, so leaving overlaps with the next visits.)"""
    try:
        async with Transport.open(Identity.generate(), [], loopback_only=True) as transport:
            start = trio.current_time()
            peer = await transport.connect(addr)
            result.connect_s.append(trio.current_time() - start)
            result.ping_s.append(await transport.ping(peer, timeout=5.0))
            task_status.started()
    except PeerError as err:
        result.failures.append(f"{err.code}: {err}")
        task_status.started()


async def churn(addr: str, count: int, burst: int = 1) -> ChurnResult:
    """``count`` visits in batches of ``burst`` that connect at once (1: strictly one after another);
    a batch starts when the previous one has connected and pinged."""
    if not is_loopback_addr(addr):
        raise PeerError(f"churn only dials loopback addresses, not {addr}", code="NOT_LOOPBACK")
    peer_id_of(addr)  # a full address, or a clear error now
    result = ChurnResult()
    start = time.monotonic()
    async with trio.open_nursery() as leaving:
        done = 0
        while done < count:
            n = min(burst, count - done)
            async with trio.open_nursery() as batch:
                for _ in range(n):
                    batch.start_soon(leaving.start, visit, addr, result)
            done += n
    result.wall_s = time.monotonic() - start
    return result


def run_process(addr: str, count: int, burst: int, timeout: float = 1800) -> dict[str, Any]:
    """Run the churn client in its own process (so it does not share the caller's event loop or GIL);
    its JSON report. LocalError when it crashed instead of reporting."""
    out = subprocess.run([sys.executable, "-m", "mesh.churn", addr, "--count", str(count), "--burst", str(burst)],
                         capture_output=True, text=True, timeout=timeout)
    # Exit 1 with a report: some visits failed (the caller looks at "failures"); anything else is a crash.
    if out.returncode not in (0, 1) or not out.stdout.strip():
        raise LocalError(f"churn client failed ({out.returncode}): {out.stderr[-3000:]}", code="CHURN_CLIENT_FAILED")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.churn", description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="full multiaddr of the peer (loopback only)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1, help="visits at once")
    args = parser.parse_args(argv)
    # The visitors' own libp2p logs errors for the races of a connection closing while the peer still
    # writes to it; they are about the visitor, not the peer under test.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    try:
        result = trio.run(churn, args.addr, args.count, max(1, args.burst))
    except PeerError as err:
        print(f"error: {err.code}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0 if not result.failures else 1


if __name__ == "__main__":
    sys.exit(main())

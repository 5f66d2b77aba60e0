"""Talking to a running peer's HTTP API from a script: the CLI, the demo, the local-mesh harness, the
benchmarks and the tests use these (plain ``urllib``: no event loop, no peer in this process)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import TOKEN_ENV, valid_token
from mesh.errors import ConfigError, MeshError
from mesh.fsutil import read_private

if TYPE_CHECKING:  # storage.store imports torch: not for `meshnode status`
    from storage.store import AddProgress

#: The API token a peer made for itself (a non-loopback ``--api`` without ``--api-token``), in its data dir.
API_TOKEN_FILE = "api-token"
#: How a CLI user passes the token, named in the error of a refused request.
TOKEN_HOW = (f"pass --api-token TOKEN, set {TOKEN_ENV}, or --data-dir DIR of the peer "
             f"(its {API_TOKEN_FILE} file)")


def read_token_file(data_dir: Path) -> str | None:
    """The token in ``data_dir/api-token``, or None when there is none. A file that group or others may
    read is refused (``INSECURE_PERMISSIONS``), as is one that holds no usable token."""
    path = data_dir / API_TOKEN_FILE
    try:
        token = read_private(path).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    if not valid_token(token):
        raise ConfigError(f"{path} holds no usable token (one line of printable ASCII); delete it to get a new one")
    return token


def client_token(explicit: str | None, data_dir: str | Path | None, environ: Mapping[str, str]) -> str | None:
    """The token a command sends to a peer's API: ``--api-token``, else ``$MESHNODE_API_TOKEN``, else the
    peer's token file in ``data_dir``; None (no header) when there is none."""
    if explicit:
        return explicit
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    return read_token_file(Path(data_dir).expanduser()) if data_dir is not None else None


def _api_url(addr: str) -> str:
    return addr if addr.startswith("http") else f"http://{addr}"


def _headers(token: str | None, *, json_body: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json"} if json_body else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"  # a header, never the URL: URLs end up in logs
    return headers


def api_get(addr: str, path: str, *, method: str = "GET", timeout: float = 5.0, body: Any = None,
            token: str | None = None) -> Any:
    """Call the local HTTP API (with ``token`` as ``Authorization: Bearer``); returns decoded JSON, raises
    MeshError with the API's code."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(_api_url(addr) + path, method=method, data=data,
                                 headers=_headers(token, json_body=body is not None))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise _api_error(addr, exc) from None


def _api_error(addr: str, exc: OSError) -> MeshError:
    """The API's error answer (its code and message), or API_UNREACHABLE."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            err = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "HTTP_ERROR", "message": str(exc)}
        if err["code"] == "UNAUTHORIZED":
            return MeshError(f"the peer's API at {addr} refused the request without its token: {TOKEN_HOW}",
                             code="UNAUTHORIZED")
        return MeshError(err["message"], code=err["code"])
    return MeshError(f"cannot reach the peer's API at {addr}: {exc}", code="API_UNREACHABLE")


def _fmt_gb(x: float) -> str:
    return f"{x:.1f}"


def format_status(nodes: dict[str, Any]) -> str:
    header = ("NODE", "NAME", "STATUS", "ROLE", "CPU", "MEM GB", "FREE GB", "LOAD", "GPUS", "GFLOP/S")
    rows = [header]
    for n in nodes["nodes"]:
        hw = n["hardware"]
        role = "coordinator" if n["is_coordinator"] else ""
        if n.get("is_self"):
            role = (role + " (self)").strip()
        gpus = ",".join(g["name"] for g in hw["gpus"]) or "-"
        rows.append((
            n["node_id"][:16] + "…", n.get("name") or "-", n["status"], role, str(hw["cpu_cores"]),
            _fmt_gb(hw["memory_gb"]), _fmt_gb(hw["memory_free_gb"]), f"{hw['load']:.2f}", gpus,
            f"{n['compute_flops'] / 1e9:.1f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"coordinator: {nodes['coordinator'] or '(none yet)'}   term: {nodes['term']}")
    return "\n".join(lines)


#: Transfer states that end ``pull``'s wait (``storage.queue``): over, or paused by someone.
SETTLED = ("done", "error", "cancelled", "paused")
#: What each control action applies to (``storage.queue.TRANSITIONS``), to find a model's transfer.
CONTROLLABLE = {"pause": ("queued", "running"), "resume": ("paused", "error"),
                "cancel": ("queued", "running", "paused", "error")}


def pull_many(api: str, models: list[str], revision: str | None, source: str | None, *,
              priority: str | None = None, quiet: bool = False, poll: float = 0.25,
              token: str | None = None) -> list[dict[str, Any]]:
    """Ask the running peer at ``api`` to fetch ``models`` from the mesh (queued at ``priority``) and follow them
    all: one progress bar per model and one for the total, with speed and ETA. Each transfer as it settled
    (done, error, cancelled, or paused by someone)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    started = [api_get(api, "/api/transfers", method="POST", token=token,
                       body={"model": m, "revision": revision, "source": source,
                             **({"priority": priority} if priority is not None else {})})["transfer"]
               for m in models]
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    latest = {t["id"]: t for t in started}
    with Progress(*columns, console=Console(stderr=True), disable=quiet, transient=False) as bar:
        bars = {t["id"]: bar.add_task(t["model"], total=None) for t in started}
        total = bar.add_task("total", total=None) if len(started) > 1 else None
        while True:
            for tid in [tid for tid, t in latest.items() if t["state"] not in SETTLED]:
                latest[tid] = api_get(api, f"/api/transfers/{tid}", token=token)
            for tid, t in latest.items():
                state = "" if t["state"] in ("running", "done") else f" {t['state']}"
                bar.update(bars[tid], total=t["total_bytes"] or None, completed=t["done_bytes"],
                           description=f"{t['model']} {t['files_done']}/{t['files_total']} files{state}")
            if total is not None:
                settled = sum(t["state"] in SETTLED for t in latest.values())
                bar.update(total, total=sum(t["total_bytes"] for t in latest.values()) or None,
                           completed=sum(t["done_bytes"] for t in latest.values()),
                           description=f"total {settled}/{len(latest)} models")
            if all(t["state"] in SETTLED for t in latest.values()):
                return list(latest.values())
            time.sleep(poll)


def pull(api: str, model: str, revision: str | None, source: str | None, *, quiet: bool = False,
         poll: float = 0.25, token: str | None = None) -> dict[str, Any]:
    """``pull_many`` of one model: the finished transfer, or MeshError with the transfer's code."""
    (t,) = pull_many(api, [model], revision, source, quiet=quiet, poll=poll, token=token)
    failed(t)
    return t


def failed(t: dict[str, Any]) -> None:
    """MeshError with a settled transfer's code, unless it is done."""
    if t["state"] == "done":
        return
    err = t["error"] or {"code": "TRANSFER_FAILED", "message": f"the transfer of {t['model']} is {t['state']}"}
    raise MeshError(err.get("message", "transfer failed"), code=err.get("code", "TRANSFER_FAILED"))


def control(api: str, action: str, targets: list[str], *, token: str | None = None) -> list[dict[str, Any]]:
    """``POST /api/transfers/{id}/{action}`` (pause, resume or cancel) for each target: a transfer id, or a model
    id, which names its newest transfer that ``action`` applies to (UNKNOWN_TRANSFER when there is none)."""
    listed = api_get(api, "/api/transfers", token=token)["transfers"]
    out = []
    for target in targets:
        if any(t["id"] == target for t in listed):
            tid = target
        else:
            mine = [t for t in listed if t["model"] == target and t.get("controllable")
                    and t["state"] in CONTROLLABLE[action]]
            if not mine:
                raise MeshError(f"no transfer of {target!r} to {action} (meshnode models pull starts one)",
                                code="UNKNOWN_TRANSFER")
            tid = max(mine, key=lambda t: int(t["id"][1:]) if t["id"][1:].isdigit() else 0)["id"]
        out.append(api_get(api, f"/api/transfers/{tid}/{action}", method="POST", token=token)["transfer"])
    return out


@contextlib.contextmanager
def add_progress(*, quiet: bool = False) -> Iterator[AddProgress]:
    """The ``progress`` of ``Store.add``, drawn with rich on stderr: one line per step (a hub download in
    bytes with its speed, then the shards written). Third-party bars (huggingface_hub's tqdm) are never drawn."""
    from rich.console import Console
    from rich.filesize import decimal
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    labels = {"download": "downloading from the hub", "reading": "reading the source", "shards": "writing shards"}
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                   TimeElapsedColumn(), console=Console(stderr=True), disable=quiet)
    tasks: dict[str, Any] = {}
    try:
        def report(step: str, done: int, total: int | None, unit: str) -> None:
            if not tasks:
                bar.start()  # drawn from the first step on: a no-op add draws nothing
            if step not in tasks:
                for earlier in tasks.values():  # one step at a time: the one before has finished
                    finished = next(t for t in bar.tasks if t.id == earlier)
                    bar.update(earlier, total=finished.completed or 1, completed=finished.completed or 1)
                tasks[step] = bar.add_task(labels.get(step, step), total=total, amount="")
            bar.update(tasks[step], completed=done, total=total)
            task = next(t for t in bar.tasks if t.id == tasks[step])
            if unit == "B":
                speed = f" {decimal(int(task.speed))}/s" if task.speed else ""
                amount = f"{decimal(done)}" + (f"/{decimal(total)}" if total else "") + speed
            else:
                amount = f"{done}/{total} {unit}" if total else ""
            bar.update(tasks[step], amount=amount)

        yield report
    finally:
        if tasks:
            bar.stop()


def stream_events(addr: str, path: str, body: dict[str, Any], *, timeout: float = 120.0,
                  token: str | None = None) -> Any:
    """POST ``body`` (with ``token`` as ``Authorization: Bearer``) and yield each server-sent event's JSON
    until ``[DONE]``; an error event (or an error answer) raises MeshError with its code."""
    req = urllib.request.Request(_api_url(addr) + path, method="POST", data=json.dumps(body).encode(),
                                 headers=_headers(token, json_body=True))
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise _api_error(addr, exc) from None
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise MeshError(event["error"]["message"], code=event["error"]["code"])
            yield event

"""The local HTTP API (Starlette on hypercorn's trio worker, inside the peer's own nursery).

Errors always answer ``{"error": {"code": ..., "message": ...}}`` with a matching status code, and are
logged with their code; a bad request never disturbs the peer. With ``api.token`` set, every request but
``OPEN_ROUTES`` needs ``Authorization: Bearer <token>`` (``BearerAuth``).

``GET /`` is the console (``mesh/app/console/``: one page, its script and style sheet, shipped as package data;
no build step, nothing fetched from anywhere but this peer). ``GET /api/console`` is everything it shows in one
snapshot; ``GET /metrics`` the Prometheus text format (``mesh.app.metrics``).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.app.metrics import CONTENT_TYPE_LATEST, Telemetry
from mesh.errors import MeshError, NotFoundError, PeerError
from mesh.logs import Throttle
from mesh.wire import NodeStatus
from storage.queue import parse_priority

if TYPE_CHECKING:
    from mesh.app.node import Node
    from storage.store import Store

log = logging.getLogger(__name__)


def error_response(err: MeshError) -> JSONResponse:
    """``{"error": {"code", "message", "type", "param"}}``: meshnode's stable code, in OpenAI's shape."""
    from mesh.app.openai import openai_error

    log.warning("api error %s: %s", err.code, err, extra={"event": "api_error", "code": err.code})
    retry = getattr(err, "retry_after", None)  # MESH_BUSY: when to come back
    headers = {"Retry-After": str(retry)} if isinstance(retry, int) else None
    return JSONResponse({"error": openai_error(err)}, status_code=err.http_status, headers=headers)


#: The console's files (package data, beside this module): the page is ``GET /``, the others ``/console/NAME``.
CONSOLE_DIR = Path(__file__).with_name("console")
CONSOLE_FILES = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
#: The console may load its own script and style and talk to this peer, nothing else (no CDN, no font, no
#: beacon: it must work on a LAN without internet, and tell nobody what it shows).
CONSOLE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: What answers without the token: a liveness probe that tells only the node id and its status, and the
#: console's static files (they hold no data; the page asks for the token and sends it with every data request).
OPEN_ROUTES = frozenset({("GET", "/api/health"), ("HEAD", "/api/health"), ("GET", "/"), ("HEAD", "/"),
                         *((method, f"/console/{name}") for name in CONSOLE_FILES for method in ("GET", "HEAD"))})
#: One warning per client address and reason this often: a client retrying a wrong token in a loop must not
#: fill the log of a peer that runs for weeks.
REFUSAL_LOG_EVERY_S = 10.0


class BearerAuth:
    """ASGI middleware: a request needs ``Authorization: Bearer <token>`` (compared in constant time), unless
    it is one of ``OPEN_ROUTES``. A missing or wrong token answers 401 ``UNAUTHORIZED`` in OpenAI's error shape
    with ``WWW-Authenticate: Bearer``, before any route runs; the token is never read from the URL and never
    logged."""

    def __init__(self, app: ASGIApp, token: str, clock: Callable[[], float] = trio.current_time) -> None:
        self.app = app
        self.token = token.encode()
        self.clock = clock
        self.throttle = Throttle(every=REFUSAL_LOG_EVERY_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or (scope.get("method"), scope["path"]) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        self._log(scope, refusal)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation, before any accept
            return
        err = PeerError(f"{refusal}: this API wants Authorization: Bearer TOKEN (GET /api/health is open)",
                        code="UNAUTHORIZED")
        challenge = 'Bearer realm="meshnode"' + (', error="invalid_token"' if refusal == "wrong token" else "")
        from mesh.app.openai import openai_error

        response = JSONResponse({"error": openai_error(err)}, status_code=err.http_status,
                                headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        """None when the request carries the token; otherwise why not."""
        given = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if not given:
            return "no token"
        if len(given) > 1:
            return "more than one Authorization header"
        scheme, _, credential = given[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return "not a Bearer token"
        return None if hmac.compare_digest(credential.strip(), self.token) else "wrong token"

    def _log(self, scope: Scope, refusal: str) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        held = self.throttle.allow((client, refusal), self.clock())
        if held is not None:
            log.warning("api request refused, %s: %s %s from %s%s", refusal, scope.get("method", "WEBSOCKET"),
                        scope["path"], client, f" ({held} more held back)" if held else "",
                        extra={"event": "api_error", "code": "UNAUTHORIZED", "peer": client})


def build_app(node: Node) -> Starlette:
    telemetry = Telemetry(node)  # this app's metrics registry, throughput series and error list

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "node_id": node.node_id, "node_status": node.core.status.value})

    async def node_info(request: Request) -> JSONResponse:
        return JSONResponse(node.node_info())

    async def report_node_info(request: Request) -> JSONResponse:
        body = await json_body(request, '{"device_info": {...}} or {"node_info": {...}}')  # the seeds' payloads
        return JSONResponse(node.report_device(body))

    async def nodes(request: Request) -> JSONResponse:
        return JSONResponse(node.nodes())

    async def node_health(request: Request) -> JSONResponse:
        node_id = request.query_params.get("node_id", node.node_id)
        if not node_id:
            raise PeerError("node_id must not be empty", code="MISSING_PARAMETER")
        return JSONResponse(node.node_health(node_id))

    async def ping(request: Request) -> JSONResponse:
        node_id = request.query_params.get("node_id", "")
        if not node_id:
            raise PeerError("node_id is required", code="MISSING_PARAMETER")
        try:
            timeout = float(request.query_params.get("timeout", "2"))
        except ValueError:
            raise PeerError("timeout must be a number of seconds", code="INVALID_PARAMETER") from None
        if not 0 < timeout <= 30:
            raise PeerError("timeout must be in (0, 30] seconds", code="INVALID_PARAMETER")
        return JSONResponse(await node.ping(node_id, timeout))

    async def runtime(request: Request) -> JSONResponse:
        return JSONResponse(node.runtime())

    async def coordinator(request: Request) -> JSONResponse:
        return JSONResponse(node.coordinator())

    async def json_body(request: Request, usage: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise PeerError(f"the body must be JSON: {usage}", code="BAD_REQUEST") from None
        if not isinstance(body, dict):
            raise PeerError(f"the body must be a JSON object: {usage}", code="BAD_REQUEST")
        return body

    # ---- models ---------------------------------------------------------------------------------

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(await trio.to_thread.run_sync(node.store.describe))  # the seeds' list

    async def model(request: Request) -> JSONResponse:
        model_id = request.path_params["model_id"]
        for m in await trio.to_thread.run_sync(node.store.describe):
            if m["id"] == model_id:
                return JSONResponse(m)
        raise NotFoundError(f"no model {model_id!r} in this peer's store", code="UNKNOWN_MODEL")

    async def ranking(request: Request) -> JSONResponse:
        return JSONResponse(node.store.ranking())  # the seeds' list, most requested first

    async def start_transfer(request: Request) -> JSONResponse:
        body = await json_body(request, '{"model": ..., "revision": ..., "priority": ..., "source": ...}')
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise PeerError("\"model\" (a model id) is required", code="MISSING_PARAMETER")
        for key in ("revision", "source"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise PeerError(f"{key!r} must be a string", code="INVALID_PARAMETER")
        transfer = node.library.start_fetch(body["model"], body.get("revision"), body.get("source"),
                                            priority=parse_priority(body.get("priority")))
        return JSONResponse({"transfer": transfer.snapshot()}, status_code=202)

    def control_transfer(action: Callable[[str], Any]) -> Callable[[Request], Any]:
        """POST /api/transfers/{id}/pause, /resume or /cancel (``storage.queue.TRANSITIONS``)."""
        async def control(request: Request) -> JSONResponse:
            return JSONResponse({"transfer": action(request.path_params["transfer_id"]).snapshot()})

        return control

    async def transfers(request: Request) -> JSONResponse:
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            raise PeerError("after must be an event sequence number", code="INVALID_PARAMETER") from None
        f = node.fetcher
        return JSONResponse({"transfers": [t.snapshot() for t in f.transfers.values()],
                             "events": f.events_after(after)})

    async def transfer(request: Request) -> JSONResponse:
        t = node.fetcher.transfers.get(request.path_params["transfer_id"])
        if t is None:
            raise NotFoundError(f"no transfer {request.path_params['transfer_id']!r}", code="UNKNOWN_TRANSFER")
        return JSONResponse(t.snapshot())

    async def storage_file(request: Request) -> FileResponse:
        def locate() -> tuple[str, str, Path]:  # one worker thread for both lookups
            model_id, version, name = _storage_parts(request, node.store)
            return model_id, name, node.store.download_path(model_id, version, name)

        model_id, name, path = await trio.to_thread.run_sync(locate)
        node.store.count(model_id, "download")
        return FileResponse(path, filename=name)

    # ---- plans ----------------------------------------------------------------------------------

    async def plan(request: Request) -> JSONResponse:
        return JSONResponse(node.plans.view(request.query_params.get("model")))

    async def request_plan(request: Request) -> JSONResponse:
        body = await json_body(request, '{"model": "id" or "id@revision"}')
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise PeerError("\"model\" (a model id) is required", code="MISSING_PARAMETER")
        return JSONResponse(await node.plans.request_plan(body["model"]))

    async def reassign_node(request: Request) -> JSONResponse:
        body = await json_body(request, '{"failed_nodes": [...], "current_splits": [...], "request_id": ...}')
        failed = body.get("failed_nodes")
        if not isinstance(failed, list) or not failed or not all(isinstance(f, str) and f for f in failed):
            raise PeerError("\"failed_nodes\" must be a non-empty list of node ids", code="MISSING_PARAMETER")
        for key in ("request_id", "model"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise PeerError(f"{key!r} must be a string", code="INVALID_PARAMETER")
        return JSONResponse(await node.plans.reassign_request(
            failed, body.get("current_splits"), body.get("request_id") or "", body.get("model")))

    async def training_data(request: Request) -> JSONResponse:
        body = await json_body(request, '{"training_status": {...}, "node_id": ...}')  # TrainingStatusPayload
        return JSONResponse(node.report_training(body))

    async def invite(request: Request) -> JSONResponse:
        body = await json_body(request, '{"ttl": seconds, "uses": n}')
        ttl, uses = body.get("ttl", 3600), body.get("uses", 1)
        if type(ttl) not in (int, float) or type(uses) is not int:
            raise PeerError("ttl must be a number of seconds and uses a whole number", code="INVALID_PARAMETER")
        return JSONResponse(await node.invite(float(ttl), uses), status_code=201)

    async def revoke(request: Request) -> JSONResponse:
        body = await json_body(request, '{"node_id": "12D3KooW..."}')
        node_id = body.get("node_id")
        if not isinstance(node_id, str) or not node_id:
            raise PeerError("node_id (the member to revoke) is required", code="MISSING_PARAMETER")
        return JSONResponse(await node.revoke(node_id))

    async def members(request: Request) -> JSONResponse:
        return JSONResponse(node.members())

    async def drain(request: Request) -> JSONResponse:
        node.request_drain()
        return JSONResponse({"status": NodeStatus.DRAINING.value, "node_id": node.node_id}, status_code=202)

    # ---- console and metrics ----------------------------------------------------------------------

    def console_file(name: str, media_type: str) -> FileResponse:
        return FileResponse(CONSOLE_DIR / name, media_type=media_type,
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONSOLE_POLICY,
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def console_page(request: Request) -> FileResponse:
        return console_file("index.html", "text/html; charset=utf-8")

    async def console_static(request: Request) -> FileResponse:
        name = request.path_params["name"]
        if name not in CONSOLE_FILES:
            raise NotFoundError(f"the console has no file {name[:100]!r}", code="NOT_FOUND")
        return console_file(name, CONSOLE_FILES[name])

    async def console_snapshot(request: Request) -> JSONResponse:
        return JSONResponse(telemetry.console())

    async def metrics(request: Request) -> Response:
        return Response(telemetry.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def on_mesh_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MeshError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "BAD_REQUEST")
        err = PeerError(f"{request.method} {request.url.path}: {exc.detail}", code=code)
        err.http_status = exc.status_code
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The one documented boundary where any exception is caught: one request failed, the peer goes on.
        log.error("api handler failed for %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": {"code": "INTERNAL", "message": "internal error", "type": "server_error",
                                       "param": None}}, status_code=500)

    from mesh.app.openai import Api

    routes = [
        *Api(node).routes(),
        Route("/api/health", health),
        Route("/api/node-info", node_info),
        Route("/api/node-info", report_node_info, methods=["POST"]),
        Route("/api/nodes", nodes),
        Route("/api/node-health", node_health),
        Route("/api/coordinator", coordinator),
        Route("/api/ping", ping),
        Route("/api/runtime", runtime),
        Route("/api/drain", drain, methods=["POST"]),
        Route("/api/invite", invite, methods=["POST"]),
        Route("/api/revoke", revoke, methods=["POST"]),
        Route("/api/members", members),
        Route("/api/training-data", training_data, methods=["POST"]),
        Route("/api/plan", plan),
        Route("/api/plan", request_plan, methods=["POST"]),
        Route("/api/reassign-node", reassign_node, methods=["POST"]),
        Route("/api/models", models),
        Route("/api/models/{model_id:path}", model),
        Route("/api/model-usage/ranking", ranking),
        Route("/api/transfers", transfers),
        Route("/api/transfers", start_transfer, methods=["POST"]),
        Route("/api/transfers/{transfer_id}", transfer),
        Route("/api/transfers/{transfer_id}/pause", control_transfer(node.library.pause), methods=["POST"]),
        Route("/api/transfers/{transfer_id}/resume", control_transfer(node.library.resume), methods=["POST"]),
        Route("/api/transfers/{transfer_id}/cancel", control_transfer(node.library.cancel), methods=["POST"]),
        Route("/storage/models/{rest:path}", storage_file, methods=["GET", "HEAD"]),
        Route("/", console_page),
        Route("/console/{name}", console_static),
        Route("/api/console", console_snapshot),
        Route("/metrics", metrics),
    ]
    token = node.config.api.token
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuth, token=token)] if token else [],
        exception_handlers={MeshError: on_mesh_error, HTTPException: on_http_error, Exception: on_unexpected},
    )
    app.state.telemetry = telemetry  # serve_api runs its sampler
    return app


_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


def _storage_parts(request: Request, store: Store) -> tuple[str, str, str]:
    """``/storage/models/{model id, may contain /}/{version}/{file}`` → its three parts, matched against the
    installed models and versions (never split by position: ``org/name`` stays one id). Anything that could
    step outside the store is refused before a file is looked up: ``..`` or ``.`` segments, empty segments
    (an absolute path), backslashes, NUL, percent-encoded dots, slashes or backslashes, and a ``%`` left
    after decoding (a double encoding). A path that names no installed version is 404, never 5xx."""
    raw = request.scope.get("raw_path", b"").decode("latin-1")
    if _ENCODED.search(raw):
        raise PeerError("encoded dots, slashes or NUL are not allowed in storage paths", code="INVALID_PATH")
    rest = request.path_params["rest"]
    parts = rest.split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") or "\\" in p or "\x00" in p or "%" in p for p in parts):
        raise PeerError("a storage path is /storage/models/{model}/{version}/{file}", code="INVALID_PATH")
    store.registry.refresh()
    for model_id, entry in store.registry.models.items():
        for version in entry.versions:
            prefix = f"{model_id}/{version}/"
            if rest.startswith(prefix) and "/" not in rest[len(prefix):]:
                return model_id, version, rest[len(prefix):]
    raise NotFoundError(f"no installed model version matches {rest[:200]!r}", code="FILE_NOT_FOUND")


async def serve_api(
    node: Node, listen: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; reports the bound ``http://host:port`` (a port of 0 is filled in)."""
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 5
    config.h11_max_incomplete_size = 16 * 1024  # requests here are small; refuse huge headers early
    app = build_app(node)

    async def _serve(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(app.state.telemetry.run)
        binds = await nursery.start(_serve)
        task_status.started(binds[0])

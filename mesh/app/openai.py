"""OpenAI-compatible HTTP on every peer, plus meshnode's own generation and serving endpoints.

    GET  /v1/models              models whose every stage is ready
    POST /v1/completions         prompt (text or token ids) → text; ``stream: true`` for server-sent events
    POST /v1/chat/completions    messages → the chat template → text; streams too
    POST /api/request            one generation with meshnode's details (token ids, route, epochs, timings)
    POST /api/model              {"model_id": ID}: ask the mesh to serve a model
    GET  /api/model              what is served, planned and loaded, stage by stage

Errors use OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with a status code; a
stream that fails after it started ends with one ``data: {"error": ...}`` event and ``[DONE]``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from inference.driver import Request as GenRequest
from inference.protocol import Route as MeshRoute
from inference.sampling import Sampling
from inference.tokenizer import chat_ids, stop_ids, text_ids
from mesh.errors import MeshError, PeerError
from mesh.ids import ModelRef

if TYPE_CHECKING:
    from mesh.app.node import Node

MAX_NEW_TOKENS = 4096
MAX_STOP = 4


def _invalid(message: str, param: str | None = None) -> PeerError:
    err = PeerError(message, code="INVALID_PARAMETER")
    err.param = param  # type: ignore[attr-defined]
    return err


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise PeerError("the body must be JSON", code="BAD_REQUEST") from None
    if not isinstance(body, dict):
        raise PeerError("the body must be a JSON object", code="BAD_REQUEST")
    return body


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise _invalid(f"{key} must be a number in [{lo}, {hi}]", key)
    return float(v)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if type(v) is not int or not lo <= v <= hi:
        raise _invalid(f"{key} must be an integer in [{lo}, {hi}]", key)
    return v


@dataclass
class Params:
    model: str
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool


def parse_params(body: dict[str, Any], default_max: int) -> Params:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model is required (GET /v1/models lists them)", "model")
    if type(body.get("n", 1)) is not int or body.get("n", 1) != 1:
        raise _invalid("only n = 1 is supported", "n")
    max_tokens = _integer(body, "max_completion_tokens", None, 1, MAX_NEW_TOKENS)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max, 1, MAX_NEW_TOKENS)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _invalid("top_p must be above 0", "top_p")
    top_k = _integer(body, "top_k", 0, 0, 1 << 20)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    if seed is None:
        seed = secrets.randbelow(2**63)  # fixed for the request: a failover replays the same draws
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise _invalid(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream must be true or false", "stream")
    return Params(model, max_tokens or default_max, Sampling(temperature, top_k or 0, top_p, seed), stops, stream)


@dataclass
class TextStream:
    """Token ids → text deltas: holds back an incomplete UTF-8 sequence and anything that may be the
    start of a stop string; cuts the text at the first stop string."""

    tokenizer: Any
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    emitted: str = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string ended the text)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut >= 0:
            return self._emit(text[:cut]), True
        if text.endswith("\ufffd"):
            return "", False
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._emit(text[: max(len(self.emitted), len(text) - hold)]), False

    def finish(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        return self._emit(text[:cut] if cut >= 0 else text)

    def _stop_at(self, text: str) -> int:
        """Where the first stop string starts in ``text``; -1 if none is there."""
        return min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


@dataclass
class Outcome:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    epochs: list[list[int]] = field(default_factory=list)
    failovers: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    compute_ms: list[list[float]] = field(default_factory=list)
    route: list[dict[str, Any]] = field(default_factory=list)

    def timings(self) -> dict[str, Any]:
        decode = self.total_ms - self.ttft_ms
        n = max(0, len(self.token_ids) - 1)
        return {"ttft_ms": round(self.ttft_ms, 3), "total_ms": round(self.total_ms, 3),
                "decode_tokens_per_s": round(n / (decode / 1000), 3) if n and decode > 0 else None,
                "step_ms": [round(x, 3) for x in self.step_ms], "compute_ms": self.compute_ms}


class Api:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def _prompt(self, body: dict[str, Any], chat: bool, route: MeshRoute
                      ) -> tuple[list[int], Any, frozenset[int]]:
        """(prompt token ids, tokenizer or None, stop ids) for a request body."""
        driver = self.node.driver
        folder = await driver.model_files(route)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise _invalid("messages must be a non-empty list of {role, content} with text content", "messages")
            tok = await driver.tokenizer(route)
            ids = chat_ids(tok, [{"role": m["role"], "content": m["content"]} for m in messages])
            return ids, tok, tok.meshnode_stop_ids
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _invalid("prompt must not be empty", "prompt")
            tok = await driver.tokenizer(route)
            return text_ids(tok, prompt), tok, tok.meshnode_stop_ids
        if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
            try:
                tok = await driver.tokenizer(route)
            except PeerError:
                tok = None  # token ids in, token ids out
            return list(prompt), tok, tok.meshnode_stop_ids if tok is not None else stop_ids(folder)
        raise _invalid("prompt must be a non-empty string or a list of token ids", "prompt")

    async def run(self, body: dict[str, Any], chat: bool, default_max: int = 16) -> tuple[Params, AsyncIterator[Any]]:
        """Parse and validate a request, then (params, events): ("delta", text, Token) per token and a
        final ("done", Outcome). Errors before the first event are raised here, not in the stream."""
        p = parse_params(body, default_max)
        route = self.node.driver.require(p.model)
        self.node.driver.check_capacity(p.model)  # MESH_BUSY before anything is streamed
        self.node.store.count(route.model, "generation")  # the model ranking counts generation requests
        prompt, tok, stops = await self._prompt(body, chat, route)
        if body.get("ignore_eos") is True:
            stops = frozenset()
        req = GenRequest(p.model, tuple(prompt), p.max_tokens, p.sampling, stops)
        gen = self.node.driver.generate(req)

        async def events() -> AsyncIterator[Any]:
            out = Outcome(prompt_tokens=len(prompt), route=[{"node_id": h.node, "layers": [h.start, h.end]}
                                                            for h in route.hops])
            text = TextStream(tok, p.stop)
            t0 = time.perf_counter()
            async for token in gen:
                now = (time.perf_counter() - t0) * 1000
                if not out.step_ms:
                    out.ttft_ms = now
                out.step_ms.append(token.step_ms)
                out.compute_ms.append(list(token.compute_ms))
                if list(token.epoch) not in out.epochs:
                    out.epochs.append(list(token.epoch))
                out.failovers += token.replayed
                if token.stop:  # the driver ends the generation itself after a stop token (and frees the caches)
                    out.finish_reason = "stop"
                    continue
                out.token_ids.append(token.id)
                delta, stopped = text.push(token.id)
                yield ("delta", delta, token)  # every token, even one whose text is held back
                if stopped:
                    out.finish_reason = "stop"
                    break
            await gen.aclose()
            tail = text.finish()  # text held back for a stop string that never came
            if tail:
                yield ("delta", tail, None)
            out.text = text.emitted
            out.total_ms = (time.perf_counter() - t0) * 1000
            yield ("done", out)
        return p, events()

    # ---- endpoints ----------------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        data = [{"id": r.model, "object": "model", "created": 0, "owned_by": "meshnode",
                 "meshnode": {"revision": r.revision, "epoch": list(r.epoch),
                              "stages": [{"node_id": h.node, "layers": [h.start, h.end]} for h in r.hops]}}
                for r in self.node.driver.served()]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Any:
        return await self._openai(request, chat=False)

    async def chat(self, request: Request) -> Any:
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, chat: bool) -> Any:
        body = await _body(request)
        p, events = await self.run(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, token: Any = None, first: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {"role": "assistant"} if first else {}
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": finish}
                out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": p.model,
                       "choices": [choice]}
            else:
                out = {"id": rid, "object": "text_completion", "created": created, "model": p.model,
                       "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}
            if token is not None:  # meshnode's extension: the token id and the plan epoch that produced it
                out["meshnode"] = {"token_id": token.id, "epoch": list(token.epoch)}
            return out

        if p.stream:
            async def sse() -> AsyncIterator[bytes]:
                try:
                    if chat:
                        yield _sse(chunk(None, None, first=True))
                    async for ev in events:
                        if ev[0] == "delta":
                            yield _sse(chunk(ev[1], None, ev[2]))
                        else:
                            out: Outcome = ev[1]
                            final = chunk(None, out.finish_reason)
                            final["usage"] = _usage(out)
                            final["meshnode"] = _details(out)
                            yield _sse(final)
                except MeshError as err:
                    yield _sse({"error": openai_error(err)})
                yield b"data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = await _last(events)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text},
                                      "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": p.model, "choices": [choice],
                             "usage": _usage(out), "meshnode": _details(out)})

    async def request(self, request: Request) -> JSONResponse:
        """``POST /api/request``: one generation, answered with meshnode's details; or, for the seeds'
        InferenceRequestPayload (``model_id`` and ``input_data``), the seeds' InferenceRequestResponse."""
        body = await _body(request)
        if "input_data" in body:
            return await self._seed_request(body)
        body.setdefault("temperature", 0.0)  # meshnode's own endpoint defaults to greedy
        p, events = await self.run(body, chat="messages" in body, default_max=64)
        out = await _last(events)
        return JSONResponse({"request_id": body.get("request_id") or secrets.token_hex(8), "model": p.model,
                             "text": out.text, "finish_reason": out.finish_reason, "usage": _usage(out)}
                            | _details(out))

    async def _seed_request(self, body: dict[str, Any]) -> JSONResponse:
        """The seeds' InferenceRequestPayload ``{"device_id", "timestamp", "model_id", "input_data": {"text",
        "max_length"}}`` (``max_length``: new tokens, greedy). The answer is the seeds' InferenceRequestResponse
        (``success``, ``message``, ``request_id``, ``selected_nodes``, ``model_split_plan``,
        ``estimated_total_time``, ``fallback_nodes``) plus ``output: {text, token_ids}`` and meshnode's details;
        a failure is ``success: false`` with the message and the stable ``code``, at the error's HTTP status."""
        request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else secrets.token_hex(8)
        try:
            data = body["input_data"]
            if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not data["text"]:
                raise _invalid("input_data.text (the prompt) is required", "input_data")
            model = body.get("model_id")
            if not isinstance(model, str) or not model:
                raise _invalid("model_id is required", "model_id")
            new = data.get("max_length", 64)
            p, events = await self.run({"model": model, "prompt": data["text"], "max_tokens": new,
                                        "temperature": 0.0}, chat=False, default_max=64)
            out = await _last(events)
        except MeshError as err:
            retry = getattr(err, "retry_after", None)
            return JSONResponse({"success": False, "message": str(err), "code": err.code, "request_id": request_id},
                                status_code=err.http_status,
                                headers={"Retry-After": str(retry)} if isinstance(retry, int) else None)
        answer: dict[str, Any] = {"success": True, "message": "Inference request processed successfully",
                                  "request_id": request_id, "selected_nodes": [], "model_split_plan": None,
                                  "estimated_total_time": None, "fallback_nodes": []}
        held = self.node.plans.book.current.get(ModelRef.of(p.model).model)
        if held is not None:
            plan = held.plan.view(tokens=len(out.token_ids))
            answer |= {k: plan[k] for k in ("model_split_plan", "estimated_total_time", "fallback_nodes")}
            answer["selected_nodes"] = [self._seed_node(n) for n in plan["selected_nodes"]]
        answer["output"] = {"text": out.text, "token_ids": out.token_ids}
        return JSONResponse(answer | {"model": p.model, "finish_reason": out.finish_reason, "usage": _usage(out),
                                      "meshnode": _details(out)})

    def _seed_node(self, row: dict[str, Any]) -> dict[str, Any]:
        """A plan's selected node in the seeds' shape: its API endpoint and hardware from its heartbeat."""
        node_id = row["node_id"]
        member = self.node.core.membership.get(node_id)
        info = member.info if member is not None else None
        hw = info.hardware if info is not None else None
        gpu = hw.gpus[0] if hw is not None and hw.gpus else None
        return row | {
            "endpoint": (info.api.removeprefix("http://") if info is not None else ""),
            "capabilities": row["capabilities"] | {
                "max_memory_gb": hw.memory_gb if hw is not None else 0.0,
                "gpu_type": gpu.name if gpu is not None else None,
                "gpu_memory_gb": gpu.memory_gb if gpu is not None else 0.0,
                "cpu_cores": hw.cpu_cores if hw is not None else 0,
                "network_bandwidth_mbps": (info.device.get("network_bandwidth_mbps") if info else None),  # reported
                "supported_models": [ModelRef.of(m).model for m in info.installed_models] if info else []},
            "latency": row["latency_ms"]}

    async def serve_model(self, request: Request) -> JSONResponse:
        body = await _body(request)
        selection = body.get("model_selection")  # the seeds' ModelSelectionPayload
        if selection is not None:
            if not isinstance(selection, dict):
                raise _invalid("model_selection must be an object with a model_id", "model_selection")
            spec = selection.get("model_id")
        else:
            spec = body.get("model_id", body.get("model"))
        if not isinstance(spec, str) or not spec:
            raise _invalid("model_id (or model_selection.model_id) is required", "model_id")
        answer = await self.node.request_serve(spec)
        if selection is not None:  # echoed, not acted on: training is not what this mesh does
            answer["model_selection"] = {k: v for k in ("model_id", "model_name", "selected_at", "selection_reason")
                                         if isinstance(v := selection.get(k), str)}
        return JSONResponse(answer, status_code=202)

    async def serving(self, request: Request) -> JSONResponse:
        return JSONResponse(self.node.serving(request.query_params.get("model")))

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/api/request", self.request, methods=["POST"]),
            Route("/api/model", self.serve_model, methods=["POST"]),
            Route("/api/model", self.serving),
        ]


async def _last(events: AsyncIterator[Any]) -> Outcome:
    out = None
    async for ev in events:
        if ev[0] == "done":
            out = ev[1]
    assert out is not None
    return out


def _usage(out: Outcome) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
            "total_tokens": out.prompt_tokens + len(out.token_ids)}


def _details(out: Outcome) -> dict[str, Any]:
    return {"token_ids": out.token_ids, "route": out.route, "epochs": out.epochs, "failovers": out.failovers,
            "timings": out.timings()}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def openai_error(err: MeshError) -> dict[str, Any]:
    kind = "invalid_request_error" if err.http_status < 500 else "server_error"
    if err.http_status == 404:
        kind = "not_found_error"
    if err.http_status == 503:
        kind = "service_unavailable"
    return {"message": str(err), "type": kind, "param": getattr(err, "param", None), "code": err.code}

"""The API token (``--api-token``, ``api.token``, ``$MESHNODE_API_TOKEN``): with one set, every route of the peer's
real HTTP app but ``GET /api/health`` answers 401 ``UNAUTHORIZED`` without it or with a wrong one, and its own 2xx
with it; the routes are read from the app, so a new route cannot slip through. Without a token and on loopback
the API stays open. A non-loopback bind without a token makes one in the data dir (0600) and reuses it; the CLI
finds it. In process, on the memory transport and a virtual clock (the real-process side:
tests/integration/test_api_token_process.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from seed_payloads import DEVICE_INFO, TRAINING_STATUS
from starlette.routing import Route
from tiny_models import chat_llama_folder

from mesh import config as config_mod
from mesh.admission import issue
from mesh.app.api import build_app
from mesh.app.client import API_TOKEN_FILE, TOKEN_HOW, client_token, read_token_file
from mesh.app.inproc import InProcessMesh
from mesh.app.main import with_api_token
from mesh.config import Config, InferenceConfig
from mesh.errors import MeshError
from mesh.identity import Identity

TOKEN = "s3cret-Token_42"
MODEL = "llama"
#: What answers without the token (the test's own list: the app's could shrink or grow unseen): the liveness probe
#: and the console's page, script and style sheet (its data requests send the token).
OPEN = {("GET", "/api/health"), ("HEAD", "/api/health"), ("GET", "/"), ("HEAD", "/"),
        *((m, f"/console/{f}") for f in ("console.js", "console.css") for m in ("GET", "HEAD"))}


def with_token(token: str) -> Config:
    c = Config()
    return dataclasses.replace(c, api=dataclasses.replace(c.api, token=token),
                               coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05, objective="throughput"),
                               inference=InferenceConfig(recovery_timeout=20.0, step_timeout=10.0,
                                                         compute_dtype="float32"))


def concrete(path: str) -> str:
    """A route's path template with every parameter filled: the middleware answers before any route matches."""
    return re.sub(r"\{[^}]+\}", "x", path)


def every_route(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app, HEAD included where Starlette adds it to GET."""
    assert all(type(r) is Route for r in app.routes), "a Mount or other kind of route: the matrix must cover it"
    out = sorted({(m, r.path) for r in app.routes for m in r.methods})
    assert len(out) > 40, out  # the matrix sees the whole app (30 routes with their HEADs today)
    return out


def good_requests(ctx: dict[str, Any]) -> dict[tuple[str, str], tuple[str, Any]]:
    """One valid request per route (method, template) → (path, JSON body): with the token each answers 2xx."""
    m, other, version, file = MODEL, ctx["other"], ctx["version"], ctx["file"]
    gen = {"model": m, "prompt": "Hello world", "max_tokens": 2, "ignore_eos": True}
    return {
        ("GET", "/api/health"): ("/api/health", None),
        ("GET", "/api/node-info"): ("/api/node-info", None),
        ("POST", "/api/node-info"): ("/api/node-info", DEVICE_INFO),
        ("GET", "/api/nodes"): ("/api/nodes", None),
        ("GET", "/api/node-health"): ("/api/node-health", None),
        ("GET", "/api/coordinator"): ("/api/coordinator", None),
        ("GET", "/api/ping"): (f"/api/ping?node_id={other}", None),
        ("GET", "/api/runtime"): ("/api/runtime", None),
        ("POST", "/api/training-data"): ("/api/training-data", TRAINING_STATUS),
        ("GET", "/api/plan"): ("/api/plan", None),
        ("POST", "/api/plan"): ("/api/plan", {"model": m}),
        ("POST", "/api/reassign-node"): ("/api/reassign-node", {
            "failed_nodes": [other], "model": m,
            "current_splits": [{"layer_range": [0, ctx["half"]], "assigned_node": ctx["self"]},
                               {"layer_range": [ctx["half"], ctx["layers"]], "assigned_node": other}]}),
        ("GET", "/api/models"): ("/api/models", None),
        ("GET", "/api/models/{model_id:path}"): (f"/api/models/{m}", None),
        ("GET", "/api/model-usage/ranking"): ("/api/model-usage/ranking", None),
        ("GET", "/api/transfers"): ("/api/transfers", None),
        ("POST", "/api/transfers"): ("/api/transfers", {"model": m}),
        ("GET", "/api/transfers/{transfer_id}"): (f"/api/transfers/{ctx['transfer']}", None),
        ("POST", "/api/transfers/{transfer_id}/pause"): (f"/api/transfers/{ctx['queued']}/pause", None),
        ("POST", "/api/transfers/{transfer_id}/resume"): (f"/api/transfers/{ctx['queued']}/resume", None),  # after
        ("POST", "/api/transfers/{transfer_id}/cancel"): (f"/api/transfers/{ctx['failed']}/cancel", None),
        ("GET", "/storage/models/{rest:path}"): (f"/storage/models/{m}/{version}/{file}", None),
        ("GET", "/v1/models"): ("/v1/models", None),
        ("POST", "/v1/completions"): ("/v1/completions", gen),
        ("POST", "/v1/chat/completions"): ("/v1/chat/completions", {
            "model": m, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "ignore_eos": True}),
        ("POST", "/api/request"): ("/api/request", gen),
        ("POST", "/api/model"): ("/api/model", {"model_id": m}),
        ("GET", "/api/model"): ("/api/model", None),
        ("POST", "/api/invite"): ("/api/invite", {"ttl": 60, "uses": 1}),
        ("POST", "/api/revoke"): ("/api/revoke", {"node_id": ctx["carol"]}),  # a member made for it
        ("GET", "/api/members"): ("/api/members", None),
        ("GET", "/"): ("/", None),
        ("GET", "/console/{name}"): ("/console/console.js", None),
        ("GET", "/api/console"): ("/api/console", None),
        ("GET", "/metrics"): ("/metrics", None),
        ("POST", "/api/drain"): ("/api/drain", None),  # sent last: the peer starts draining
    }


async def send(http: httpx.AsyncClient, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    return await http.request(method, path, json=body, headers=headers or {})


def assert_refused(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer"), what
    if r.request.method != "HEAD":
        err = r.json()["error"]
        assert err["code"] == "UNAUTHORIZED" and err["type"] == "invalid_request_error", (what, err)
        assert set(err) == {"code", "message", "type", "param"} and TOKEN not in err["message"], what


async def test_every_route_but_health_needs_the_token_and_answers_with_it(
        tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    folder = chat_llama_folder(tmp_path / "src")
    async with InProcessMesh(tmp_path / "mesh", with_token(TOKEN)) as mesh:
        for name in "ab":
            mesh.store(name).add(str(folder), model_id=MODEL)
        peers = [await mesh.start(name) for name in "ab"]
        await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
        # The routes are asked of the coordinator (POST /api/plan is its alone to answer), pinged to the other.
        a, b = sorted(peers, key=lambda p: p.node_id != p.node.core.leadership.coordinator)
        await a.node.request_serve(MODEL)
        await mesh.wait(lambda: a.node.driver.route(MODEL), timeout=60, what="the model served")
        app = build_app(a.node)
        routes = every_route(app)
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://peer") as http:
            caplog.set_level(logging.WARNING, logger="mesh.app.api")
            for method, template in routes:
                path = concrete(template)
                if (method, template) in OPEN:
                    assert (await send(http, method, path)).status_code == 200, (method, path)
                    continue
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
                                {"X-Api-Key": TOKEN}):
                    assert_refused(await send(http, method, path, headers=headers), f"{method} {path} {headers}")
                for query in (f"token={TOKEN}", f"api_key={TOKEN}", f"access_token={TOKEN}"):  # never in a URL
                    assert_refused(await send(http, method, f"{path}?{query}"), f"{method} {path}?{query}")
            assert (await send(http, "POST", "/api/health")).status_code == 401  # only GET (and HEAD) are open
            for method, path in sorted(OPEN):  # the console's files by name too (their route is a template)
                assert (await send(http, method, path)).status_code == 200, (method, path)
            assert b.node.core.status.value == "ready" and not a.node.drain_requested.is_set()  # nothing ran

            # Refusals are logged with their code, rate-limited per client and reason, and never with the token.
            refusals = [r for r in caplog.records if getattr(r, "code", None) == "UNAUTHORIZED"]
            assert 1 <= len(refusals) <= 12, len(refusals)  # 5 reasons; hundreds of refused requests
            assert all(TOKEN not in r.getMessage() for r in caplog.records)

            r = await send(http, "POST", "/api/transfers", {"model": MODEL}, authorized)
            b.node.store.add(str(folder), model_id="spare")  # a fetches it: a transfer to pause and resume
            await mesh.wait(lambda: a.node.library.holders("spare", None), timeout=10, what="b to advertise spare")
            for token in range(a.node.fetcher.slots.capacity):  # every download slot taken: "spare" stays queued
                assert a.node.fetcher.slots.ask(-1 - token, 100, 0, 0)
            queued = await send(http, "POST", "/api/transfers", {"model": "spare", "priority": "low"}, authorized)
            failed = await send(http, "POST", "/api/transfers", {"model": "held-by-nobody"}, authorized)
            await mesh.wait(lambda: a.node.fetcher.transfers[failed.json()["transfer"]["id"]].state == "error",
                            timeout=5, what="the fetch of a model nobody holds to fail")
            models = (await send(http, "GET", "/api/models", None, authorized)).json()
            plan = (await send(http, "GET", "/api/plan", None, authorized)).json()["plans"][0]
            layers = plan["model_split_plan"]["total_layers"]
            version = models[0]["versions"][0]
            ctx = {"layers": layers, "half": layers // 2, "self": a.node_id, "other": b.node_id,
                   "transfer": r.json()["transfer"]["id"], "version": version["version"],
                   "queued": queued.json()["transfer"]["id"], "failed": failed.json()["transfer"]["id"],
                   "file": version["files"][0]["path"], "carol": Identity.generate().node_id}
            gate = a.node.gate
            gate.roster.add_chain(issue(gate.membership.chain, a.node.identity, ctx["carol"], trio.current_time()))
            good = good_requests(ctx)
            assert sorted({(m, t) for m, t in routes if m != "HEAD"} - set(good)) == [], "a route the table lacks"
            assert sorted(set(good) - set(routes)) == [], "a table entry for no route"
            for method, template in sorted(routes, key=lambda mt: mt == ("POST", "/api/drain")):
                path, body = good[("GET" if method == "HEAD" else method, template)]
                r = await send(http, method, path, body, authorized)
                assert 200 <= r.status_code < 300, (method, path, r.status_code, r.text)
                r = await send(http, method, path, body, {"Authorization": f"bearer  {TOKEN} "})  # scheme any case
                assert r.status_code != 401, (method, path, r.text)
            assert a.node.drain_requested.is_set()


async def test_without_a_token_every_route_stays_open(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with InProcessMesh(tmp_path, with_token("")) as mesh:
        a = await mesh.start("a")
        app = build_app(a.node)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://peer") as http:
            for method, template in every_route(app):
                if template != "/api/drain":
                    r = await send(http, method, concrete(template))
                    assert r.status_code != 401 and "www-authenticate" not in r.headers, (method, template)


def cfg(tmp_path: Path, listen: str, token: str = "") -> Config:
    c = Config()
    return dataclasses.replace(c, node=dataclasses.replace(c.node, data_dir=str(tmp_path)),
                               api=dataclasses.replace(c.api, listen=listen, token=token))


def test_a_non_loopback_bind_without_a_token_makes_one_in_the_data_dir_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / API_TOKEN_FILE
    for listen in ("127.0.0.1:8470", "127.1.2.3:0", "[::1]:0", "localhost:8470", "unix:/tmp/x.sock", ""):
        assert with_api_token(cfg(tmp_path, listen)).api.token == "", listen  # open, as before
    assert not path.exists()
    assert with_api_token(cfg(tmp_path, "0.0.0.0:0", TOKEN)).api.token == TOKEN and not path.exists()
    made = with_api_token(cfg(tmp_path, "0.0.0.0:0")).api.token
    assert len(made) >= 43 and path.read_text() == made + "\n"  # 256 bits of secrets.token_urlsafe
    assert os.stat(path).st_mode & 0o777 == 0o600
    for listen in ("[::]:8470", "192.168.1.5:8470", ":8470", "my-host.lan:8470"):  # the same one, every start
        assert with_api_token(cfg(tmp_path, listen)).api.token == made, listen
    assert client_token(None, tmp_path, {}) == made
    assert client_token(None, tmp_path, {"MESHNODE_API_TOKEN": "env"}) == "env"
    assert client_token("flag", tmp_path, {"MESHNODE_API_TOKEN": "env"}) == "flag"
    assert client_token(None, tmp_path / "none", {}) is None


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / API_TOKEN_FILE
    with_api_token(cfg(tmp_path, "0.0.0.0:0"))
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        for read in (lambda: with_api_token(cfg(tmp_path, "0.0.0.0:0")), lambda: read_token_file(tmp_path)):
            with pytest.raises(MeshError) as refused:
                read()
            assert refused.value.code == "INSECURE_PERMISSIONS" and "chmod 600" in str(refused.value), oct(mode)
    os.chmod(path, 0o600)
    path.write_text("two words\n")
    with pytest.raises(MeshError) as bad:
        read_token_file(tmp_path)
    assert bad.value.code == "INVALID_CONFIG"


def test_the_token_comes_from_the_flag_over_the_environment_over_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[api]\ntoken = "from-file"\n')
    parser = __import__("argparse").ArgumentParser()
    config_mod.add_arguments(parser)
    env = {"MESHNODE_API_TOKEN": "from-env"}
    assert config_mod.build(parser.parse_args(["--config", str(toml)])).api.token == "from-file"
    assert config_mod.build(parser.parse_args(["--config", str(toml)]), environ=env).api.token == "from-env"
    flag = parser.parse_args(["--config", str(toml), "--api-token", "from-flag"])
    assert config_mod.build(flag, environ=env).api.token == "from-flag"
    assert config_mod.build(parser.parse_args([])).api.token == ""  # none: os.environ is only read when passed
    for bad in ("two words", "tab\there", "é"):
        with pytest.raises(MeshError) as refused:
            config_mod.build(parser.parse_args(["--api-token", bad]))
        assert refused.value.code == "INVALID_CONFIG", bad


def test_the_cli_names_how_to_pass_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 from the peer's API is one line on stderr that says how to give the token; the token the CLI
    found travels as a header (never in the URL)."""
    import urllib.request

    from mesh.app import cli

    sent: list[urllib.request.Request] = []

    def refuse(req: urllib.request.Request, timeout: float) -> Any:
        import io
        import urllib.error

        sent.append(req)
        body = b'{"error": {"code": "UNAUTHORIZED", "message": "no token", "type": "x", "param": null}}'
        raise urllib.error.HTTPError(req.full_url, 401, "Unauthorized", {}, io.BytesIO(body))  # type: ignore[arg-type]

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv("MESHNODE_API_TOKEN", raising=False)
    with_api_token(cfg(tmp_path, "0.0.0.0:0"))
    made = read_token_file(tmp_path)
    capsys.readouterr()  # its log line (an earlier test's logs.setup may have left a handler on a closed stream)
    calls: list[Callable[[], list[str]]] = [
        lambda: ["status", "--api", "127.0.0.1:1", "--data-dir", str(tmp_path)],
        lambda: ["drain", "--api", "127.0.0.1:1", "--data-dir", str(tmp_path)],
        lambda: ["generate", "hi", "--api", "127.0.0.1:1", "--data-dir", str(tmp_path)],
        lambda: ["models", "--data-dir", str(tmp_path), "pull", "m", "--api", "127.0.0.1:1", "--quiet"],
    ]
    for argv in calls:
        assert cli.main(argv()) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "UNAUTHORIZED" in err and TOKEN_HOW in err, err
        assert sent[-1].get_header("Authorization") == f"Bearer {made}" and made not in sent[-1].full_url
    assert cli.main(["status", "--api", "127.0.0.1:1", "--api-token", "flag", "--data-dir", str(tmp_path)]) == 2
    assert sent[-1].get_header("Authorization") == "Bearer flag"
    assert cli.main(["status", "--api", "127.0.0.1:1", "--data-dir", str(tmp_path / "none")]) == 2
    assert sent[-1].get_header("Authorization") is None

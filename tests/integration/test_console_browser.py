"""The console in a real browser: headless Chromium (Debian's ``chromium``), driven over the DevTools protocol with
trio-websocket, loads ``GET /`` of a 3-peer mesh of real ``meshnode start`` processes serving a tiny chat model,
with an API token set. The page loads without the token and asks for it; then it shows the three peers, the
coordinator and the plan as the API does; a question typed into the chat box streams an answer equal to
``/v1/chat/completions``; after a kill -9 of a peer its card turns offline within 5 s. Every request the page
made went to the peer, each data request with the token as a header and never in a URL. ``meshnode status
--watch`` draws the same mesh. Screenshots are kept in the test's tmp dir (``console-*.png``). Skipped, with why,
only when no Chromium can be found."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console
from tiny_models import chat_llama_folder
from trio_websocket import WebSocketConnection, open_websocket_url

from coordinator.service import planner_layers
from mesh.app.cli import main as cli
from mesh.app.cli import watch_status
from mesh.app.client import api_get
from mesh.app.localmesh import LocalMesh, PeerProcess, agreed, wait_for
from mesh.identity import Identity
from storage.store import Store

pytestmark = pytest.mark.integration
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "local-3.toml")
TOKEN = "console-Token_7"
MODEL = "tiny-chat"
QUESTION = "Hello world"
MAX_TOKENS = 24  # typed into the page's max tokens field
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Everything that could make Chromium talk to anything but the page's peer is off, and no name resolves but
#: 127.0.0.1 (the peers are reached by that address).
CHROMIUM_FLAGS = (
    "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--no-pings", "--metrics-recording-only", "--safebrowsing-disable-auto-update", "--password-store=basic",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1440,1100",
    "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
)


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevTools:
    """One page over the DevTools protocol: commands answered by id, events kept in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._ids = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.shots: Path | None = None  # where a wait that timed out leaves a screenshot

    async def read(self) -> None:
        while True:
            msg = json.loads(await self.ws.get_message())
            if "id" in msg:
                await self._waiting.pop(msg["id"]).send(msg)
            else:
                self.events.append(msg)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[self._ids] = send
        await self.ws.send_message(json.dumps({"id": self._ids, "method": method, "params": params}))
        with trio.fail_after(30):
            msg = await receive.receive()
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float, what: str) -> Any:
        """The value of ``expression`` once it is truthy, polled every 50 ms (an expression that throws, e.g.
        before the page has loaded, counts as not yet); AssertionError naming ``what`` after ``timeout``."""
        last: Any = None
        with trio.move_on_after(timeout):
            while True:
                try:
                    if value := await self.js(expression):
                        return value
                    last = value
                except RuntimeError as err:
                    last = err
                await trio.sleep(0.05)
        if self.shots is not None:
            await self.screenshot(self.shots / "console-timed-out.png")
        raise AssertionError(f"waited {timeout}s for {what}; last: {last!r}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def enter(self) -> None:
        """Press and release Enter in the focused element, as a keyboard does."""
        await self.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
                        text="\r", unmodifiedText="\r")
        await self.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


@asynccontextmanager
async def browser(exe: str, profile: Path) -> AsyncIterator[DevTools]:
    """Chromium on a fresh profile, and its one page over the DevTools protocol."""
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *(("--no-sandbox",) if os.geteuid() == 0 else ()),
           "about:blank"]
    with open(profile.parent / "chromium.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        port = await trio.to_thread.run_sync(lambda: wait_for(
            lambda: port_file.exists() and port_file.read_text().split("\n")[0], 30, 0.05, "Chromium's DevTools port"))

        def page() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        url = await trio.to_thread.run_sync(lambda: wait_for(page, 30, 0.05, "Chromium's page"))
        async with open_websocket_url(url, max_message_size=64 * 2**20) as ws, trio.open_nursery() as nursery:
            tools = DevTools(ws)
            nursery.start_soon(tools.read)
            for domain in ("Page", "Network", "Runtime", "Log"):
                await tools.call(f"{domain}.enable")
            yield tools
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: What the page shows, read from its DOM: the cards (node id, status, coordinator or not), the plans' segments
#: (node, layers, ready) and the last chat answer.
PAGE_STATE = """(() => ({
  snapshots: Number(document.body.dataset.snapshots || 0),
  tokenAsked: !document.getElementById("token-dialog").hidden,
  cards: [...document.querySelectorAll("#peers .card")].map(c => ({
    node: c.dataset.nodeId, status: c.dataset.status, coordinator: c.classList.contains("coordinator"),
    name: c.querySelector(".name").textContent})),
  plans: [...document.querySelectorAll("#plans .plan")].map(p => ({
    model: p.dataset.model, epoch: Number(p.dataset.epoch),
    segs: [...p.querySelectorAll(".seg")].map(s => [s.dataset.node, Number(s.dataset.start), Number(s.dataset.end),
                                                    s.dataset.ready === "true"])})),
  answer: (() => { const a = [...document.querySelectorAll("#chat-log .msg.assistant")].pop();
    return a ? {state: a.dataset.state, text: a.querySelector(".text").textContent, chunks: Number(a.dataset.chunks),
                reads: Number(a.dataset.reads), route: a.querySelectorAll(".route .hop").length,
                details: a.querySelector(".details").textContent} : null; })(),
}))()"""


async def shown(page: DevTools, condition: str, timeout: float, what: str) -> dict[str, Any]:
    """``PAGE_STATE`` once ``condition`` (JavaScript over it, named ``s``) holds."""
    return await page.until(f"(s => ({condition}) && s)({PAGE_STATE})", timeout, what)


def start_mesh(mesh: LocalMesh) -> list[PeerProcess]:
    """a, then b and c at once (each joins with an invite from a), all with the API token."""
    a = mesh.start_peer("peer-a")
    a.token = TOKEN  # given with --api-token, so LocalMesh finds no token file: it asks a for invites with it
    rest = [mesh.launch(name, a.addrs[:1]) for name in ("peer-b", "peer-c")]
    peers = [a, *(mesh.wait_started(p) for p in rest)]
    for p in peers:
        p.token = TOKEN
    return peers


def test_the_console_shows_the_mesh_streams_a_chat_answer_and_marks_a_killed_peer_offline(tmp_path: Path) -> None:
    exe = find_chromium()
    if exe is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    folder = chat_llama_folder(tmp_path / "model")
    store = tmp_path / "mesh" / "peer-a" / "store"
    assert cli(["models", "--data-dir", str(store.parent), "add", str(folder), "--id", MODEL]) == 0
    shutil.copytree(store, tmp_path / "mesh" / "peer-b" / "store")  # b holds it too; c holds nothing: it fetches
    manifest = Store(store, Identity.generate()).manifest(MODEL)[0]
    need = sum(x.bytes for x in planner_layers(manifest, 2048))
    # Each peer offers just under half of what the model needs with its KV cache (room for two of its four
    # blocks): no two peers can hold it, the plan needs all three. Compute and bandwidth are pinned and the
    # start-up benchmarks skipped: a busy machine's numbers never decide the plan, and the peers start sooner.
    offer = ("--max-layer-memory-mb", f"{0.495 * need / 2**20:.6f}", "--compute-gflops", "50",
             "--memory-bandwidth-gbps", "10", "--benchmark-seconds", "0", "--hop-ms", "0.05", "--api-token", TOKEN)
    profile = tmp_path / "chromium" / "profile"
    profile.mkdir(parents=True)
    with LocalMesh(tmp_path / "mesh", config_file=CONFIG, extra_args=offer) as mesh:
        peers = start_mesh(mesh)
        wait_for(lambda: agreed(peers), 30, what="one coordinator")
        api_get(peers[0].api, "/api/model", method="POST", body={"model_id": MODEL}, token=TOKEN)
        trio.run(drive, exe, profile, peers, tmp_path)


async def drive(exe: str, profile: Path, peers: list[PeerProcess], shots: Path) -> None:
    a = peers[2]  # the console of c, which holds no model: it shows the transfer of its stage's shards too
    get = lambda path: trio.to_thread.run_sync(lambda: api_get(a.api, path, token=TOKEN))  # noqa: E731
    async with browser(exe, profile) as page:
        page.shots = shots
        await page.call("Page.navigate", url=f"{a.api}/")
        await page.until("!document.getElementById('token-dialog').hidden", 20, "the page to ask for the token")
        await page.screenshot(shots / "console-1-token.png")
        await page.js("document.getElementById('token-input').focus()")
        await page.call("Input.insertText", text=TOKEN)
        await page.enter()

        # The three peers, the coordinator and the plan, as the API tells them, every stage ready.
        plan = await trio.to_thread.run_sync(lambda: wait_for(
            lambda: next((p for p in api_get(a.api, "/api/plan", token=TOKEN)["plans"] if p["model"] == MODEL
                          and len(p["model_split_plan"]["splits"]) == 3), None), 60, what="a 3-stage plan"))
        want_segs = [[s["assigned_node"], *s["layer_range"], True] for s in plan["model_split_plan"]["splits"]]
        state = await shown(page, f"""s.cards.length === 3 && s.cards.every(c => c.status === "ready")
            && s.plans.some(p => p.epoch === {plan['epoch']} && p.segs.length === 3 && p.segs.every(g => g[3]))""",
                            60, "three ready peers and the plan, every stage ready")
        nodes = await get("/api/nodes")
        assert {c["node"] for c in state["cards"]} == {p.node_id for p in peers}
        assert [c["node"] for c in state["cards"] if c["coordinator"]] == [nodes["coordinator"]]
        assert {c["name"] for c in state["cards"]} == {"peer-a", "peer-b", "peer-c"}
        bar = next(p for p in state["plans"] if p["model"] == MODEL)
        assert bar["segs"] == want_segs and bar["epoch"] == plan["epoch"]
        await page.screenshot(shots / "console-2-mesh.png")

        # A question typed into the chat box streams the answer /v1/chat/completions gives.
        await page.until(f"document.getElementById('chat-model').value === {json.dumps(MODEL)}", 10, "the model")
        await page.js("document.getElementById('chat-max').select()")
        await page.call("Input.insertText", text=str(MAX_TOKENS))
        await page.js("document.getElementById('chat-input').focus()")
        await page.call("Input.insertText", text=QUESTION)
        await page.enter()
        answer = (await shown(page, 's.answer && s.answer.state !== "streaming"', 60, "the answer"))["answer"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
                "temperature": 0}
        direct = await trio.to_thread.run_sync(lambda: api_get(a.api, "/v1/chat/completions", method="POST",
                                                               body=body, token=TOKEN, timeout=60))
        assert answer["state"] == "done", answer
        assert answer["text"] == direct["choices"][0]["message"]["content"] and answer["text"], (answer, direct)
        assert answer["chunks"] > 1 and answer["reads"] > 1 and answer["route"] == 3, answer  # streamed; its route
        assert "first token" in answer["details"] and "tokens/s" in answer["details"], answer
        await page.until("Number(document.getElementById('chart-tps').dataset.peak) > 0", 10, "tokens/s charted")
        await page.screenshot(shots / "console-3-chat.png")

        # kill -9 of a peer (not the page's): its card turns offline within 5 s.
        victim = peers[1]
        victim.proc.kill()
        killed = time.monotonic()
        await shown(page, f's.cards.some(c => c.node === "{victim.node_id}" && c.status === "offline")', 5,
                    "the killed peer's card offline")
        print(f"console: the killed peer's card was offline {time.monotonic() - killed:.1f}s after kill -9")
        await page.screenshot(shots / "console-4-offline.png")

        # status --watch draws the same mesh, the plan as a bar.
        console = Console(record=True, width=150, file=io.StringIO())
        await trio.to_thread.run_sync(lambda: watch_status(a.api, TOKEN, interval=0.05, rounds=2, console=console))
        drawn = console.export_text()
        assert all(name in drawn for name in ("peer-a", "peer-b", "peer-c", "offline", "coordinator", MODEL)), drawn
        assert "] 7 layers" in drawn and "ready" in drawn, drawn  # the plan as a bar of its 7 layers

        # Every request went to the peer; every data request carried the token in a header, none in its URL.
        requests = [e["params"]["request"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
        urls = [r["url"] for r in requests]
        assert urls and all(u.startswith(f"{a.api}/") or u.startswith("data:") for u in urls), urls
        assert all(TOKEN not in u for u in urls), urls
        data = [r for r in requests if r["url"].startswith((f"{a.api}/api/", f"{a.api}/v1/", f"{a.api}/metrics"))]
        sent = [r["headers"].get("Authorization") for r in data]
        assert data and sent[0] is None and sent[1:] and all(h == f"Bearer {TOKEN}" for h in sent[1:]), sent
        assert f"{a.api}/" in urls and f"{a.api}/console/console.js" in urls
        problems = [e["params"] for e in page.events if e["method"] == "Runtime.exceptionThrown" or (
            e["method"] == "Log.entryAdded" and e["params"]["entry"]["source"] in ("security", "javascript"))]
        assert problems == [], problems  # no script error, no content-security-policy violation

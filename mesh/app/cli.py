"""``meshnode``: start a peer, look at the mesh, drain a peer, run the local demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from mesh import config as config_mod
from mesh import logs
from mesh.app.client import (
    API_TOKEN_FILE,
    add_progress,
    api_get,
    client_token,
    control,
    failed,
    format_status,
    pull_many,
    stream_events,
)
from mesh.errors import MeshError, NotFoundError
from storage.formats import WEIGHTS

log = logging.getLogger("meshnode")
DEFAULT_API = "127.0.0.1:8470"


# ---- start --------------------------------------------------------------------------------------


async def _start(cfg: config_mod.Config, token_file: Path | None) -> None:
    # Signals are caught from the start, so a SIGTERM during start-up still drains cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _serve_until_drained(cfg, signals, token_file)


async def _serve_until_drained(cfg: config_mod.Config, signals: AsyncIterator[int],
                               token_file: Path | None = None) -> None:
    from mesh.app import main as peer_main
    from mesh.app.node import Node

    async with trio.open_nursery() as nursery:

        async def run_peer(task_status: trio.TaskStatus[Node]) -> None:
            await peer_main.run(cfg, task_status=task_status)
            nursery.cancel_scope.cancel()  # the peer has drained and closed: stop the signal watcher

        peer = await nursery.start(run_peer)
        print(f"meshnode peer {peer.node_id}", flush=True)
        for addr in peer.transport.addrs():
            print(f"  bootstrap address: {addr}", flush=True)
        if peer.api_url:
            print(f"  api: {peer.api_url}", flush=True)
            if token_file is not None:  # the user did not choose this token: say where it is
                print(f"  api token (in {token_file}): {cfg.api.token}", flush=True)
        async for sig in signals:
            if peer.drain_requested.is_set():
                log.warning("second signal: stopping now")
                nursery.cancel_scope.cancel()
                return
            log.info("signal %s: draining", signal.Signals(sig).name)
            peer.request_drain()


def cmd_start(args: argparse.Namespace) -> int:
    configured = config_mod.build(args, environ=os.environ)
    from mesh import transport  # noqa: F401  importing libp2p resets its logger: configure logging after it
    from mesh.app import main as peer_main

    logs.setup(configured.log.level, configured.log.json)
    cfg = peer_main.with_api_token(configured)  # here, so a refused token file ends with its code, not a trace
    token_file = cfg.data_path / API_TOKEN_FILE if cfg.api.token != configured.api.token else None
    trio.run(_start, cfg, token_file)
    return 0


# ---- status / drain -----------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str | None:
    """The token for the peer's API: --api-token, $MESHNODE_API_TOKEN, or the peer's file in --data-dir."""
    return client_token(args.api_token, args.data_dir, os.environ)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return watch_status(args.api, _token(args), interval=args.interval)
    nodes = api_get(args.api, "/api/nodes", token=_token(args))
    if args.json:
        print(json.dumps(nodes, indent=2))
    else:
        print(format_status(nodes))
    return 0


#: Colours and fill characters of the peers in ``status --watch`` (the fill tells peers apart without colour).
PEER_STYLES = ("blue", "green", "dark_orange", "magenta", "cyan", "deep_pink3", "chartreuse4", "purple")
PEER_FILLS = "█▓▒░#=+*"
STATUS_STYLES = {"ready": "green", "degraded": "yellow", "draining": "blue", "registering": "dim", "offline": "red"}
#: Characters of a plan bar in ``status --watch``.
BAR_WIDTH = 48


def plan_bar(splits: list[tuple[str, int, int]], total: int, width: int = BAR_WIDTH) -> list[tuple[str, int]]:
    """A plan as runs of a text bar: (node id, characters) per stage ``(node, start, end)``, in order, every stage
    at least one character, ``width`` in all (more only when there are more stages than characters)."""
    if not splits:
        return []
    total = max(total, max(end for _, _, end in splits), 1)
    cells, done = [], 0
    for i, (node, _, end) in enumerate(splits):
        upto = width if i == len(splits) - 1 else round(width * end / total)
        n = max(1, upto - done)
        cells.append((node, n))
        done += n
    return cells


def _mark(i: int) -> tuple[str, str]:
    """The fill character and colour of the ``i``-th peer."""
    return PEER_FILLS[i % len(PEER_FILLS)], PEER_STYLES[i % len(PEER_STYLES)]


def _stage(key: str) -> str:
    """``model@revision:start:end[:dtype]`` as ``model start-end``."""
    ref, start, end = key.split(":")[:3]
    return f"{ref.split('@')[0]} {start}-{end}"


def status_view(snap: dict[str, Any]) -> Any:
    """``GET /api/console`` as rich renderables: the peers' table, then each plan as a bar of its layers."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = sorted(snap["nodes"]["nodes"], key=lambda r: (r.get("name") or r["node_id"], r["node_id"]))
    style = {r["node_id"]: i for i, r in enumerate(rows)}
    name = {r["node_id"]: r.get("name") or r["node_id"][:12] for r in rows}
    term = snap["nodes"]["term"]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("", "NAME", "NODE", "STATUS", "ROLE", "CPU", "FREE/MEM GB", "LOAD", "HEARTBEAT", "STAGES"):
        table.add_column(column, no_wrap=column != "STAGES")
    for r in rows:
        hw, hb = r["hardware"], r.get("heartbeats") or {}
        fill, colour = _mark(style[r["node_id"]])
        role = " ".join(x for x in ("coordinator" * r["is_coordinator"], "(self)" * r["is_self"]) if x)
        stages = ", ".join(_stage(k) for k in r.get("stages", []))
        beats = f"{hb.get('mean_s', 0):.2f}s, {hb.get('off_pace', 0) + hb.get('missed', 0)} off" if hb else "-"
        table.add_row(Text(fill, style=colour), name[r["node_id"]], r["node_id"][:16] + "…",
                      Text(r["status"], style=STATUS_STYLES.get(r["status"], "")), role, str(hw["cpu_cores"]),
                      f"{hw['memory_free_gb']:.1f}/{hw['memory_gb']:.1f}", f"{hw['load']:.2f}", beats, stages or "-")
    parts: list[Any] = [table, Text("")]
    ready = {(m["model"], s["node_id"], s["layers"][0], s["layers"][1]): s["ready"]
             for m in snap["serving"]["models"] for s in m.get("stages", [])}
    for plan in snap["plans"]["plans"]:
        splits = [(s["assigned_node"], *s["layer_range"]) for s in plan["model_split_plan"]["splits"]]
        total = plan["model_split_plan"]["total_layers"]
        line = Text(f"{plan['model']}  epoch {plan['epoch']} term {plan['term']}  ", style="bold")
        line.append("[")
        for node, n in plan_bar(splits, total):
            fill, colour = _mark(style.get(node, len(style)))
            line.append(fill * n, style=colour)
        line.append(f"] {total} layers")
        legend = Text("   ")
        for node, start, end in splits:
            fill, colour = _mark(style.get(node, len(style)))
            state = "ready" if ready.get((plan["model"], node, start, end), False) else "loading"
            legend.append(f"{fill} {name.get(node, node[:12])} {start}-{end} {state}   ", style=colour)
        parts += [line, legend]
        why = plan.get("why")
        if isinstance(why, dict):
            parts.append(Text("   why: " + ", ".join(f"{k} {v}" for k, v in why.items()
                                                        if isinstance(v, str | int | float)), style="dim"))
    if not snap["plans"]["plans"]:
        parts.append(Text("no model planned yet", style="dim"))
    lead = snap["nodes"]["coordinator"]
    parts.append(Text(f"\ncoordinator {name.get(lead, lead or '(none yet)')}  term {term}  ·  "
                      f"{time.strftime('%H:%M:%S', time.localtime(snap['time']))}  ·  Ctrl-C to stop", style="dim"))
    return Group(*parts)


def watch_status(api: str, token: str | None, *, interval: float = 1.0, rounds: int | None = None,
                 console: Any = None) -> int:
    """``meshnode status --watch``: the status table and plan bars redrawn in place every ``interval`` seconds
    (rich Live) until Ctrl-C (or ``rounds`` redraws). A peer that stops answering is said so, and retried."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    done = 0
    with Live(console=console or Console(), auto_refresh=False) as live:
        while rounds is None or done < rounds:
            try:
                view = status_view(api_get(api, "/api/console", token=token))
            except MeshError as err:
                if err.code == "UNAUTHORIZED":
                    raise
                view = Text(f"{api}: {err.code} {err} (retrying every {interval:g} s)", style="red")
            live.update(view, refresh=True)
            done += 1
            if rounds is None or done < rounds:
                time.sleep(interval)
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    reply = api_get(args.api, "/api/invite", method="POST", token=_token(args),
                    body={"ttl": args.ttl, "uses": args.uses})
    print(reply["token"])  # one line, to copy to the new peer: meshnode start --join TOKEN
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    reply = api_get(args.api, "/api/revoke", method="POST", token=_token(args), body={"node_id": args.node_id})
    print(f"{reply['revoked']} revoked from {reply['mesh']}: every member refuses it once it hears this")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    reply = api_get(args.api, "/api/members", token=_token(args))
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"mesh {reply['mesh']} (founder {reply['founder']})")
    for m in reply["members"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["admitted_at"]))
        by = "founder" if m["depth"] == 0 else f"admitted by {m['admitted_by']}"
        here = "  connected" if m["connected"] else ""
        print(f"{m['node_id']}  {when} UTC  {by}{here}")
    for node_id in reply["revoked"]:
        print(f"{node_id}  revoked")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    reply = api_get(args.api, "/api/drain", method="POST", token=_token(args))
    print(f"peer {reply['node_id']} is {reply['status']}; it goes offline and exits once drained")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mesh.app import demo

    cfg = config_mod.build(args)
    logs.setup("warning", False)
    return demo.main(cfg, args.config)


def _store(args: argparse.Namespace) -> Any:
    from mesh.keyfile import load_or_create
    from storage.store import Store

    data_dir = Path(args.data_dir).expanduser()
    return Store(data_dir / "store", load_or_create(data_dir))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _pull(args: argparse.Namespace) -> int:
    """``models pull MODEL...``: fetch them, one bar each and a total; ``--pause``/``--resume``/``--cancel``:
    act on their transfers (a model id or a transfer id each)."""
    action = next((a for a in ("pause", "resume", "cancel") if getattr(args, a)), None)
    if action is not None:
        for t in control(args.api, action, args.model, token=_token(args)):
            print(f"{t['id']} {t['model']}: {t['state']}, {_size(t['done_bytes'])} of {_size(t['total_bytes'])} here")
        return 0
    settled = pull_many(args.api, args.model, args.revision, args.source, priority=args.priority, quiet=args.quiet,
                        token=_token(args))
    for t in settled:
        if t["state"] == "done":
            print(f"{t['model']} ({t['revision']}): ready, {_size(t['done_bytes'])} in {t['elapsed_s']:.1f}s "
                  f"({_size(t['resumed_bytes'])} resumed) from {len(t['by_source'])} source(s)")
        elif t["state"] == "paused":
            print(f"{t['model']}: paused ({t['id']}), {_size(t['done_bytes'])} of {_size(t['total_bytes'])} here; "
                  f"meshnode models pull --resume {t['id']}")
    for t in settled:
        if t["state"] != "paused":
            failed(t)  # the first that is not done, with its code
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "pull":
        return _pull(args)
    store = _store(args)
    if args.models_command == "add":
        logs.setup("info", False)
        with add_progress(quiet=args.quiet) as report:
            manifest = store.add(args.source, revision=args.revision, model_id=args.id, weights=args.weights,
                                 progress=report)
        print(f"{manifest.model_id} ({manifest.revision}): ready, {len(manifest.shards)} shards, "
              f"{manifest.total_layers} layers, {_size(manifest.size)}, weights {'+'.join(manifest.formats)}")
        for note in manifest.notes:
            print(f"  {note}")
        return 0
    models = store.describe()
    if args.models_command == "show":
        match = [m for m in models if m["id"] == args.id]
        if not match:
            raise NotFoundError(f"no model {args.id!r} installed", code="UNKNOWN_MODEL")
        print(json.dumps(match[0], indent=2))
        return 0
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no models installed (meshnode models add SOURCE)")
    for m in models:
        for v in m["versions"]:
            default = " (default)" if v["version"] == m["default_version"] else ""
            layers = f"{v['layers']} layers  {v['weights']}" if "layers" in v else v.get("error") or ""
            print(f"{m['id']}  {v['version']}{default}  {v['status']}  {_size(v['size_bytes'])}  {layers}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What-if planning without a mesh: the plan as JSON on stdout; an infeasible input exits 2."""
    from coordinator import control, planner, plans, search

    def read(path: str, what: str) -> Any:
        try:
            return json.loads(Path(path).read_text())
        except OSError as exc:
            raise MeshError(f"cannot read {what} file {path}: {exc}", code="INVALID_PLAN_INPUT") from None
        except ValueError as exc:
            raise MeshError(f"{what} file {path} is not JSON: {exc}", code="INVALID_PLAN_INPUT") from None

    layers = planner.parse_layers(read(args.layers, "layers"))
    peers = planner.parse_peers(read(args.nodes, "nodes"))
    links = search.parse_links(read(args.links, "links"), peers) if args.links else search.Links()
    if args.method == "optimal":
        split, runner, exact = search.search(layers, peers, links=links, objective=args.objective)
        explained = search.why(split, runner, exact, args.objective)
    else:
        split = {"greedy": planner.greedy_by_compute, "memory": planner.split_by_memory}[args.method](layers, peers)
        explained = search.why(split, None, False, args.objective) | {"method": args.method}
    want = 0 if args.replicas == "auto" else int(args.replicas)
    replicas = control.replica_splits(layers, peers, split, links, args.objective, want) if want != 1 else []
    plan = plans.make_plan(layers, peers, split, request_id=args.request_id, replicas=replicas)
    print(json.dumps(plan.view(args.tokens) | {"why": explained}, indent=2))
    return 0


def _replicas(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"auto or a whole number >= 1, not {text!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text: through the mesh (the local peer's API), or with ``--local`` from the local store in
    this process (the single-process reference). Text is printed as it comes; ``--json`` prints one object
    at the end instead."""
    if args.local:
        return _generate_local(args)
    model, token = args.model, _token(args)
    if not model:
        served = api_get(args.api, "/v1/models", token=token)["data"]
        if not served:
            raise MeshError("the mesh serves no model yet (POST /api/model or `meshnode start --serve ID`)",
                            code="MODEL_NOT_AVAILABLE")
        model = served[0]["id"]
    body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "stream": True}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.raw:
        path, body["prompt"] = "/v1/completions", args.prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.prompt}]
    text, details = [], {}
    for event in stream_events(args.api, path, body, token=token):
        choice = event["choices"][0]
        piece = choice.get("text") if args.raw else choice["delta"].get("content")
        if choice.get("finish_reason") is not None:
            details = event.get("meshnode", {})
        if piece:
            text.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": details.get("token_ids", []),
                          "timings": details.get("timings", {}), "route": details.get("route", []),
                          "failovers": details.get("failovers", 0)}))
    else:
        print(flush=True)
    return 0


def _generate_local(args: argparse.Namespace) -> int:
    from inference.local import LocalModel
    from inference.sampling import Sampling
    from inference.tokenizer import chat_ids, text_ids

    if not args.model:
        raise MeshError("--local needs --model ID (meshnode models list shows them)", code="INVALID_PARAMETER")
    logs.setup("warning", False)
    model = LocalModel(_store(args), args.model, compute_dtype=args.compute_dtype)
    tok = model.tokenizer
    if tok is None:
        raise MeshError(f"{args.model} has no tokenizer", code="TOKENIZER_UNAVAILABLE")
    prompt = text_ids(tok, args.prompt) if args.raw else chat_ids(tok, [{"role": "user", "content": args.prompt}])
    sampling = Sampling(args.temperature, 0, 1.0, args.seed if args.seed is not None else 0)
    result = model.generate(prompt, args.max_tokens, sampling=sampling)
    text = tok.decode(result.token_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                          "finish_reason": "stop" if result.stopped else "length", "timings": result.timings}))
    else:
        print(text, flush=True)
    return 0


# ---- entry point --------------------------------------------------------------------------------


def _api_arguments(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    """--api and --api-token of a command that calls a running peer (and --data-dir, where its token file is)."""
    p.add_argument("--api", default=DEFAULT_API, help="the peer's API address (host:port)")
    p.add_argument("--api-token", metavar="TOKEN",
                   help=f"the peer's API token (default: ${config_mod.TOKEN_ENV}, else DATA_DIR/{API_TOKEN_FILE})")
    if data_dir:
        p.add_argument("--data-dir", default="~/.meshnode", help=f"the peer's data directory (its {API_TOKEN_FILE})")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start a peer")
    config_mod.add_arguments(p)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("status", help="print the mesh as this peer sees it")
    _api_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--watch", action="store_true", help="redraw the table and the plans' layer bars in place")
    p.add_argument("--interval", type=float, default=1.0, help="with --watch: seconds between redraws (default 1)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("invite", help="print an invite token a new peer joins with (meshnode start --join TOKEN)")
    _api_arguments(p)
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds the invite can be redeemed (default 3600)")
    p.add_argument("--uses", type=int, default=1, help="peers that can join with it (default 1)")
    p.set_defaults(func=cmd_invite)
    p = sub.add_parser("revoke", help="revoke a member: every member refuses it, and whom it admitted")
    p.add_argument("node_id", help="the member's node id (see meshnode members)")
    _api_arguments(p)
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser("members", help="the members of this peer's mesh: when and by whom admitted")
    _api_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_members)
    p = sub.add_parser("drain", help="drain the local peer: draining, then offline, then exit")
    _api_arguments(p)
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("models", help="install, list and show models in the local store")
    p.add_argument("--data-dir", default="~/.meshnode", help="the peer's data directory")
    msub = p.add_subparsers(dest="models_command", required=True)
    add = msub.add_parser("add", help="add a model: HF repo id, local HF folder, GGUF file, or smollm2-135m-instruct")
    add.add_argument("source")
    add.add_argument("--revision", help="HF revision (branch, tag or commit); a label for local sources")
    add.add_argument("--id", help="model id to register it under (default: derived from the source)")
    add.add_argument("--weights", choices=WEIGHTS, default="auto",
                     help="weight format of the shards: auto keeps what the source ships (bf16 stays bf16, a GGUF "
                          "stays int4/int8); float32|bfloat16|float16|int8|int4 convert")
    add.add_argument("--quiet", action="store_true", help="no progress bar")
    lst = msub.add_parser("list", help="installed models with sizes, layers and status")
    lst.add_argument("--json", action="store_true")
    show = msub.add_parser("show", help="one model: versions, files, shards and checksums")
    show.add_argument("id")
    pl = msub.add_parser("pull", help="have the running peer fetch models from the peers that hold them (a queue: "
                                      "priorities, pause, resume, cancel)")
    pl.add_argument("model", nargs="+", help="model id(s); with --pause/--resume/--cancel a model or a transfer id")
    pl.add_argument("--revision", help="a version the holders advertise (default: theirs)")
    pl.add_argument("--source", help="where to add it from if no peer can deliver it (as for `add`)")
    pl.add_argument("--priority", help="low, normal (the default), high or an integer in [-100, 100]: higher first")
    act = pl.add_mutually_exclusive_group()
    act.add_argument("--pause", action="store_true", help="pause the transfer (its bytes stay, also over a restart)")
    act.add_argument("--resume", action="store_true", help="resume a paused or failed transfer from its bytes")
    act.add_argument("--cancel", action="store_true", help="cancel the transfer and remove its partial files")
    _api_arguments(pl, data_dir=False)
    pl.add_argument("--quiet", action="store_true", help="no progress bar")
    for store_command in (add, lst, show, pl):  # also after the subcommand: `models add SOURCE --data-dir D`
        store_command.add_argument("--data-dir", default=argparse.SUPPRESS, help="the peer's data directory")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("plan", help="what-if: the layer plan for given layers and nodes, as JSON (no mesh)")
    p.add_argument("--layers", required=True, help='JSON list of {"index", "flops_per_token", "bytes"}')
    p.add_argument("--nodes", required=True,
                   help='JSON list of {"node_id", "flops", "memory_bytes", "link_ms"?, "bandwidth"? (bytes/s)}')
    p.add_argument("--links", help='JSON {"a": {"b": ms, ...}, ...}: measured hops (a missing pair: the link_ms '
                   "of the sending node)")
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency",
                   help="latency: one token's time (every stage and hop); throughput: the slowest stage")
    p.add_argument("--replicas", type=_replicas, default="1",
                   help="pipelines: 1, N, or auto (more on the peers left while one fits within 2x the first's cost)")
    p.add_argument("--tokens", type=int, default=1, help="tokens to generate, for estimated_total_time")
    p.add_argument("--method", choices=("optimal", "greedy", "memory"), default="optimal",
                   help="the best plan over any peers and order, or a baseline: compute- or memory-proportional")
    p.add_argument("--request-id", default="what-if")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("generate", help="generate text with the mesh, printing tokens as they come")
    p.add_argument("prompt")
    p.add_argument("--model", help="model id (default: the first one the mesh serves)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, help="seed for sampling (same seed, same text)")
    p.add_argument("--raw", action="store_true", help="plain completion of the prompt, no chat template")
    _api_arguments(p, data_dir=False)
    p.add_argument("--json", action="store_true", help='print one object at the end: {"text", "token_ids", "timings"}')
    p.add_argument("--local", action="store_true",
                   help="run the model from the local store in this process: no mesh, no running peer")
    p.add_argument("--data-dir", default="~/.meshnode",
                   help=f"with --local: the one holding the model; else the peer's (its {API_TOKEN_FILE})")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="with --local: the compute dtype (default: the model's, as a plan would choose)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("demo", help="start a local mesh on 127.0.0.1 and show it working")
    config_mod.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _failed(err: MeshError) -> int:
    print(f"meshnode: error {err.code}: {err}", file=sys.stderr)
    return 2


def _first(group: BaseExceptionGroup) -> MeshError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, MeshError)
    return exc


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except MeshError as err:
        return _failed(err)
    except BaseExceptionGroup as group:  # a peer's start-up refused inside its nurseries (an invite, a mesh)
        mesh_errors, rest = group.split(MeshError)
        if mesh_errors is None or rest is not None:
            raise
        return _failed(_first(mesh_errors))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `meshnode models list --json | head`: the reader left; end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())

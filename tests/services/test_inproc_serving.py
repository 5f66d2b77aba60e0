"""Serving in process (``mesh.app.inproc``: real services, stores and torch models on the memory transport and a
virtual clock), with the oracles of the process test: five models (fp32 Llama and GPT-2 against transformers'
greedy tokens; bf16 Llama, fp16 GPT-2 and int8 Llama against the same shards unsplit in one process) on three
stages, the compute dtype each plan picks, a refusal no route can cure, sessions at once from every peer, and
a generation left with no route. What only processes show (kill -9 of a process, libp2p, HTTP) stays in
tests/integration/test_inference_mesh.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import trio
import trio.testing
from tiny_models import local_reference, reference, tiny_gpt2, tiny_llama

from coordinator.service import planner_layers
from inference.driver import Request
from mesh.app.inproc import InProcessMesh, Peer
from mesh.config import Config, InferenceConfig
from mesh.errors import PeerError
from storage.formats import plan_compute

PROMPT = (3, 17, 42, 7, 99, 5)
RECOVERY = 10.0  # recovery_timeout, seconds on the virtual clock
#: Model id -> (folder it is added from, --weights, the format of its weight matrices).
MODELS = {"llama": ("llama", "auto", "float32"), "gpt2": ("gpt2", "auto", "float32"),
          "llama-bf16": ("llama-bf16", "auto", "bfloat16"), "gpt2-fp16": ("gpt2-fp16", "auto", "float16"),
          "llama-int8": ("llama", "int8", "int8")}
ORACLES = ("llama", "gpt2")  # fp32: transformers itself is the oracle


@dataclasses.dataclass(frozen=True)
class Tiny:
    folders: dict[str, Path]
    models: dict[str, torch.nn.Module]  # the fp32 ones

    def want(self, model: str, prompt: tuple[int, ...], n: int) -> list[int]:
        return reference(self.models[model], prompt, n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The five models' folders (the int8 Llama is added from the fp32 one) and the fp32 models."""
    base = tmp_path_factory.mktemp("serving")
    models = {"llama": tiny_llama().eval(), "gpt2": tiny_gpt2().eval()}
    saved = {**models, "llama-bf16": tiny_llama().to(torch.bfloat16), "gpt2-fp16": tiny_gpt2().to(torch.float16)}
    for name, model in saved.items():
        model.save_pretrained(base / name)
    return Tiny({name: base / name for name in saved}, models)


def config() -> Config:
    c = Config()  # compute_dtype "auto": each plan picks its own
    return dataclasses.replace(c, coordinator=dataclasses.replace(c.coordinator, hop_ms=0.05, objective="throughput"),
                               inference=InferenceConfig(recovery_timeout=RECOVERY, step_timeout=10.0))


def hops(peer: Peer, model: str) -> tuple[str, ...]:
    """The nodes of ``peer``'s ready route for ``model`` (empty while none is ready)."""
    route = peer.node.driver.route(model)
    return tuple(h.node for h in route.hops) if route is not None else ()


async def serving(mesh: InProcessMesh, tiny: Tiny, names: tuple[str, ...], holders: tuple[str, ...] = ("a", "b")
                  ) -> list[Peer]:
    """a, b, c, each offering 60% of what the biggest of ``names`` needs (no peer runs it alone, any two can),
    ``holders`` with the models installed (c holds none unless named): converged, every model asked to be
    served on c and ready on 3 stages on every peer."""
    context = mesh.config.coordinator.context_tokens
    need = 0
    for holder in holders:
        for name in names:
            folder, weights, _ = MODELS[name]
            manifest = mesh.store(holder).add(str(tiny.folders[folder]), model_id=name, weights=weights)
            need = max(need, sum(x.bytes for x in planner_layers(manifest, context, "float32")))
    peers = [await mesh.start(name, layer_memory=int(0.6 * need)) for name in "abc"]
    await mesh.wait(mesh.agreed, timeout=30, what="one coordinator")
    for name in names:
        await peers[2].node.request_serve(name)
    await mesh.wait(lambda: all(len(set(hops(p, n))) == 3 for p in peers for n in names), timeout=60,
                    what="every model on 3 stages")
    return peers


async def generate(peer: Peer, model: str, prompt: tuple[int, ...], n: int,
                   on_token: Callable[[int], object] | None = None, out: list[int] | None = None) -> list[int]:
    """Greedy tokens through ``peer``'s driver (appended to ``out`` as they come, which survives a failure)."""
    out = [] if out is None else out
    async for tok in peer.node.driver.generate(Request(model, prompt, n)):
        out.append(tok.id)
        if on_token is not None:
            on_token(len(out))
    return out


async def test_five_models_on_three_stages_give_their_oracles_tokens(
        tmp_path: Path, tiny: Tiny, autojump_clock: trio.testing.MockClock) -> None:
    """fp32, bf16, fp16 and int8 weights over 3 stages, each plan in the compute dtype ``plan_compute`` picks
    for its weights and these peers' features, each model's tokens exactly its oracle's; c, which holds no
    model, runs a stage of each from shards it fetched, and installed nothing."""
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await serving(mesh, tiny, tuple(MODELS))
        c = peers[2]
        features = [m.info.features_supported for m in c.node.core.membership.live()]
        assert len(features) == 3
        for name, (_, _, fmt) in MODELS.items():
            compute = c.node.serving(name)["models"][0]["compute_dtype"]
            assert compute == plan_compute([fmt], features), name
            assert compute == plan_compute(mesh.store("a").manifest(name)[0].formats, features), name
            want = (tiny.want(name, PROMPT, 32) if name in ORACLES
                    else local_reference(tmp_path / "a", name, PROMPT, 32, compute_dtype=compute))
            for p in peers:
                assert await generate(p, name, PROMPT, 32) == want, (name, p.name)
            assert {h for p in peers for h in hops(p, name)} == {p.node_id for p in peers}
        assert mesh.store("c").installed() == []
        assert {s.model for s in c.node.stages.loaded.values()} == set(MODELS)


async def test_a_prompt_longer_than_the_context_is_refused_at_once(
        tmp_path: Path, tiny: Tiny, autojump_clock: trio.testing.MockClock) -> None:
    """A refusal no route can cure fails the request at once: stage 0 refuses a prompt longer than the
    model's context (CONTEXT_TOO_LONG), one attempt, well within recovery_timeout."""
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await serving(mesh, tiny, ("llama",))
        c = peers[2]
        t0, tries = trio.current_time(), c.node.driver.failovers
        with pytest.raises(PeerError) as refused:
            await generate(c, "llama", PROMPT * 100, 4)
        assert refused.value.code == "GENERATION_FAILED" and "CONTEXT_TOO_LONG" in str(refused.value)
        assert trio.current_time() - t0 < 1.0 < RECOVERY
        assert c.node.driver.failovers == tries + 1  # no retry
        assert await generate(c, "llama", PROMPT, 8) == tiny.want("llama", PROMPT, 8)  # the route still serves


async def test_sessions_at_once_from_every_peer_on_two_models_each_get_their_own_tokens(
        tmp_path: Path, tiny: Tiny, autojump_clock: trio.testing.MockClock) -> None:
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await serving(mesh, tiny, ORACLES)
        jobs = [(p, name, PROMPT[: 3 + n]) for p in peers for name in ORACLES for n in (0, 3)]
        results: dict[int, list[int]] = {}
        active, peak = set(), 0

        async def one(k: int) -> None:
            nonlocal peak
            p, name, prompt = jobs[k]

            def seen(got: int) -> None:
                nonlocal peak
                active.add(k)
                peak = max(peak, len(active))

            results[k] = await generate(p, name, prompt, 40, seen)
            active.discard(k)

        async with trio.open_nursery() as nursery:
            for k in range(len(jobs)):
                nursery.start_soon(one, k)
        assert peak > len(peers), peak  # sessions overlapped: more than one per peer at once
        for k, (p, name, prompt) in enumerate(jobs):
            assert results[k] == tiny.want(name, prompt, 40), (p.name, name, prompt)


async def test_no_route_left_the_generation_fails_after_recovery_timeout_and_new_requests_at_once(
        tmp_path: Path, tiny: Tiny, autojump_clock: trio.testing.MockClock) -> None:
    """After a kill the model runs on the 2 survivors; then one of them dies mid-stream and the last cannot
    hold the model alone: the generation ends with GENERATION_FAILED once recovery_timeout passes (never a
    hang), its tokens so far the oracle's; a new request is refused at once with MODEL_NOT_AVAILABLE."""
    want = tiny.want("llama", PROMPT, 64)
    async with InProcessMesh(tmp_path, config()) as mesh:
        peers = await serving(mesh, tiny, ("llama",))
        victim = next(p for p in peers if p.node_id == hops(peers[0], "llama")[1])
        mesh.kill(victim.name)
        last, doomed = survivors = [p for p in peers if p is not victim]
        await mesh.wait(lambda: all(set(hops(p, "llama")) == {q.node_id for q in survivors} for p in survivors),
                        timeout=60, what="llama on the 2 survivors")
        assert await generate(last, "llama", PROMPT, 24) == want[:24]

        killed_at: list[float] = []

        def kill(k: int) -> None:
            if k == 5:
                mesh.kill(doomed.name)
                killed_at.append(trio.current_time())

        got: list[int] = []
        with pytest.raises(PeerError) as failed:
            await generate(last, "llama", PROMPT, 400, kill, got)
        waited = trio.current_time() - killed_at[0]
        assert failed.value.code == "GENERATION_FAILED", failed.value
        assert str(failed.value).endswith("peers left: 1"), failed.value  # the live ones, not the dead too
        assert RECOVERY - 1e-6 <= waited < RECOVERY + mesh.config.membership.offline_after + 1.0, waited
        assert len(got) >= 5 and got == want[: len(got)]

        t0 = trio.current_time()
        with pytest.raises(PeerError) as refused:
            await generate(last, "llama", PROMPT, 4)
        assert refused.value.code == "MODEL_NOT_AVAILABLE" and trio.current_time() - t0 < 0.5

"""Sampling the next token: greedy is the argmax; a seeded draw is a pure function of (logits, parameters,
position); top-k and top-p restrict the support as they should; bad parameters are refused with codes."""

from __future__ import annotations

import math

import pytest
import torch

from inference.sampling import MAX_TOP_K, Sampling, sample
from mesh.errors import PeerError

POSITIONS = range(200)


def logits(seed: int = 0, n: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2


def draws(x: torch.Tensor, s: Sampling, positions: range = POSITIONS) -> list[int]:
    return [sample(x, s, p) for p in positions]


def test_greedy_is_the_argmax() -> None:
    for seed in range(5):
        x = logits(seed)
        want = int(torch.argmax(x))
        assert Sampling().greedy
        assert draws(x, Sampling(), range(10)) == [want] * 10
        # top_k = 1 is greedy whatever the temperature and seed
        assert Sampling(temperature=1.5, top_k=1, seed=seed).greedy
        assert draws(x, Sampling(temperature=1.5, top_k=1, seed=seed), range(10)) == [want] * 10
    x = torch.zeros(10)
    x[7] = 3.0
    assert sample(x, Sampling(), 0) == 7
    assert not Sampling(temperature=0.7).greedy


def test_seeded_sampling_is_deterministic_per_seed_and_position() -> None:
    x = logits(1)
    s = Sampling(temperature=1.0, seed=42)
    first = draws(x, s)
    assert draws(x, s) == first  # the same (seed, position): the same token
    assert draws(x, Sampling(temperature=1.0, seed=42)) == first  # a new object with the same parameters
    assert [sample(x, s, p) for p in reversed(POSITIONS)] == first[::-1]  # no hidden state between calls
    assert len(set(first)) > 10  # positions draw differently (a flat-ish distribution over 128 tokens)
    other = draws(x, Sampling(temperature=1.0, seed=43))
    assert other != first and sum(a != b for a, b in zip(first, other, strict=True)) > len(POSITIONS) // 2
    # a draw follows the distribution, not the argmax: the most likely token is not always chosen
    assert first.count(int(torch.argmax(x))) < len(POSITIONS)


def test_temperature_sharpens_and_flattens() -> None:
    x = logits(2)
    hot = draws(x, Sampling(temperature=5.0, seed=1))
    cold = draws(x, Sampling(temperature=0.05, seed=1))
    assert len(set(cold)) < len(set(hot))
    assert cold.count(int(torch.argmax(x))) > 0.9 * len(POSITIONS)


@pytest.mark.parametrize("k", [2, 5, 20])
def test_top_k_keeps_the_k_best(k: int) -> None:
    x = logits(3)
    best = set(torch.topk(x, k).indices.tolist())
    got = draws(x, Sampling(temperature=2.0, top_k=k, seed=9))
    assert set(got) <= best, set(got) - best
    assert len(set(got)) == k  # and all of them are reachable (k small, 200 draws at a high temperature)
    # without the limit the same draws leave the top k
    assert not set(draws(x, Sampling(temperature=2.0, seed=9))) <= best


def test_top_k_larger_than_the_vocabulary_is_no_limit() -> None:
    x = logits(4, n=16)
    assert draws(x, Sampling(temperature=1.0, top_k=1000, seed=5)) == draws(x, Sampling(temperature=1.0, seed=5))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # One token holds 0.9 of the mass: top_p = 0.5 leaves only it, at any temperature 1 draw.
    probs = torch.full((50,), 0.1 / 49)
    probs[13] = 0.9
    x = probs.log()
    assert draws(x, Sampling(temperature=1.0, top_p=0.5, seed=3)) == [13] * len(POSITIONS)
    assert draws(x, Sampling(temperature=1.0, top_p=0.9, seed=3)) == [13] * len(POSITIONS)
    assert set(draws(x, Sampling(temperature=1.0, seed=3))) != {13}  # without top_p others come up
    # Masses 0.5, 0.3, 0.15, 0.05: p = 0.7 needs the two best, p = 0.85 the three best.
    x = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert set(draws(x, Sampling(temperature=1.0, top_p=0.7, seed=4))) == {1, 3}
    assert set(draws(x, Sampling(temperature=1.0, top_p=0.85, seed=4))) == {1, 2, 3}
    assert set(draws(x, Sampling(temperature=1.0, top_p=1.0, seed=4))) == {0, 1, 2, 3}


def test_top_k_and_top_p_together() -> None:
    x = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top_k = 3 renormalises to 4/9, 3/9, 2/9: p = 0.7 then needs the two best
    assert set(draws(x, Sampling(temperature=1.0, top_k=3, top_p=0.7, seed=6))) == {0, 1}


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": 100.5}, {"temperature": math.nan}, {"temperature": math.inf},
    {"top_k": -1}, {"top_k": MAX_TOP_K + 1}, {"top_p": 0.0}, {"top_p": 1.01}, {"top_p": math.nan},
    {"seed": -1}, {"seed": 2**63},
])
def test_invalid_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(PeerError) as err:
        Sampling(**kwargs)
    assert err.value.code == "INVALID_PARAMETER"


def test_limits_are_accepted() -> None:
    for s in (Sampling(temperature=100.0), Sampling(top_k=MAX_TOP_K), Sampling(top_p=1e-9), Sampling(seed=2**63 - 1)):
        assert Sampling.from_wire(s.to_wire()) == s


def test_wire_round_trip_and_defaults() -> None:
    s = Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=12345, logits=True)
    assert Sampling.from_wire(s.to_wire()) == s
    assert Sampling.from_wire({}) == Sampling() and Sampling().greedy
    assert Sampling.from_wire({"temperature": 1, "top_p": 1}) == Sampling(temperature=1.0)  # ints are numbers


@pytest.mark.parametrize("raw", [
    None, [], "greedy", 0,
    {"temperature": "hot"}, {"temperature": True}, {"top_p": None}, {"top_k": 1.0}, {"top_k": True},
    {"seed": "1"}, {"seed": 1.5}, {"logits": 1}, {"logits": "yes"},
    {"temperature": -1.0}, {"top_p": 0}, {"top_k": -5}, {"seed": -1}, {"seed": 2**64}, {"temperature": math.inf},
])
def test_from_wire_refuses_malformed_maps_as_bad_frame(raw: object) -> None:
    with pytest.raises(PeerError) as err:
        Sampling.from_wire(raw)
    assert err.value.code == "BAD_FRAME"

"""Sampling rules on hand-made logits."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from shoal.engine.sampling import (
    SamplingParams,
    make_generator,
    penalize,
    sample_batch,
    sample_one,
)

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 over five tokens
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def support(params: SamplingParams, draws: int = 400) -> set[int]:
    rng = make_generator(params)
    return {sample_one(LOGITS, params, rng) for _ in range(draws)}


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2, seed=1), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.6, seed=1), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.5, seed=1), {0}),
        (SamplingParams(temperature=1.0, top_p=0.76, seed=1), {0, 1, 2}),
        (SamplingParams(temperature=1.0, min_p=0.4, seed=1), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.25, seed=1), {0, 1, 2}),
        (SamplingParams(temperature=1.0, seed=1), {0, 1, 2, 3, 4}),
    ],
)
def test_filters_limit_the_support(params, allowed):
    seen = support(params)
    assert seen <= allowed
    assert len(seen) == len(allowed)  # 400 draws reach every kept token of mass >= 3%


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1)],
)
def test_greedy_settings_pick_the_argmax(params):
    assert params.greedy
    assert sample_batch(LOGITS[None].repeat(3, 1), [params] * 3, [None] * 3) == [0, 0, 0]


def test_low_temperature_concentrates_mass():
    counts = [
        sample_one(LOGITS, p := SamplingParams(temperature=0.05, seed=3), make_generator(p))
        for _ in range(50)
    ]
    assert set(counts) == {0}


def test_same_seed_same_draws_and_rows_are_independent():
    p = SamplingParams(temperature=1.0, seed=42)
    a = [sample_one(LOGITS, p, rng) for rng in [make_generator(p)] for _ in range(30)]
    rng = make_generator(p)
    b = [sample_one(LOGITS, p, rng) for _ in range(30)]
    assert a == b
    # a greedy neighbour in the batch does not disturb a seeded row
    batch = LOGITS[None].repeat(2, 1)
    rng = make_generator(p)
    mixed = [
        sample_batch(batch, [SamplingParams(temperature=0), p], [None, rng])[1] for _ in range(30)
    ]
    assert mixed == a


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 1.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"repetition_penalty": 0},
    ],
)
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_probabilities_fixture_is_normalised():
    assert math.isclose(float(PROBS.sum()), 1.0, rel_tol=1e-6)


# logits 2.0, -1.0, 0.5, 0.0; token 0 seen twice, token 1 once
ROW = torch.tensor([2.0, -1.0, 0.5, 0.0])
SEEN = Counter({0: 2, 1: 1})


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(presence_penalty=0.5), [1.5, -1.5, 0.5, 0.0]),
        (SamplingParams(frequency_penalty=0.5), [1.0, -1.5, 0.5, 0.0]),
        (SamplingParams(presence_penalty=0.5, frequency_penalty=0.5), [0.5, -2.0, 0.5, 0.0]),
        # HF/CTRL: a positive logit is divided, a negative one multiplied
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.5, 0.0]),
        (SamplingParams(presence_penalty=-1.0), [3.0, 0.0, 0.5, 0.0]),  # negative: favour
    ],
)
def test_penalties_change_only_the_seen_tokens(params, expected):
    assert penalize(ROW, params, SEEN).tolist() == expected


def test_greedy_with_a_penalty_moves_off_a_repeated_token_and_leaves_the_input_alone():
    logits = ROW[None].repeat(2, 1)
    plain, penalized = (
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, presence_penalty=2),
    )
    chosen = sample_batch(logits, [plain, penalized], [None, None], [SEEN, SEEN])
    assert chosen == [0, 2]  # 2.0 - 2 = 0.0 falls below token 2's 0.5
    assert logits[1].tolist() == ROW.tolist()  # the model's logits are not modified


def test_nothing_seen_yet_means_no_penalty():
    p = SamplingParams(temperature=0, presence_penalty=2)
    assert sample_batch(ROW[None], [p], [None], [Counter()]) == [0]

"""prisp.privacy (the measuring pieces of bench/privacy.py) on the tiny model: the cached scorer, the exposure
estimator, user A."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from prisp.adapters import LoraSpec, attach_lora, random_init
from prisp.data.lamp import ProfileItem
from prisp.data.protocol import recent_items
from prisp.models import load_model
from prisp.training import IGNORE_INDEX, Example, tokenize_examples


@pytest.fixture(scope="module")
def privacy():
    import prisp.privacy

    return prisp.privacy


@pytest.fixture(scope="module")
def noisy_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    weights = random_init(loaded.model, LoraSpec(), seed=1)
    generator = torch.Generator().manual_seed(1)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 0.5, generator=generator)
    return attach_lora(copy.deepcopy(loaded.model), weights).eval(), loaded.tokenizer


def test_cached_scorer_equals_full_sequences(privacy, noisy_model):
    model, tokenizer = noisy_model
    canary = privacy.make_canaries(random.Random(0), 1, [1], 4)[0]
    answers = [canary.text()] + [
        canary.text(s) for s in privacy.sample_alternatives(random.Random(1), canary, 4, 9)
    ]
    prompt = canary.prompt("LaMP-4")
    fast = privacy.answer_logprobs(model, tokenizer, prompt, answers, batch_size=4)
    naive = []
    with torch.no_grad():
        for ex in tokenize_examples(tokenizer, [Example(prompt, a) for a in answers], 1 << 30):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0], -1)
            naive.append(
                sum(
                    logp[j - 1, ex.input_ids[j]].item()
                    for j in range(1, len(ex.input_ids))
                    if ex.labels[j] != IGNORE_INDEX
                )
            )
    np.testing.assert_allclose(fast, naive, atol=1e-4)


def test_exposure_exact_and_sampled(privacy):
    space = 16
    exact = privacy.exposure_stats(
        0.0, -np.arange(1, 16, dtype=float), space
    )  # the canary is the most likely
    assert exact["exact"] and exact["rank"] == 1 and exact["exposure"] == pytest.approx(math.log2(space))
    middle = privacy.exposure_stats(-7.5, -np.arange(1, 16, dtype=float), space)  # 7 alternatives more likely
    assert middle["rank"] == 8 and middle["exposure"] == pytest.approx(1.0)
    sampled = privacy.exposure_stats(-0.5, -np.linspace(0, 10, 100), 10**5)
    assert not sampled["exact"] and sampled["exposure_lo95"] <= sampled["exposure"] <= math.log2(10**5)


def test_alternatives_are_distinct_and_exclude_the_canary(privacy):
    canary = privacy.make_canaries(random.Random(3), 1, [1], 2)[0]
    every = privacy.sample_alternatives(random.Random(0), canary, 2, 10_000)
    assert len(every) == 99 and len(set(every)) == 99 and canary.secret not in every


def test_user_a_trains_on_every_canary_copy(privacy):
    profile = tuple(
        ProfileItem(f"r{i}", {"text": f"article {i}", "title": f"title {i}"}, f"2020-01-{i + 1:02d}")
        for i in range(20)
    )
    canaries = privacy.make_canaries(random.Random(0), 3, [1, 2, 3], 5)
    history = privacy.canary_history("LaMP-4", profile, canaries, k=10)
    used = recent_items(history, 10)
    assert len(history) == 10 and [i.id for i in used] == [i.id for i in history]
    assert sum(i.id.startswith("canary") for i in used) == 6
    assert {i.id for i in used if i.id.startswith("r")} == {f"r{i}" for i in range(16, 20)}

"""PAG profiles: Table 15 prompts, seeded generation, the on-disk cache, and PAG / RAG+PAG prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prisp import profiles as profiles_mod
from prisp.data.lamp import LampSplit, ProfileItem, Query, load_task_split
from prisp.data.tasks import TASKS
from prisp.errors import DataError, PrispError
from prisp.predict import METHODS, PredictConfig, build_prompt, predict_split, variant_method
from prisp.profiles import (
    PROFILE_PROMPTS,
    ProfileConfig,
    ProfileStore,
    profile_prompt,
    query_profiles,
    split_profiles,
    user_profile,
    with_profiles,
)

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "prisp" / "data" / "sample"
FAST = ProfileConfig(max_new_tokens=6, max_input_tokens=256, item_chars=40)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer))
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.generation_config.pad_token_id = tiny_tokenizer.pad_token_id
    return model, tiny_tokenizer


def _items(n: int, start: int = 0) -> list[ProfileItem]:
    return [
        ProfileItem(
            f"p{i}", {"text": f"article {i} about budgets", "title": f"Headline {i}"}, f"2020-01-{i + 1:02d}"
        )
        for i in range(start, start + n)
    ]


def test_every_task_has_a_table15_prompt_with_the_history_filled_in():
    assert set(PROFILE_PROMPTS) == {name for name in TASKS if name.startswith("LaMP-")}
    with pytest.raises(PrispError, match="exist for the LaMP tasks only, not for LongLaMP-2"):
        profile_prompt("LongLaMP-2", _items(2))  # Table 15 has no LongLaMP prompt
    prompt = profile_prompt("LaMP-4", _items(12))
    assert prompt.startswith(
        "Given this author's previous articles, try to describe a template for their headlines."
    )
    assert prompt.endswith("Answer:") and "{USER_HISTORY}" not in prompt
    assert "Headline 11" in prompt and "Headline 0" in prompt  # profile_prompt renders what it is given


def test_cache_miss_then_hit_and_the_key_covers_model_items_and_options(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    store = ProfileStore(tmp_path)
    history = _items(12)
    first = user_profile(model, tok, "tiny", "LaMP-4", "u1", history, FAST, store)
    assert not first.cached and first.items == [f"p{i}" for i in range(2, 12)]  # the 10 most recent
    assert store.path("LaMP-4", first.key).is_file()

    def boom(*args, **kwargs):
        raise AssertionError("a cached profile must not be regenerated")

    monkeypatch.setattr(profiles_mod, "generate", boom)
    again = user_profile(model, tok, "tiny", "LaMP-4", "u1", history, FAST, store)
    assert again.cached and again.text == first.text and again.key == first.key
    assert again.seconds == pytest.approx(first.seconds)
    keys = {
        first.key,
        profiles_mod.profile_key("other-model", "LaMP-4", "u1", history[2:], FAST),
        profiles_mod.profile_key("tiny", "LaMP-4", "u1", _items(10, start=5), FAST),
        profiles_mod.profile_key("tiny", "LaMP-4", "u2", history[2:], FAST),
        profiles_mod.profile_key("tiny", "LaMP-4", "u1", history[2:], ProfileConfig(seed=1)),
    }
    assert len(keys) == 5  # model, items, user and options each change the key


def test_generation_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = profiles_mod.generate_profile(model, tok, "LaMP-4", _items(3), FAST)
    b = profiles_mod.generate_profile(model, tok, "LaMP-4", _items(3), FAST)
    assert a == b
    assert torch.equal(torch.rand(3), expected_next)


def test_split_profiles_and_pag_prompts(tiny, tmp_path):
    model, tok = tiny
    split = load_task_split(SAMPLE, "LaMP-4", "dev")
    found = split_profiles(model, tok, "tiny", split, FAST, ProfileStore(tmp_path), limit=3)
    assert set(found) == {
        u for u, qs in split.users.items() if any(q.id in {x.id for x in split.queries[:3]} for q in qs)
    }
    texts = query_profiles(split, found)
    query = split.queries[0]
    config = PredictConfig(method="rag+pag", profiles={query.id: "likes short headlines"})
    prompt = build_prompt("LaMP-4", query, METHODS["rag+pag"], config, ())
    assert prompt.startswith("User Profile: likes short headlines\nUser History:\n")
    pag_only = build_prompt("LaMP-4", query, METHODS["pag"], config, ())
    assert pag_only.startswith("User Profile: likes short headlines\nUser Instruction:")
    subset = LampSplit("LaMP-4", "dev", split.queries[:3])
    store = ProfileStore(tmp_path)
    config = with_profiles(PredictConfig(method="pag"), model, tok, "tiny", subset, FAST, store)
    assert config.profiles == {q.id: texts[q.id] for q in subset.queries}  # the cached texts, not new samples
    run = predict_split(model, tok, subset, config)
    assert all(p.startswith("User Profile:") for p in run.prompts)
    plain = PredictConfig(method="rag")
    assert with_profiles(plain, model, tok, "tiny", subset, FAST, store) is plain


def test_pag_without_a_profile_is_refused_and_variants_map_to_methods(tiny):
    model, tok = tiny
    split = LampSplit("LaMP-4", "dev", [Query("q1", "Generate a headline for the following article: x", ())])
    with pytest.raises(DataError, match="needs a profile text"):
        predict_split(model, tok, split, PredictConfig(method="pag"))
    assert [variant_method(r, p) for r in (False, True) for p in (False, True)] == [
        "np",
        "pag",
        "rag",
        "rag+pag",
    ]

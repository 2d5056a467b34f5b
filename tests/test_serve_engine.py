"""The batching engine: a mixed-adapter batch answers every row as it would be answered alone, concurrent
users never get each other's adapter, and the slot pool stays bounded, LRU and forgetful on deletion."""

from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from prisp.adapters import LoraSpec, LoraWeights, attach_lora, random_init
from prisp.data.prompts import query_prompt
from prisp.errors import AdapterError, PrispError
from prisp.generation import GenerationConfig, generate
from prisp.models import load_model
from prisp.scoring import score_labels
from prisp.serve.engine import ServingModel
from prisp.serve.slots import AdapterSlots

TEXTS = ("Cats.", "The city council approved the new budget after a long debate.",
         "A storm hit the coast on Monday; roads were closed, schools shut and thousands lost power " * 3)
PROMPTS = [query_prompt("LaMP-4", t) for t in TEXTS]  # three clearly different prompt lengths
BUDGETS = (12, 5, 9)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def distinct_adapter(model, seed: int, spec: LoraSpec = LoraSpec()) -> LoraWeights:
    """A random adapter with a large B (N(0, 1)), so it visibly changes what the tiny model generates."""
    weights = random_init(model, spec, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 1.0, generator=generator)
    return weights


@pytest.fixture(scope="module")
def users(tiny) -> dict[str, LoraWeights]:
    """Three users with different adapters of different specs, and a random-init anchor (B = 0: the base).

    Seeds picked so that all four answer every prompt differently on the tiny model.
    """
    return {"alice": distinct_adapter(tiny.model, 3),
            "bob": distinct_adapter(tiny.model, 1, LoraSpec(r=4, alpha=8, use_rslora=False)),
            "carol": distinct_adapter(tiny.model, 1, LoraSpec(r=2, alpha=4, target_modules=(
                "q_proj", "k_proj", "v_proj", "o_proj"))),
            "anchor": random_init(tiny.model, LoraSpec(), seed=0)}


class Alone:
    """Answers computed one request at a time on a plain peft model per adapter: the reference."""

    def __init__(self, tiny):
        self.tiny = tiny
        self._models: dict[int, object] = {}
        self._answers: dict[tuple[int, str, int], str] = {}

    def __call__(self, weights: LoraWeights, prompt: str, budget: int) -> str:
        key = (id(weights), prompt, budget)
        if key not in self._answers:
            model = self._models.get(id(weights))
            if model is None:
                model = attach_lora(copy.deepcopy(self.tiny.model), weights).eval()
                self._models[id(weights)] = model
            config = GenerationConfig(max_new_tokens=budget, batch_size=1)
            self._answers[key] = generate(model, self.tiny.tokenizer, [prompt], config).texts[0]
        return self._answers[key]


@pytest.fixture(scope="module")
def alone(tiny):
    return Alone(tiny)


def test_users_answer_differently(users, alone):
    """Without this the isolation tests below would prove nothing."""
    for prompt, budget in zip(PROMPTS, BUDGETS):
        answers = [alone(w, prompt, budget) for w in users.values()]
        assert len(set(answers)) == len(answers), answers


def test_mixed_adapter_batch_equals_each_row_alone(tiny, users, alone):
    """One left-padded batch, four adapters of four specs, three prompt lengths, three budgets."""
    slots = AdapterSlots(tiny.model, capacity=4)
    pinned: set[str] = set()
    rows = [(w, p, b) for w in users.values() for p, b in zip(PROMPTS, BUDGETS)]
    rows = rows[::2] + rows[1::2]  # interleave users inside the batch
    names = [slots.place(w, pinned) for w, _, _ in rows]
    assert len(set(names)) == 4 and len(slots) == 4
    result = generate(slots.model, tiny.tokenizer, [p for _, p, _ in rows],
                      GenerationConfig(max_new_tokens=max(BUDGETS), batch_size=len(rows)),
                      adapter_names=names, budgets=[b for _, _, b in rows])
    assert result.texts == [alone(w, p, b) for w, p, b in rows]


@pytest.mark.parametrize("max_batch,slot_count", [(2, 2), (8, 8)])
def test_interleaved_users_from_many_threads_get_their_own_answers(tiny, users, alone, max_batch, slot_count):
    """48 requests of four adapters from 8 threads; with 2 slots the pool evicts and reloads all along."""
    engine = ServingModel(tiny.model, tiny.tokenizer, batch_window_ms=20, max_batch=max_batch,
                          adapter_slots=slot_count)
    rng = random.Random(max_batch)
    plan = [(rng.choice(list(users)), rng.randrange(len(PROMPTS))) for _ in range(48)]
    waves = threading.Barrier(8)  # 48 = 6 waves of 8 requests released together, so they must share batches

    def ask(entry: tuple[str, int]) -> str:
        name, which = entry
        waves.wait(timeout=30)
        owner = None if name == "anchor" else (name, "LaMP-4")
        return engine.generate(users[name], PROMPTS[which], BUDGETS[which], owner=owner)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(ask, plan))
        stats = engine.stats()
    finally:
        engine.close()
    expected = [alone(users[name], PROMPTS[which], BUDGETS[which]) for name, which in plan]
    assert answers == expected
    assert stats.requests == 48 and 1 < stats.largest <= max_batch, stats
    assert len(engine.slots) <= slot_count
    if slot_count < len(users):
        assert stats.adapter_loads > len(users), "the small pool should have evicted and reloaded"


def test_a_bad_adapter_fails_only_its_own_request(tiny, users, alone):
    engine = ServingModel(tiny.model, tiny.tokenizer, batch_window_ms=500, max_batch=4, adapter_slots=4)
    good = users["alice"]
    bad = LoraWeights(good.spec, dict(list(good.pairs.items())[1:]))  # a layer missing
    start = threading.Barrier(2)

    def ask(weights):
        start.wait(timeout=5)
        try:
            return engine.generate(weights, PROMPTS[0], BUDGETS[0])
        except AdapterError as exc:
            return exc

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(ask, [good, bad]))
        stats = engine.stats()
    finally:
        engine.close()
    assert answers[0] == alone(good, PROMPTS[0], BUDGETS[0])
    assert isinstance(answers[1], AdapterError) and "missing" in str(answers[1])
    assert stats.largest == 2, "both requests should have been in one batch"


def test_slot_pool_is_bounded_lru_and_forgets(tiny, users):
    probe = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = tiny.model(probe).logits.clone()
    slots = AdapterSlots(tiny.model, capacity=2)
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    a = slots.place(alice, set(), ("alice", "LaMP-4"))
    b = slots.place(bob, set(), ("bob", "LaMP-4"))
    assert slots.place(alice, set()) == a and slots.loads == 2  # a hit copies nothing
    c = slots.place(carol, set(), ("carol", "LaMP-7"))  # full: bob is least recently used
    assert not slots.holds(bob) and slots.holds(alice) and slots.holds(carol)
    assert b not in slots.model.peft_config and set(slots.model.peft_config) == {a, c}  # spec changed
    with pytest.raises(AdapterError, match="in use by one batch"):
        slots.place(bob, {a, c})  # never evicts a slot the batch being built uses
    assert slots.owners() == [("alice", "LaMP-4"), ("carol", "LaMP-7")]
    assert slots.forget("alice") == 1 and not slots.holds(alice) and slots.owners() == [("carol", "LaMP-7")]
    emptied = [m.lora_B[a].weight for m in slots.model.modules() if hasattr(m, "lora_B") and a in m.lora_B]
    assert emptied and all(not w.any() for w in emptied), "a forgotten adapter's values must not linger"
    assert slots.place(alice, set()) == a and slots.loads == 4  # the empty slot of the same spec is reused
    with torch.no_grad():
        assert torch.equal(tiny.model(probe).logits, base_logits)


def test_a_users_new_copy_takes_over_the_slot_of_the_old_one(tiny, users):
    """A re-decrypted adapter (or a new version) is a new object; it must not pile up slots per user."""
    slots = AdapterSlots(tiny.model, capacity=4)
    old = slots.place(users["alice"], set(), ("alice", "LaMP-4"))
    slots.place(users["bob"], set(), ("bob", "LaMP-4"))
    decrypted_again = copy.deepcopy(users["alice"])
    assert slots.place(decrypted_again, set(), ("alice", "LaMP-4")) == old
    assert slots.holds(decrypted_again) and not slots.holds(users["alice"]) and len(slots) == 2
    assert slots.place(copy.deepcopy(users["alice"]), {old}, ("alice", "LaMP-4")) != old  # pinned: a new slot


def test_close_refuses_new_requests(tiny, users, alone):
    engine = ServingModel(tiny.model, tiny.tokenizer, batch_window_ms=0)
    bob = users["bob"]
    assert engine.generate(bob, PROMPTS[1], BUDGETS[1]) == alone(bob, PROMPTS[1], BUDGETS[1])
    engine.close()
    engine.close()
    with pytest.raises(PrispError, match="shut down"):
        engine.generate(users["bob"], PROMPTS[1], BUDGETS[1])


@pytest.mark.parametrize("options,message", [
    ({"max_batch": 0}, "--max-batch"),
    ({"batch_window_ms": -1}, "--batch-window-ms"),
    ({"max_batch": 8, "adapter_slots": 4}, "--adapter-slots"),
])
def test_engine_options_are_validated(tiny, options, message):
    with pytest.raises(PrispError, match=message):
        ServingModel(tiny.model, tiny.tokenizer, **options)


LABELS = ("politics", "sports", "food", "travel", "science", "business", "comedy", "wellness")


def test_label_requests_share_batches_and_score_through_their_own_adapter(tiny, users, alone):
    """``decode: labels`` requests ride in the batches of generation requests; each is scored by its own slot."""
    prompts = [query_prompt("LaMP-2N", t, LABELS) for t in TEXTS[:2]]
    reference = {}
    for name, weights in users.items():
        model = attach_lora(copy.deepcopy(tiny.model), weights).eval()
        for p, prompt in enumerate(prompts):
            reference[name, p] = score_labels(model, tiny.tokenizer, [prompt], LABELS).choices[0]
    assert len(set(reference.values())) > 1, "the users must disagree or routing would go untested"
    engine = ServingModel(tiny.model, tiny.tokenizer, batch_window_ms=50, max_batch=8, adapter_slots=8)
    plan = [(name, p, kind) for name in users for p in range(2) for kind in ("labels", "free")]
    start = threading.Barrier(len(plan))

    def ask(entry):
        name, p, kind = entry
        start.wait(timeout=30)
        if kind == "labels":
            return engine.score(users[name], prompts[p], LABELS)
        return engine.generate(users[name], prompts[p], BUDGETS[p])

    try:
        with ThreadPoolExecutor(max_workers=len(plan)) as pool:
            answers = list(pool.map(ask, plan))
        stats = engine.stats()
        with pytest.raises(PrispError, match="label set"):
            engine.score(users["alice"], prompts[0], ())
    finally:
        engine.close()
    for (name, p, kind), answer in zip(plan, answers):
        expected = reference[name, p] if kind == "labels" else alone(users[name], prompts[p], BUDGETS[p])
        assert answer == expected, (name, p, kind)
    assert stats.largest > 1 and stats.requests == len(plan)



@pytest.mark.slow
def test_long_form_requests_keep_every_line_in_a_shared_batch():
    """A long-form task's request (LongLaMP-2: first_line False) gets the whole text while a LaMP-style request
    in the same batch gets its first line; each equals generate() alone with that setting. The real model, as
    the tiny random one never writes a newline."""
    loaded = load_model()
    weights = random_init(loaded.model, LoraSpec(), seed=0)
    prompt, budget = query_prompt("LongLaMP-2", '{"title": "Fair Speech Recognition Across Dialects"}'), 48
    model = attach_lora(copy.deepcopy(loaded.model), weights).eval()
    whole, first = (generate(model, loaded.tokenizer, [prompt], GenerationConfig(
        max_new_tokens=budget, batch_size=1, first_line=keep)).texts[0] for keep in (False, True))
    assert "\n" in whole and first == whole.splitlines()[0].strip()
    engine = ServingModel(loaded.model, loaded.tokenizer, batch_window_ms=200, max_batch=2, adapter_slots=2)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            long_form = pool.submit(engine.generate, weights, prompt, budget, None, False)
            one_line = pool.submit(engine.generate, weights, prompt, budget)
            answers = long_form.result(timeout=120), one_line.result(timeout=120)
        assert engine.stats().largest == 2  # they shared a batch
    finally:
        engine.close()
    assert answers == (whole, first)

"""Sharer baselines: exact LoRA composition, Per-Pcs piece selection, PriME's seeded bounded search, pool."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from prisp.adapters import LoraSpec, LoraWeights, random_init
from prisp.data.lamp import ProfileItem, load_task_split
from prisp.personalize import stack_loras
from prisp.personalize.per_user import UserCost
from prisp.sharers import (
    AdapterBuild,
    HistoryEmbedder,
    PerPcs,
    Prime,
    PrimeConfig,
    SearchConfig,
    Sharer,
    SharerConfig,
    SharerPool,
    TargetCost,
    build_pool,
    cluster_representatives,
    cma_minimize,
    compose_pieces,
    layer_sum,
    piece_scores,
    select_pieces,
    split_stack,
)

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "prisp" / "data" / "sample"
SHAPES = {(layer, name): (6, 4) for layer in range(3) for name in ("q_proj", "v_proj")}  # (in, out)


class HashEncoder:
    """A deterministic stand-in for MiniLM: texts -> fixed pseudo-random vectors."""

    name = "hash"

    def encode(self, texts):
        rows = [
            torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)) for t in texts
        ]
        return torch.stack([torch.randn(16, generator=g) for g in rows])


def _lora(seed: int, shapes=SHAPES) -> LoraWeights:
    weights = random_init(shapes, LoraSpec(), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for pair in weights.pairs.values():
        pair.B = torch.randn(pair.B.shape, generator=g)
    return weights


def _delta_w(weights: LoraWeights, key) -> torch.Tensor:
    pair = weights.pairs[key]
    return weights.spec.scale * pair.B @ pair.A  # [out, in]


def test_split_stack_undoes_stack_loras_exactly():
    anchor, user = _lora(1), _lora(2)
    first, second = split_stack(stack_loras(anchor, user), anchor.spec.r)
    for key in SHAPES:
        assert torch.equal(first.pairs[key].A, anchor.pairs[key].A) and torch.equal(
            second.pairs[key].B, user.pairs[key].B
        )
        assert torch.allclose(_delta_w(second, key), _delta_w(user, key))


def test_layer_sum_is_the_exact_weighted_sum_of_updates():
    anchor, d1, d2 = _lora(1), _lora(2), _lora(3)
    terms = {layer: [(d1, 0.5 * (layer + 1)), (d2, -1.25)] for layer in range(3)}
    merged = layer_sum(anchor, terms)
    assert merged.spec.r == 24 and merged.spec.scale == pytest.approx(anchor.spec.scale)
    for layer, name in SHAPES:
        want = (
            _delta_w(anchor, (layer, name))
            + 0.5 * (layer + 1) * _delta_w(d1, (layer, name))
            - 1.25 * _delta_w(d2, (layer, name))
        )
        assert torch.allclose(_delta_w(merged, (layer, name)), want, atol=1e-5)


def test_per_pcs_picks_the_intended_piece_at_every_layer():
    # Three sharers, three layers; the target's features equal sharer 2's at layer 0, sharer 0's at layer 1,
    # sharer 1's at layer 2, so the gate must pick exactly those pieces.
    g = torch.Generator().manual_seed(0)
    sharer_feats = torch.randn(3, 3, 8, generator=g)  # [S, L, d]
    target = torch.stack([sharer_feats[2, 0], sharer_feats[0, 1], sharer_feats[1, 2]])  # [L, d]
    scores = piece_scores(target, sharer_feats)
    assert scores.shape == (3, 3)
    selection = select_pieces(scores, top_k=1)
    assert selection.indices[:, 0].tolist() == [2, 0, 1]
    assert torch.allclose(selection.weights, torch.ones(3, 1))
    anchor, deltas = _lora(10), [_lora(11), _lora(12), _lora(13)]
    composed = compose_pieces(anchor, deltas, selection)
    for (layer, name), pair in composed.pairs.items():
        chosen = deltas[[2, 0, 1][layer]]
        assert torch.equal(pair.A[:8], anchor.pairs[(layer, name)].A)
        assert torch.equal(pair.A[8:], chosen.pairs[(layer, name)].A)
        assert torch.allclose(pair.B[:, 8:], chosen.pairs[(layer, name)].B)


def test_per_pcs_top_k_weights_and_ties_are_deterministic():
    scores = torch.tensor([[0.5, 0.1], [0.5, 0.9], [0.2, 0.9]])  # [S=3, L=2]
    selection = select_pieces(scores, top_k=2, temperature=0.1)
    assert selection.indices.tolist() == [[0, 1], [1, 2]]  # equal scores keep sharer order
    assert torch.allclose(selection.weights.sum(1), torch.ones(2))
    assert torch.allclose(selection.weights[0], torch.tensor([0.5, 0.5]))
    two_layers = {key: shape for key, shape in SHAPES.items() if key[0] < 2}
    composed = compose_pieces(_lora(1, two_layers), [_lora(s, two_layers) for s in (2, 3, 4)], selection)
    assert composed.spec.r == 8 + 2 * 8


def test_cma_search_respects_bounds_and_budget_and_is_seeded():
    calls = []

    def loss(x):
        calls.append(x.copy())
        return float(((x - 4.0) ** 2).sum())  # optimum outside the box

    config = SearchConfig(budget=9, bound=1.5, seed=3)
    first = cma_minimize(loss, [1 / 3] * 3, config)
    assert len(calls) == 9 == len(first.losses)
    assert all(np.all(np.abs(x) <= 1.5) for x in calls)
    assert np.allclose(calls[0], [1 / 3] * 3)  # the plain average is evaluated first
    second = cma_minimize(loss, [1 / 3] * 3, config)
    assert all(np.array_equal(a, b) for a, b in zip(first.points, second.points))
    other = cma_minimize(loss, [1 / 3] * 3, SearchConfig(budget=9, bound=1.5, seed=4))
    assert not all(np.array_equal(a, b) for a, b in zip(first.points, other.points))
    state = np.random.get_state()[1].copy()
    cma_minimize(loss, [0.0], SearchConfig(budget=4))  # one dimension works too
    assert np.array_equal(np.random.get_state()[1], state)


def _fake_pool(model, n: int = 3, task: str = "LaMP-4") -> SharerPool:
    from prisp.adapters import shapes_for_model

    shapes = shapes_for_model(model)
    anchor = random_init(model, LoraSpec(), seed=0)
    sharers = []
    for i in range(n):
        delta = _lora(20 + i, shapes)
        for pair in delta.pairs.values():
            pair.B = pair.B * 0.01
        items = [ProfileItem(f"s{i}-{j}", {"text": f"text {i} {j}", "title": f"title {i}"}) for j in range(3)]
        embedding = torch.nn.functional.normalize(
            torch.randn(16, generator=torch.Generator().manual_seed(i)), dim=0
        )
        sharers.append(
            Sharer(
                f"s{i}",
                stack_loras(anchor, delta),
                delta,
                embedding,
                items,
                UserCost(f"s{i}", False, 2.0 + i, 100.0 * (i + 1), 1000),
            )
        )
    return SharerPool(task, anchor, sharers, key="fake")


def test_prime_merges_within_bounds_under_its_budget_and_is_seeded(tiny_tokenizer):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer))
    pool = _fake_pool(model)
    items = [ProfileItem(f"t{j}", {"text": f"target article {j}", "title": f"t {j}"}) for j in range(4)]
    config = PrimeConfig(loras=2, budget=3, batch_size=2, max_new_tokens=3)
    embedder = HistoryEmbedder(HashEncoder())
    runs = [Prime(pool, config, embedder).build(model, tiny_tokenizer, "LaMP-4", items, ()) for _ in range(2)]
    first = runs[0]
    assert first.details["evaluations"] == 3 and first.trainable_params == 2
    assert all(abs(w) <= 1.5 for w in first.details["weights"])
    assert first.details["weights"] == runs[1].details["weights"]
    assert len(first.sharers) == 2 and first.weights.spec.r == 8 + 2 * 8
    cost = TargetCost.from_build("t", first)
    used = [s.cost for s in first.sharers]
    assert cost.sharer_seconds == pytest.approx(sum(c.seconds for c in used))
    assert cost.seconds == pytest.approx(first.seconds + cost.sharer_seconds)
    assert cost.peak_memory_mb >= max(c.peak_memory_mb for c in used)


def test_cluster_representatives():
    points = torch.cat([torch.randn(5, 4) * 0.01 + 5, torch.randn(5, 4) * 0.01 - 5, torch.randn(5, 4) * 0.01])
    points[:, 1:] += torch.tensor([1.0, 2.0, 3.0])
    chosen = cluster_representatives(points, 3, seed=0)
    assert len(chosen) == 3 and len({i // 5 for i in chosen}) == 3  # one per cluster
    assert cluster_representatives(points[:2], 3) == [0, 1]


def test_pool_trains_with_the_stage2_loop_and_reuses_its_cache(tiny_tokenizer, tmp_path):
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer))
    split = load_task_split(SAMPLE, "LaMP-4", "train")
    candidates = {u: qs[0].profile for u, qs in split.users.items()}
    anchor = random_init(model, LoraSpec(), seed=0)
    config = SharerConfig(pool_size=2, items=2, epochs=1, max_length=48)
    embedder = HistoryEmbedder(HashEncoder())
    pool = build_pool(
        model, tiny_tokenizer, "tiny", "LaMP-4", anchor, candidates, (), config, embedder, tmp_path
    )
    assert len(pool.sharers) == 2 and not any(s.cost.cached for s in pool.sharers)
    for sharer in pool.sharers:
        assert sharer.weights.spec.r == 16 and sharer.delta.spec.r == 8
        assert sharer.cost.seconds > 0 and sharer.cost.trainable_params > 0
    again = build_pool(
        model, tiny_tokenizer, "tiny", "LaMP-4", anchor, candidates, (), config, embedder, tmp_path
    )
    assert all(s.cost.cached for s in again.sharers) and again.key == pool.key
    for a, b in zip(pool.sharers, again.sharers):
        assert all(torch.equal(a.delta.pairs[k].B, b.delta.pairs[k].B) for k in a.delta.pairs)
    build = PerPcs(again, embedder=embedder).build(
        model, tiny_tokenizer, "LaMP-4", candidates[again.sharers[0].user][-3:], ()
    )
    assert isinstance(build, AdapterBuild) and build.weights.spec.r == 16  # LaMP-4: top-1 piece per layer
    assert set(build.details["picked"]) <= {s.user for s in again.sharers}

"""The benchmark's paired user bootstrap: the additive per-user statistics rebuild the official metrics exactly
for any draw of users, and the bootstrap is paired, seeded and exact on constructed answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from prisp.bench.stats import UserStats, paired_bootstrap
from prisp.metrics import evaluate, task_score

LABELS = ["politics", "sports", "food", "travel"]


def _row(task: str, answers: dict[str, list[tuple[str, str]]], labels=None) -> dict:
    records = [
        {"id": f"{user}-{i}", "user": user, "gold": gold, "output": output}
        for user, pairs in answers.items()
        for i, (gold, output) in enumerate(pairs)
    ]
    return {"task": task, "predictions": records, "labels": labels}


def _class_stats(correct: dict[str, list[bool]]) -> UserStats:
    answers = {
        user: [("sports", "sports" if ok else "food") for ok in flags] for user, flags in correct.items()
    }
    return UserStats.from_row(_row("LaMP-2N", answers, LABELS))


def _random_pair(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "LaMP-2N":  # labels, near-labels (" food" strips to one) and non-labels, as models answer
        return rng.choice([*LABELS, "weather"]), rng.choice([*LABELS, " food", "Food", "weather"])
    if task == "LaMP-3":  # ratings, out-of-range and unparseable answers
        return str(rng.randint(1, 5)), rng.choice(["1", "3", "5", "4.5", "7", "five", ""])
    words = ["deep", "nets", "for", "parsing", "the", "a", "of", "language", "model"]
    return " ".join(rng.choices(words, k=rng.randint(1, 6))), " ".join(rng.choices(words, k=rng.randint(0, 6)))


def _random_answers(task: str, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    return {f"u{u}": [_random_pair(task, rng) for _ in range(rng.randint(1, 4))] for u in range(5)}


@pytest.mark.parametrize("task", ["LaMP-2N", "LaMP-3", "LaMP-5"])
def test_per_user_statistics_rebuild_the_official_score_for_any_draw_of_users(task):
    rng = random.Random(7)
    for _ in range(5):
        answers = _random_answers(task, rng)
        labels = LABELS if task == "LaMP-2N" else None
        stats = UserStats.from_row(_row(task, answers, labels))
        draws = [rng.choices(stats.users, k=len(stats.users)) for _ in range(8)]
        counts = np.array([[draw.count(u) for u in stats.users] for draw in draws], dtype=float)
        for draw, score in zip(draws, stats.scores(counts)):
            pairs = [p for user in draw for p in answers[user]]
            metrics = evaluate(task, [g for g, _ in pairs], [o for _, o in pairs], labels)
            assert score == pytest.approx(task_score(task, metrics), abs=1e-12)


def test_identical_answers_differ_by_exactly_zero_in_every_replicate():
    a = _class_stats({"u1": [True, False], "u2": [True], "u3": [False, False]})
    diff = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": a}, replicates=200)
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.share_positive == diff.share_negative == 0.0
    assert diff.users == 3 and diff.tasks == ("LaMP-2N",)


def test_a_method_right_on_every_user_beats_one_wrong_on_every_user_in_every_replicate():
    a = _class_stats({"u1": [True, True], "u2": [True], "u3": [True]})
    b = _class_stats({"u1": [False, False], "u2": [False], "u3": [False]})
    diff = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=300)
    gold = ["sports"] * 4
    expected = task_score("LaMP-2N", evaluate("LaMP-2N", gold, ["sports"] * 4, LABELS)) - task_score(
        "LaMP-2N", evaluate("LaMP-2N", gold, ["food"] * 4, LABELS)
    )
    assert diff.difference == pytest.approx(expected)
    # Every draw has the same per-user pattern, so the interval collapses onto the observed difference.
    assert diff.low == pytest.approx(expected) and diff.high == pytest.approx(expected)
    assert diff.share_positive == 1.0


def test_resampling_is_paired_by_user_and_seeded():
    # a is better on u1 only, b on u2 only: draws differ in sign, so the interval straddles zero.
    a = _class_stats({"u1": [True, True], "u2": [False, False], "u3": [True, False]})
    b = _class_stats({"u1": [False, False], "u2": [True, True], "u3": [True, False]})
    first = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=500, seed=3)
    assert first == paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=500, seed=3)
    assert first != paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=500, seed=4)
    assert first.difference == pytest.approx(0.0)
    assert first.low < 0 < first.high and first.share_positive > 0.2 and first.share_negative > 0.2
    swapped = paired_bootstrap({"LaMP-2N": b}, {"LaMP-2N": a}, replicates=500, seed=3)
    assert swapped.low == pytest.approx(-first.high) and swapped.high == pytest.approx(-first.low)
    # The pairing survives a different user order in the other row.
    reordered = _class_stats({"u3": [True, False], "u2": [True, True], "u1": [False, False]})
    assert paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": reordered}, replicates=500, seed=3) == first


def test_the_observed_difference_is_the_difference_of_task_averaged_official_scores():
    gen_a = {"u1": [("deep nets for parsing", "deep nets for parsing")], "u2": [("a b c", "a b")]}
    gen_b = {"u1": [("deep nets for parsing", "parsing")], "u2": [("a b c", "x y")]}
    same = {"u1": [True], "u2": [False]}
    a = {"LaMP-5": UserStats.from_row(_row("LaMP-5", gen_a)), "LaMP-2N": _class_stats(same)}
    b = {"LaMP-5": UserStats.from_row(_row("LaMP-5", gen_b)), "LaMP-2N": _class_stats(same)}
    diff = paired_bootstrap(a, b, replicates=50)

    def whole(answers):
        pairs = [p for ps in answers.values() for p in ps]
        return task_score("LaMP-5", evaluate("LaMP-5", [g for g, _ in pairs], [o for _, o in pairs]))

    assert diff.difference == pytest.approx((whole(gen_a) - whole(gen_b)) / 2)  # LaMP-2N adds 0
    assert diff.tasks == ("LaMP-5", "LaMP-2N") and diff.users == 4


def test_tasks_without_the_same_users_or_rows_without_answers_are_not_paired():
    a = _class_stats({"u1": [True], "u2": [False]})
    b = _class_stats({"u1": [True], "u3": [False]})
    assert paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}) is None
    assert paired_bootstrap({"LaMP-2N": a}, {}) is None
    assert UserStats.from_row({"task": "LaMP-2N", "metrics": {}}) is None
    with pytest.raises(ValueError):
        paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": a}, replicates=0)

"""The benchmark's paired user bootstrap: exact on constructed answers, paired, seeded, and re-scoring with the
official metrics."""

from __future__ import annotations

import pytest

from prisp.bench.stats import RowPredictions, paired_bootstrap
from prisp.metrics import evaluate, task_score

LABELS = ["politics", "sports", "food"]


def _row(task: str, answers: dict[str, list[tuple[str, str]]], labels=None) -> dict:
    records = [
        {"id": f"{user}-{i}", "user": user, "gold": gold, "output": output}
        for user, pairs in answers.items()
        for i, (gold, output) in enumerate(pairs)
    ]
    return {"task": task, "predictions": records, "labels": labels}


def _class_row(correct: dict[str, list[bool]]) -> RowPredictions:
    answers = {
        user: [("sports", "sports" if ok else "food") for ok in flags] for user, flags in correct.items()
    }
    return RowPredictions.from_row(_row("LaMP-2N", answers, LABELS))


def test_identical_answers_differ_by_exactly_zero_in_every_replicate():
    a = _class_row({"u1": [True, False], "u2": [True], "u3": [False, False]})
    diff = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": a}, replicates=200)
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.share_positive == diff.share_negative == 0.0
    assert diff.users == 3 and diff.tasks == ("LaMP-2N",)


def test_a_method_right_on_every_user_beats_one_wrong_on_every_user_in_every_replicate():
    a = _class_row({"u1": [True, True], "u2": [True], "u3": [True]})
    b = _class_row({"u1": [False, False], "u2": [False], "u3": [False]})
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
    a = _class_row({"u1": [True, True], "u2": [False, False], "u3": [True, False]})
    b = _class_row({"u1": [False, False], "u2": [True, True], "u3": [True, False]})
    first = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=500, seed=3)
    again = paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}, replicates=500, seed=3)
    assert first == again
    assert first.difference == pytest.approx(0.0)
    assert first.low < 0 < first.high and first.share_positive > 0.2 and first.share_negative > 0.2
    swapped = paired_bootstrap({"LaMP-2N": b}, {"LaMP-2N": a}, replicates=500, seed=3)
    assert swapped.low == pytest.approx(-first.high) and swapped.high == pytest.approx(-first.low)


def test_generation_scores_equal_the_official_metric_on_the_whole_set_and_tasks_are_averaged():
    gen_a = {"u1": [("deep nets for parsing", "deep nets for parsing")], "u2": [("a b c", "a b")]}
    gen_b = {"u1": [("deep nets for parsing", "parsing")], "u2": [("a b c", "x y")]}
    a = {
        "LaMP-5": RowPredictions.from_row(_row("LaMP-5", gen_a)),
        "LaMP-2N": _class_row({"u1": [True], "u2": [False]}),
    }
    b = {
        "LaMP-5": RowPredictions.from_row(_row("LaMP-5", gen_b)),
        "LaMP-2N": _class_row({"u1": [True], "u2": [False]}),
    }
    diff = paired_bootstrap(a, b, replicates=50)

    def whole(answers):
        pairs = [p for ps in answers.values() for p in ps]
        return task_score("LaMP-5", evaluate("LaMP-5", [g for g, _ in pairs], [o for _, o in pairs]))

    assert diff.difference == pytest.approx((whole(gen_a) - whole(gen_b)) / 2)  # LaMP-2N adds 0
    assert diff.tasks == ("LaMP-5", "LaMP-2N") and diff.users == 4


def test_tasks_without_the_same_users_or_rows_without_answers_are_not_paired():
    a = _class_row({"u1": [True], "u2": [False]})
    b = _class_row({"u1": [True], "u3": [False]})
    assert paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": b}) is None
    assert paired_bootstrap({"LaMP-2N": a}, {}) is None
    assert RowPredictions.from_row({"task": "LaMP-2N", "metrics": {}}) is None
    with pytest.raises(ValueError):
        paired_bootstrap({"LaMP-2N": a}, {"LaMP-2N": a}, replicates=0)

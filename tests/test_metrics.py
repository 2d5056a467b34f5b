"""LaMP metrics against hand-computed values, including the official evaluation's quirks.

Expected numbers are worked out from the metric definitions in each test, never by calling
the implementation a second way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prisp.data.tasks import LAMP2_TAGS, LAMP2N_OFFICIAL_CATEGORIES
from prisp.errors import DataError
from prisp.metrics import METRIC_KEYS, evaluate, evaluate_files, task_score


def f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- classification


def test_classification_strips_whitespace_on_both_sides():
    result = evaluate("LaMP-1", [" [1]", "[2]\n"], ["[1] ", "\t[2]"])
    assert result == {"accuracy": 1.0, "f1": 1.0}


def test_non_label_prediction_is_wrong_but_not_a_class_in_macro_f1():
    # Mapped golds [0, 0, 1, 1], preds [0, -1, 1, 1].
    result = evaluate("LaMP-1", ["[1]", "[1]", "[2]", "[2]"], ["[1]", "maybe [1]", "[2]", "[2]"])
    assert result["accuracy"] == pytest.approx(3 / 4)
    class0 = f1(precision=1 / 1, recall=1 / 2)  # TP 1, FP 0, FN 1 -> 2/3
    class1 = f1(precision=2 / 2, recall=2 / 2)  # TP 2 -> 1
    assert result["f1"] == pytest.approx((class0 + class1) / 2)  # 5/6
    # Counting -1 as a third class (F1 0) would give 5/9 instead.
    assert result["f1"] != pytest.approx((class0 + class1 + 0.0) / 3)


def test_labels_are_matched_exactly_after_strip():
    # "Comedy" is not the label "comedy": it maps to -1 and counts wrong.
    result = evaluate("LaMP-2", ["comedy"], ["Comedy"])
    assert result["accuracy"] == 0.0
    assert result["f1"] == 0.0


def test_absent_labels_count_as_zero_in_macro_f1():
    # 15 tags, only "comedy" and "action" occur.
    result = evaluate("LaMP-2", ["comedy", "comedy", "action"], ["comedy", "action", "action"])
    comedy = f1(precision=1 / 1, recall=1 / 2)  # 2/3
    action = f1(precision=1 / 2, recall=1 / 1)  # 2/3
    assert len(LAMP2_TAGS) == 15
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx((comedy + action) / 15)  # 4/45


def test_gold_and_prediction_both_outside_label_set_match_for_accuracy():
    # Official quirk: both map to -1, so accuracy counts them equal; F1 ignores -1 entirely.
    result = evaluate("LaMP-1", ["[3]", "[1]"], ["nonsense", "[1]"])
    assert result["accuracy"] == 1.0
    assert result["f1"] == pytest.approx((1.0 + 0.0) / 2)


def test_explicit_labels_override_the_task_label_set():
    result = evaluate("LaMP-2N", ["a", "b"], ["a", "a"], labels=["a", "b", "c"])
    a = f1(precision=1 / 2, recall=1 / 1)
    assert result["accuracy"] == 0.5
    assert result["f1"] == pytest.approx((a + 0 + 0) / 3)


# ---------------------------------------------------------------- regression


def test_regression_unparseable_goes_to_farthest_extreme_and_out_of_range_is_kept():
    golds = ["5", "1", "3", "4"]
    preds = ["five", "n/a", "??", " 7 "]
    # gold 5 -> 1.0 (err 4); gold 1 -> 5.0 (err 4); gold 3 tie -> 5.0 (err 2); "7" kept (err 3).
    errors = [4.0, 4.0, 2.0, 3.0]
    result = evaluate("LaMP-3", golds, preds)
    assert result["MAE"] == pytest.approx(sum(errors) / 4)  # 3.25
    assert result["RMSE"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))  # sqrt(45/4)


def test_regression_tie_at_three_goes_to_five():
    result = evaluate("LaMP-3", ["3"], ["not a number"])
    assert result == {"MAE": 2.0, "RMSE": 2.0}
    # Gold 2 is closer to 1, so the farthest extreme is 5.0.
    assert evaluate("LaMP-3", ["2"], [""])["MAE"] == 3.0
    # Gold 4 is closer to 5, so the farthest extreme is 1.0.
    assert evaluate("LaMP-3", ["4"], ["x"])["MAE"] == 3.0


def test_rmse_differs_from_mae():
    result = evaluate("LaMP-3", ["1", "1"], ["1", "3.0"])
    assert result["MAE"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert result["RMSE"] == pytest.approx(math.sqrt(2.0))  # sqrt((0 + 4) / 2)


def test_regression_unparseable_gold_is_a_data_error():
    with pytest.raises(DataError, match="not a number"):
        evaluate("LaMP-3", ["three"], ["3"])


# ---------------------------------------------------------------- generation


def test_rouge1_and_rougeL_by_hand():
    # Same four words, different order: unigram overlap 4/4, LCS "police arrest" = 2 of 4.
    result = evaluate("LaMP-4", ["police arrest the suspect"], ["the suspect police arrest"])
    assert result["rouge-1"] == pytest.approx(1.0)
    assert result["rouge-L"] == pytest.approx(f1(2 / 4, 2 / 4))


def test_rouge_clipped_unigram_counts_and_precision_recall_asymmetry():
    # target: the cat sat on the mat (6); pred: the cat lay on a mat (6).
    # clipped overlap: the (min 2,1) + cat + on + mat = 4; LCS "the cat on mat" = 4.
    result = evaluate("LaMP-5", ["the cat sat on the mat"], ["the cat lay on a mat"])
    assert result["rouge-1"] == pytest.approx(f1(4 / 6, 4 / 6))
    assert result["rouge-L"] == pytest.approx(f1(4 / 6, 4 / 6))
    # pred covers 2 of 5 target words: P = 2/2, R = 2/5.
    result = evaluate("LaMP-7", ["the quick brown fox jumps"], ["quick fox"])
    assert result["rouge-1"] == pytest.approx(f1(1.0, 2 / 5))  # 4/7
    assert result["rouge-L"] == pytest.approx(f1(1.0, 2 / 5))


def test_rouge_has_no_stemming():
    result = evaluate("LaMP-4", ["running"], ["run"])
    assert result == {"rouge-1": 0.0, "rouge-L": 0.0}
    result = evaluate("LaMP-4", ["running fast"], ["run fast"])
    assert result["rouge-1"] == pytest.approx(f1(1 / 2, 1 / 2))


def test_rouge_tokenization_is_case_and_punctuation_insensitive():
    result = evaluate("LaMP-4", ["  Hello, World!  "], ["hello world"])
    assert result == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_rouge_is_the_mean_over_examples():
    # Example 1 scores 1.0/1.0, example 2 scores 1.0/0.5, empty prediction scores 0.
    result = evaluate(
        "LaMP-4",
        ["big win", "police arrest the suspect", "anything"],
        ["big win", "the suspect police arrest", ""],
    )
    assert result["rouge-1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert result["rouge-L"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


# ---------------------------------------------------------------- evaluate errors, task_score


@pytest.mark.parametrize(
    ("golds", "preds", "message"),
    [
        ([], [], "nothing to evaluate"),
        (["a"], ["a", "b"], "1 golds but 2 predictions"),
        (["a"], [None], "prediction #0"),
    ],
)
def test_evaluate_rejects_bad_input(golds, preds, message):
    with pytest.raises(DataError, match=message):
        evaluate("LaMP-4", golds, preds)


def test_evaluate_rejects_unknown_task():
    with pytest.raises(DataError, match="unknown task"):
        evaluate("LaMP-9", ["a"], ["a"])


def test_task_score_per_kind():
    assert task_score("LaMP-1", {"accuracy": 0.8, "f1": 0.6}) == pytest.approx(0.7)
    assert task_score("LaMP_3", {"MAE": 0.3, "RMSE": 0.5}) == pytest.approx(1 - 0.4)
    assert task_score("LaMP-7", {"rouge-1": 0.4, "rouge-L": 0.3}) == pytest.approx(0.35)
    with pytest.raises(DataError, match="RMSE"):
        task_score("LaMP-3", {"MAE": 0.3})


def test_metric_keys_match_evaluate_output():
    assert set(evaluate("LaMP-1", ["[1]"], ["[1]"])) == set(METRIC_KEYS["classification"])
    assert set(evaluate("LaMP-3", ["1"], ["1"])) == set(METRIC_KEYS["regression"])
    assert set(evaluate("LaMP-4", ["a b"], ["a b"])) == set(METRIC_KEYS["generation"])


# ---------------------------------------------------------------- evaluate_files


def write_outputs(path: Path, task: str, pairs: list[tuple[str, str]]) -> Path:
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": o} for i, o in pairs]}))
    return path


def test_evaluate_files_official_spelling_matches_by_id(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_4", [("1", "big win"), ("2", "running")])
    # Predictions in a different order, hyphenated spelling.
    preds = write_outputs(tmp_path / "p.json", "LaMP-4", [("2", "run"), ("1", "big win")])
    result = evaluate_files("LaMP-4", golds, preds)
    assert result == {"rouge-1": 0.5, "rouge-L": 0.5}


def test_evaluate_files_missing_prediction_names_id_and_file(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_4", [("1", "a"), ("2", "b"), ("3", "c")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_4", [("1", "a")])
    with pytest.raises(DataError, match=r"no prediction for id '2'.*p\.json"):
        evaluate_files("LaMP-4", golds, preds)
    # --partial scores the predicted subset only: one exact match -> ROUGE 1.0.
    assert evaluate_files("LaMP-4", golds, preds, partial=True) == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_evaluate_files_extra_prediction_names_id_and_file(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_4", [("1", "a")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_4", [("1", "a"), ("99", "z"), ("98", "y")])
    with pytest.raises(DataError, match=r"prediction id '99' in .*p\.json.*is not in .*g\.json"):
        evaluate_files("LaMP-4", golds, preds)


def test_evaluate_files_task_mismatch_names_both(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_5", [("1", "a")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_4", [("1", "a")])
    with pytest.raises(DataError, match=r"'LaMP_5'.*'LaMP-4'"):
        evaluate_files("LaMP-4", golds, preds)


def test_evaluate_files_malformed_json_and_missing_fields(tmp_path):
    good = write_outputs(tmp_path / "g.json", "LaMP_4", [("1", "a")])
    broken = tmp_path / "broken.json"
    broken.write_text('{"task": "LaMP_4", "golds": [')
    with pytest.raises(DataError, match=r"broken\.json.*not valid JSON"):
        evaluate_files("LaMP-4", good, broken)
    no_golds = tmp_path / "no_golds.json"
    no_golds.write_text(json.dumps({"task": "LaMP_4"}))
    with pytest.raises(DataError, match=r"no_golds\.json.*'golds'"):
        evaluate_files("LaMP-4", no_golds, good)
    no_output = tmp_path / "no_output.json"
    no_output.write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "1"}]}))
    with pytest.raises(DataError, match=r"no_output\.json.*'output'"):
        evaluate_files("LaMP-4", good, no_output)
    with pytest.raises(DataError, match=r"file not found: .*missing\.json"):
        evaluate_files("LaMP-4", good, tmp_path / "missing.json")


def test_evaluate_files_lamp2n_reads_labels_from_questions(tmp_path):
    # Official LaMP v1 news files say "LaMP_2".
    golds = write_outputs(tmp_path / "g.json", "LaMP_2", [("1", "travel"), ("2", "business")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_2", [("1", "travel"), ("2", "travel")])
    question = (
        "Which category does this article relate to among the following categories? Just answer with the "
        "category name without further explanation. categories: [travel, business, sports] article: ..."
    )
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "1", "input": question, "profile": []},
                                     {"id": "2", "input": question, "profile": []}]))
    travel = f1(precision=1 / 2, recall=1 / 1)  # 2/3; business and sports score 0
    with_questions = evaluate_files("LaMP-2N", golds, preds, questions_path=questions)
    assert with_questions["accuracy"] == 0.5
    assert with_questions["f1"] == pytest.approx(travel / 3)  # 2/9
    fallback = evaluate_files("LaMP-2N", golds, preds)
    assert len(LAMP2N_OFFICIAL_CATEGORIES) == 15
    assert fallback["f1"] == pytest.approx(travel / 15)  # 2/45

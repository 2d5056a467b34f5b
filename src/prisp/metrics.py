"""LaMP metrics, reproducing the official evaluation (Salemi et al., ``eval/evaluation.py``).

The official script's quirks are kept on purpose so numbers stay comparable with published
LaMP results:

* Classification maps every stripped string to its index in the label list, anything else to
  ``-1``. Macro-F1 is taken over ``labels=range(len(labels))`` only, so ``-1`` is never a
  class but still counts as wrong; labels that never occur still count (with F1 = 0).
  A gold and a prediction that are both outside the label set both map to ``-1`` and so
  count as a match for accuracy, exactly as in the official script.
* Regression parses ``float(pred)``; an unparseable prediction becomes the extreme (1 or 5)
  farthest from the gold (a tie at gold 3 goes to 5.0). Parseable out-of-range values such
  as ``"7"`` are not clamped.
* Generation reports ROUGE-1 / ROUGE-L F-measure from ``rouge-score`` without stemming,
  averaged over examples (the official script reports the bootstrap "mid", which differs
  only slightly from the mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from prisp.data.lamp import parse_outputs, read_json
from prisp.data.tasks import get_task, label_set
from prisp.errors import DataError

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "regression": ("MAE", "RMSE"),
    "generation": ("rouge-1", "rouge-L"),
}


def metric_keys(task: str) -> tuple[str, ...]:
    """The metrics ``evaluate`` reports for ``task``: its kind's, plus ``meteor`` for ``rouge-meteor`` tasks."""
    spec = get_task(task)
    return METRIC_KEYS[spec.kind] + (("meteor",) if spec.metric == "rouge-meteor" else ())


def evaluate(
    task: str, golds: list[str], preds: list[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Score predictions against golds with the task's official LaMP metrics.

    Args:
        task: a LaMP task name in any accepted spelling (``"LaMP-4"``, ``"LaMP_4"`` ...).
        golds: reference outputs, one per example.
        preds: model outputs, aligned with ``golds``.
        labels: the label list for classification tasks; defaults to ``label_set(task)``
            (for LaMP-2N the official fallback categories). Ignored for other kinds.

    Returns:
        The metrics named by :func:`metric_keys` (``METRIC_KEYS[kind]``, plus METEOR for LongLaMP-style tasks).

    Raises:
        DataError: unknown task, empty input, length mismatch, a non-string entry, an
            empty label set, or an unparseable regression gold.
    """
    spec = get_task(task)
    _check_pairs(golds, preds)
    if spec.kind == "classification":
        label_list = tuple(label_set(spec.name) if labels is None else labels)
        if not label_list:
            raise DataError(f"{spec.name}: the label set is empty")
        return classification_metrics(golds, preds, label_list)
    if spec.kind == "regression":
        return regression_metrics(golds, preds)
    metrics = generation_metrics(golds, preds)
    if spec.metric == "rouge-meteor":
        from prisp.meteor import meteor_per_query

        metrics["meteor"] = sum(meteor_per_query(golds, preds)) / len(golds)
    return metrics


def _check_pairs(golds: list[str], preds: list[str]) -> None:
    if len(golds) != len(preds):
        raise DataError(f"{len(golds)} golds but {len(preds)} predictions; they must align one to one")
    if not golds:
        raise DataError("nothing to evaluate: no golds and no predictions")
    for name, values in (("gold", golds), ("prediction", preds)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"{name} #{i} is {type(value).__name__}, expected a string")


def classification_metrics(golds: list[str], preds: list[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the label indices, non-labels mapped to ``-1``."""
    # Imported here: scikit-learn costs about a second, which CLI commands not scoring should not pay.
    from sklearn.metrics import accuracy_score, f1_score

    gold_ids, pred_ids = label_ids(golds, labels), label_ids(preds, labels)
    accuracy = accuracy_score(gold_ids, pred_ids)
    # labels=range(n): -1 is never a class (so it only costs recall), absent labels still count as 0.
    f1 = f1_score(gold_ids, pred_ids, labels=list(range(len(labels))), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1)}


def label_ids(values: Sequence[str], labels: Sequence[str]) -> list[int]:
    """Each stripped value's index in ``labels``, ``-1`` when it is no label (the official mapping)."""
    # Reversed so the first occurrence wins, like the official list.index(), if a label repeats.
    index = {label: i for i, label in reversed(list(enumerate(labels)))}
    return [index.get(v.strip(), -1) for v in values]


def _parse_rating(pred: str, gold: float) -> float:
    try:
        return float(pred.strip())
    except ValueError:
        # Official quirk: punish an unparseable answer with the farthest extreme; ties go to 5.0.
        return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def regression_metrics(golds: list[str], preds: list[str]) -> dict[str, float]:
    """MAE and RMSE of parsed ratings; unparseable predictions become the farthest extreme."""
    errors = rating_errors(golds, preds)
    mae = sum(abs(e) for e in errors) / len(errors)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    return {"MAE": mae, "RMSE": rmse}


def rating_errors(golds: Sequence[str], preds: Sequence[str]) -> list[float]:
    """Per query, parsed prediction minus gold rating (unparseable predictions at the farthest extreme)."""
    gold_values: list[float] = []
    for i, gold in enumerate(golds):
        try:
            gold_values.append(float(gold.strip()))
        except ValueError:
            raise DataError(f"gold #{i} is not a number: {gold!r}") from None
    return [_parse_rating(p, g) - g for p, g in zip(preds, gold_values)]


def generation_metrics(golds: list[str], preds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (rouge-score tokenizer, no stemming)."""
    per_query = rouge_per_query(golds, preds)
    return {
        "rouge-1": sum(r1 for r1, _ in per_query) / len(golds),
        "rouge-L": sum(rl for _, rl in per_query) / len(golds),
    }


def rouge_per_query(golds: Sequence[str], preds: Sequence[str]) -> list[tuple[float, float]]:
    """Per query, ROUGE-1 and ROUGE-L F-measure (rouge-score tokenizer, no stemming)."""
    # Imported here: rouge-score pulls in nltk (seconds), which only generation scoring needs.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    out = []
    for gold, pred in zip(golds, preds):
        scores = scorer.score(target=gold.strip(), prediction=pred.strip())
        out.append((scores["rouge1"].fmeasure, scores["rougeL"].fmeasure))
    return out


def task_score(task: str, metrics: dict[str, float]) -> float:
    """One number per task for averaging across tasks.

    (accuracy + f1) / 2 for classification, 1 - (MAE + RMSE) / 2 for regression and
    (rouge-1 + rouge-L) / 2 for generation, as in the design's results tables.

    Raises:
        DataError: unknown task or a metric the task's kind needs is missing.
    """
    spec = get_task(task)
    keys = METRIC_KEYS[spec.kind]
    missing = [k for k in keys if k not in metrics]
    if missing:
        have = ", ".join(metrics) or "none"
        raise DataError(f"{spec.name}: metrics lack {', '.join(missing)} (have {have})")
    first, second = (float(metrics[k]) for k in keys)
    if spec.kind == "regression":
        return 1.0 - (first + second) / 2
    return (first + second) / 2


def evaluate_files(
    task: str,
    golds_path: str | Path,
    preds_path: str | Path,
    questions_path: str | Path | None = None,
    partial: bool = False,
) -> dict[str, float]:
    """Score a LaMP predictions file against a LaMP outputs file, matching by id.

    Both files use the LaMP output format ``{"task": "LaMP_4", "golds": [{"id", "output"}]}``
    (``LaMP_4`` and ``LaMP-4`` spellings both accepted).

    Args:
        task: the task both files must be for.
        golds_path: the reference outputs file.
        preds_path: the predictions file, same format.
        questions_path: the questions file (``[{"id", "input", "profile"}]``); for LaMP-2N
            its inputs supply the category list, otherwise the official fallback is used.
        partial: score only the golds that have a prediction (e.g. after ``predict --limit``).

    Returns:
        The same metrics as :func:`evaluate`, in golds-file order.

    Raises:
        DataError: unreadable or malformed file, a task mismatch, or ids that do not match
            one to one between the files.
    """
    spec = get_task(task)
    _, golds = parse_outputs(read_json(Path(golds_path)), spec.name, golds_path)
    _, preds = parse_outputs(read_json(Path(preds_path)), spec.name, preds_path)
    if partial:
        golds = {i: g for i, g in golds.items() if i in preds}
    for gold_id in golds:
        if gold_id not in preds:
            raise DataError(f"no prediction for id {gold_id!r} of {str(golds_path)!r} in {str(preds_path)!r} "
                            "(use --partial to score a subset)")
    for pred_id in preds:
        if pred_id not in golds:
            raise DataError(f"prediction id {pred_id!r} in {str(preds_path)!r} is not in {str(golds_path)!r}")
    labels = None
    if spec.labels_from_input:
        inputs = _read_question_inputs(Path(questions_path)) if questions_path is not None else None
        labels = label_set(spec.name, inputs)
    ids = list(golds)
    return evaluate(spec.name, [golds[i] for i in ids], [preds[i] for i in ids], labels)


def _read_question_inputs(path: Path) -> list[str]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r}: expected a list of questions, got {type(data).__name__}")
    inputs: list[str] = []
    for i, question in enumerate(data):
        if not isinstance(question, dict) or not isinstance(question.get("input"), str):
            raise DataError(f"{str(path)!r}: question [{i}] lacks a string field 'input'")
        inputs.append(question["input"])
    return inputs

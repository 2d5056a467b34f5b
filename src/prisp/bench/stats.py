"""How much a benchmark difference means: a paired bootstrap over target users.

Every method answers the same users' queries, so the uncertainty of "PRISP minus a baseline" comes from which
users happened to be sampled. One replicate draws each task's users with replacement (the same draw for both
methods), re-scores both methods' stored predictions on that draw with the official metrics (macro-F1 and RMSE
are not per-query means, so the whole metric is recomputed) and averages over the tasks both have. Users, not
queries, are resampled because a user's queries share one adapter and are not independent.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from prisp.data.tasks import get_task
from prisp.metrics import evaluate, task_score


@dataclass(frozen=True)
class RowPredictions:
    """One result row's per-query answers, grouped by user (from the row's ``predictions``)."""

    task: str
    by_user: dict[str, list[tuple[str, str]]]  # user -> [(gold, output)], in query order
    labels: tuple[str, ...] | None

    @classmethod
    def from_row(cls, row: dict) -> RowPredictions | None:
        """None for a row written before predictions were recorded."""
        records = row.get("predictions")
        if not records:
            return None
        by_user: dict[str, list[tuple[str, str]]] = {}
        for record in records:
            by_user.setdefault(record["user"], []).append((record["gold"] or "", record["output"]))
        labels = row.get("labels")
        return cls(row["task"], by_user, tuple(labels) if labels is not None else None)

    def score(self, users: Sequence[str], scorer: _Scorer) -> float:
        pairs = [pair for user in users for pair in self.by_user[user]]
        return scorer(self, pairs)


class _Scorer:
    """Task scores of resampled query sets; generation tasks reuse per-query ROUGE (a per-query mean)."""

    def __init__(self):
        self._rouge: dict[tuple[str, str, str], dict[str, float]] = {}

    def __call__(self, rows: RowPredictions, pairs: list[tuple[str, str]]) -> float:
        golds = [g for g, _ in pairs]
        outputs = [o for _, o in pairs]
        if get_task(rows.task).kind != "generation":
            return task_score(rows.task, evaluate(rows.task, golds, outputs, rows.labels))
        per_query = [self._one_rouge(rows.task, g, o) for g, o in pairs]
        metrics = {k: statistics.fmean(m[k] for m in per_query) for k in per_query[0]}
        return task_score(rows.task, metrics)

    def _one_rouge(self, task: str, gold: str, output: str) -> dict[str, float]:
        key = (task, gold, output)
        if key not in self._rouge:
            self._rouge[key] = evaluate(task, [gold], [output])
        return self._rouge[key]


@dataclass(frozen=True)
class PairedDifference:
    """``a`` minus ``b`` in task-averaged score, with a percentile bootstrap interval over users."""

    tasks: tuple[str, ...]
    users: int  # target users summed over those tasks
    difference: float  # on the users actually run (equals the Avg. difference over ``tasks``)
    low: float
    high: float
    share_positive: float  # fraction of replicates with a > b
    share_negative: float  # fraction of replicates with a < b


def paired_bootstrap(
    a: dict[str, RowPredictions],
    b: dict[str, RowPredictions],
    replicates: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference | None:
    """Bootstrap ``mean_task(score_a) - mean_task(score_b)`` over the tasks both have (keyed by task).

    Returns None when the two share no task with the same users (nothing to pair).
    """
    if replicates < 1 or not 0 < level < 1:
        raise ValueError("replicates must be >= 1 and level in (0, 1)")
    tasks = tuple(t for t in a if t in b and set(a[t].by_user) == set(b[t].by_user))
    if not tasks:
        return None
    scorer = _Scorer()
    users = {t: sorted(a[t].by_user) for t in tasks}

    def difference(draw: dict[str, list[str]]) -> float:
        return statistics.fmean(a[t].score(draw[t], scorer) - b[t].score(draw[t], scorer) for t in tasks)

    observed = difference(users)
    rng = random.Random(seed)
    samples = sorted(
        difference({t: rng.choices(users[t], k=len(users[t])) for t in tasks}) for _ in range(replicates)
    )
    tail = (1 - level) / 2
    return PairedDifference(
        tasks,
        sum(len(u) for u in users.values()),
        observed,
        _quantile(samples, tail),
        _quantile(samples, 1 - tail),
        sum(s > 0 for s in samples) / replicates,
        sum(s < 0 for s in samples) / replicates,
    )


def _quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

"""How much a benchmark difference means: a paired bootstrap over target users.

Every method answers the same users' queries, so the uncertainty of "PRISP minus a baseline" comes from which
users happened to be sampled. One replicate draws each task's users with replacement (the same draw for both
methods), re-scores both methods on that draw with the official metrics and averages over the tasks both have.
Users, not queries, are resampled because a user's queries share one adapter and are not independent.

Macro-F1 and RMSE are not per-query means, so each user is reduced to additive counts (confusion counts, error
sums, ROUGE sums) from which the official metric is rebuilt exactly for any multiset of users; that keeps
thousands of replicates to a few matrix products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prisp.data.tasks import get_task
from prisp.metrics import label_ids, rating_errors, rouge_per_query


@dataclass(frozen=True)
class UserStats:
    """One result row reduced to additive per-user statistics (rows of ``table``, one per user)."""

    task: str
    users: tuple[str, ...]
    table: np.ndarray  # (users, statistics), float64
    labels: int  # number of labels (classification), else 0

    @classmethod
    def from_row(cls, row: dict) -> UserStats | None:
        """From a results row's ``predictions``; None for a row written before they were recorded."""
        records = row.get("predictions")
        if not records:
            return None
        position = {user: i for i, user in enumerate(dict.fromkeys(r["user"] for r in records))}
        golds = [r["gold"] or "" for r in records]
        outputs = [r["output"] for r in records]
        per_query, labels = _per_query(row["task"], golds, outputs, row.get("labels"))
        table = np.zeros((len(position), per_query.shape[1]))
        np.add.at(table, [position[r["user"]] for r in records], per_query)
        return cls(row["task"], tuple(position), table, labels)

    def scores(self, counts: np.ndarray) -> np.ndarray:
        """Task scores for each row of ``counts`` (how often each user is drawn, shape (draws, users))."""
        totals = np.atleast_2d(counts) @ self.table
        kind = get_task(self.task).kind
        n = totals[:, 1]
        if kind == "classification":
            tp, fp, fn = np.split(totals[:, 2:], 3, axis=1)
            denominator = 2 * tp + fp + fn
            f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
            return (totals[:, 0] / n + f1.mean(axis=1)) / 2
        if kind == "regression":
            return 1 - (totals[:, 0] / n + np.sqrt(totals[:, 2] / n)) / 2
        return (totals[:, 0] / n + totals[:, 2] / n) / 2


def _per_query(task: str, golds: list[str], outputs: list[str], labels) -> tuple[np.ndarray, int]:
    """Per-query statistics; column 1 is always the query count."""
    kind = get_task(task).kind
    ones = np.ones(len(golds))
    if kind == "classification":
        n_labels = len(labels)
        gold, pred = np.array(label_ids(golds, labels)), np.array(label_ids(outputs, labels))
        classes = np.arange(n_labels)
        is_gold, is_pred = gold[:, None] == classes, pred[:, None] == classes
        correct = (gold == pred).astype(float)  # both outside the label set count as a match (official quirk)
        return np.column_stack([correct, ones, is_gold & is_pred, is_pred & ~is_gold, is_gold & ~is_pred]).astype(
            float
        ), n_labels
    if kind == "regression":
        errors = np.array(rating_errors(golds, outputs))
        return np.column_stack([np.abs(errors), ones, errors**2]), 0
    rouge = np.array(rouge_per_query(golds, outputs)).reshape(-1, 2)
    return np.column_stack([rouge[:, 0], ones, rouge[:, 1]]), 0


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
    a: dict[str, UserStats],
    b: dict[str, UserStats],
    replicates: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference | None:
    """Bootstrap ``mean_task(score_a) - mean_task(score_b)`` over the tasks both have (keyed by task).

    Returns None when the two share no task with the same users (nothing to pair).
    """
    if replicates < 1 or not 0 < level < 1:
        raise ValueError("replicates must be >= 1 and level in (0, 1)")
    tasks = tuple(t for t in a if t in b and set(a[t].users) == set(b[t].users))
    if not tasks:
        return None
    rng = np.random.default_rng(seed)
    observed = 0.0
    samples = np.zeros(replicates)
    for task in tasks:
        first, second = a[task], _aligned(b[task], a[task].users)
        n = len(first.users)
        draws = rng.integers(0, n, size=(replicates, n))
        counts = np.zeros((replicates, n))
        np.add.at(counts, (np.arange(replicates)[:, None], draws), 1)
        samples += (first.scores(counts) - second.scores(counts)) / len(tasks)
        everyone = np.ones((1, n))
        observed += float(first.scores(everyone)[0] - second.scores(everyone)[0]) / len(tasks)
    tail = (1 - level) / 2
    return PairedDifference(
        tasks,
        sum(len(a[t].users) for t in tasks),
        observed,
        float(np.quantile(samples, tail)),
        float(np.quantile(samples, 1 - tail)),
        float(np.mean(samples > 1e-12)),
        float(np.mean(samples < -1e-12)),
    )


def _aligned(stats: UserStats, users: Sequence[str]) -> UserStats:
    """``stats`` with its table rows in the order of ``users``."""
    order = [stats.users.index(u) for u in users]
    return UserStats(stats.task, tuple(users), stats.table[order], stats.labels)

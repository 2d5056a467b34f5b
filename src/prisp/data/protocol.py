"""The few-shot protocol of the paper: recent history items, Per-Pcs user split, task samples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from prisp.data.lamp import ProfileItem, Query
from prisp.errors import DataError

DEFAULT_K = 10
DEFAULT_TASK_SAMPLES = 50


def recent_items(profile: Sequence[ProfileItem], k: int = DEFAULT_K) -> list[ProfileItem]:
    """A user's ``k`` most recent items, oldest first.

    Items are ordered by ``date`` when every item has one (ties keep file order, which LaMP uses
    for same-day order); otherwise by file order, which LaMP writes chronologically.
    """
    if k <= 0:
        raise DataError(f"k must be positive, got {k}")
    indexed = list(enumerate(profile))
    if indexed and all(item.date for _, item in indexed):
        indexed.sort(key=lambda pair: (pair[1].date, pair[0]))
    return [item for _, item in indexed[-k:]]


@dataclass(frozen=True)
class UserSplit:
    """Disjoint user groups of the Per-Pcs protocol."""

    task_adaptive: list[str]
    targets: list[str]
    sharers: list[str]


def per_pcs_split(user_ids: Sequence[str], seed: int = 0, task_fraction: float = 0.25,
                  n_targets: int = 100) -> UserSplit:
    """Split users into task-adaptive (25%), target (up to ``n_targets``) and sharer candidates (the rest).

    The shuffle is seeded so every method of a benchmark sees the same users.
    """
    if not 0.0 <= task_fraction < 1.0:
        raise DataError(f"task_fraction must be in [0, 1), got {task_fraction}")
    users = sorted(set(user_ids))
    random.Random(seed).shuffle(users)
    n_task = int(round(len(users) * task_fraction))
    rest = users[n_task:]
    n_tgt = min(n_targets, len(rest))
    return UserSplit(users[:n_task], rest[:n_tgt], rest[n_tgt:])


def sample_task_queries(queries: Sequence[Query], n: int = DEFAULT_TASK_SAMPLES, seed: int = 0) -> list[Query]:
    """``n`` random task-level examples (from task-adaptive users), seeded; all of them when fewer exist."""
    if n <= 0:
        raise DataError(f"the number of task samples must be positive, got {n}")
    pool = list(queries)
    if not pool:
        raise DataError("no task-level queries to sample from")
    rng = random.Random(seed)
    return rng.sample(pool, min(n, len(pool)))

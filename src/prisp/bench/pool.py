"""``prisp bench --workers N``: the users of a personal-method cell on the batch runner's process pool.

The users of a (task, method, variant) cell of PRISP, OPPU or an ablation are independent: each is
personalized from their own history and answers their own queries. With N > 1 workers the driver sends
each user, as a :class:`PersonalJob`, to :class:`prisp.batch.LocalBackend` (a forkserver pool whose
workers load the base model once, with ``cores // N`` torch threads each), and merges the results in the
split's query order with the sequential path's own merge, so a row is the one ``--workers 1`` writes.

One pool serves every personal cell of a task: its spec carries the anchors those cells start from, and
each job names its anchor. Sharer (Per-Pcs, PriME) and prompt-only methods still run in the driver.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prisp.adapters import LoraWeights
from prisp.batch.backends import LocalBackend, outcomes
from prisp.batch.config import WorkerPlan
from prisp.batch.worker import UserOutcome, WorkerContext, WorkerSpec
from prisp.data.lamp import LampSplit
from prisp.errors import PrispError
from prisp.personalize import PersonalizeConfig
from prisp.personalize.per_user import (
    PersonalizedRun,
    UserRequest,
    merge_users,
    predict_user,
    user_requests,
)
from prisp.predict import PredictConfig


@dataclass(frozen=True)
class PersonalJob:
    """One user of a personal cell, as a pool worker runs it (a :class:`prisp.batch.worker.Job`).

    Attributes:
        request: the user's queries and every option, exactly as the sequential loop gets them.
        anchor: the key of the worker spec's ``anchors`` this user starts from.
    """

    request: UserRequest
    anchor: str

    @property
    def user_id(self) -> str:
        return self.request.user

    def execute(self, context: WorkerContext, outcome: UserOutcome) -> None:
        """Personalize (or read the cached adapter) and answer; a ``UserPrediction`` goes back."""
        spec = context.spec
        outcome.result = predict_user(context.model, context.tokenizer, spec.model_name,
                                      spec.anchor_named(self.anchor), self.request)


@dataclass
class PooledRun:
    """A cell run on the pool: what the sequential path returns, and which worker ran each user."""

    result: PersonalizedRun
    workers: dict[str, str]  # {user: "host:pid"}


class UserPool:
    """Worker processes for the personal cells of one task; they start with the first job.

    Args:
        model: the base model as the run names it (recorded in adapters, part of the cache key).
        source: where workers load it from (resolved by the driver, so a registered model converts once).
        device: where workers run it (None: CPU).
        task, labels: the task every job belongs to.
        anchors: ``{name: anchor}`` for every personal cell this pool will run.
        plan: workers and torch threads per worker.
    """

    def __init__(self, model: str, source: str, device: str | None, task: str, labels: Sequence[str],
                 anchors: Mapping[str, LoraWeights], plan: WorkerPlan) -> None:
        self.plan = plan
        self.task = task
        spec = WorkerSpec(model, source, None, task, tuple(labels), plan.threads, anchors=dict(anchors),
                          device=device)
        self._backend = LocalBackend(spec, plan.workers)

    def predict(self, split: LampSplit, anchor: str, config: PersonalizeConfig, predict_config: PredictConfig,
                cache_dir: Path | None, on_user: Callable[[str], None] | None = None) -> PooledRun:
        """What :func:`prisp.personalize.per_user.predict_personalized` returns, with users run in parallel.

        Raises:
            PrispError: a user failed (the cell writes no row; a re-run reuses the users already cached).
        """
        requests = user_requests(split, config, predict_config, cache_dir)
        done = self._run([PersonalJob(request, anchor) for request in requests], on_user)
        merged = merge_users(split, predict_config, [done[r.user].result for r in requests])
        return PooledRun(merged, {r.user: done[r.user].worker for r in requests})

    def _run(self, jobs: list[PersonalJob], on_user) -> dict[str, UserOutcome]:
        """Keep every worker busy until each job is back; the first failure stops the cell."""
        done = {}
        for job, outcome in outcomes(self._backend, deque(jobs)):
            if not outcome.ok:
                raise PrispError(f"{self.task} user {job.user_id}: {outcome.error}")
            done[job.user_id] = outcome
            if on_user:
                on_user(job.user_id)
        return done

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._backend.close()

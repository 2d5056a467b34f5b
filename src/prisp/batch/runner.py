"""The batch driver: decide which users need work, keep the workers busy, retry, record, summarise.

Every user is one idempotent job keyed by its id. A user whose stored adapter was made from the
same inputs (same job key) is skipped; a failed user is retried a bounded number of times while
the others go on; each outcome is stored and logged by this one process as it arrives, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from prisp.adapters import LoraWeights
from prisp.batch.backends import Backend, make_backend, outcomes
from prisp.batch.config import BatchConfig, WorkerPlan
from prisp.batch.sink import AdapterSink
from prisp.batch.users import UserJob, UserSet
from prisp.batch.worker import Assignment, UserOutcome, WorkerSpec
from prisp.data.protocol import recent_items
from prisp.data.tasks import get_task
from prisp.errors import PrispError
from prisp.personalize.cache import anchor_digest, personalization_key

BackendFactory = Callable[[WorkerSpec, WorkerPlan], Backend]


@dataclass
class BatchSummary:
    """What a run did.

    Attributes:
        run_id: ties the run's lines in the log together.
        done, skipped, failed: user counts (skipped = already finished with the same inputs).
        failures: ``{user_id: error}`` of the failed users.
        wall_seconds: the run's wall time, worker start-up included.
        user_seconds: each trained user's job time inside its worker.
        worker_peak_mb: ``{worker: peak resident memory in MB}`` (model load included).
        plan: workers and threads per worker used.
    """

    run_id: str
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    user_seconds: list[float] = field(default_factory=list)
    worker_peak_mb: dict[str, float] = field(default_factory=dict)
    plan: WorkerPlan | None = None

    @property
    def users_per_hour(self) -> float:
        """Users trained per hour of wall time (0 when none was trained)."""
        return self.done * 3600 / self.wall_seconds if self.done and self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "users_per_hour": self.users_per_hour}

    def describe(self) -> str:
        """The end-of-run summary for a terminal."""
        lines = [f"{self.total} users: {self.done} done, {self.skipped} skipped, {self.failed} failed "
                 f"in {self.wall_seconds:.1f} s ({self.users_per_hour:.1f} users/hour)"]
        if self.user_seconds:
            lines.append(f"per user: {sum(self.user_seconds) / len(self.user_seconds):.1f} s mean inside a worker")
        if self.worker_peak_mb:
            peaks = ", ".join(f"{mb:.0f}" for mb in sorted(self.worker_peak_mb.values()))
            lines.append(f"peak memory per worker (MB): {peaks}")
        lines += [f"failed {user}: {error}" for user, error in sorted(self.failures.items())]
        return "\n".join(lines)


def job_key(anchor_hash: str, config: BatchConfig, labels: tuple[str, ...], job: UserJob) -> str:
    """Names the inputs of one user's job (:func:`prisp.personalize.cache.personalization_key`): any change
    to them means the stored adapter is stale."""
    user_config = config.user_config(job.user_id)
    return personalization_key(config.model, anchor_hash, user_config, config.task, labels=labels,
                               items=recent_items(job.items, user_config.k))


def _default_factory(config: BatchConfig) -> BackendFactory:
    def factory(spec: WorkerSpec, plan: WorkerPlan) -> Backend:
        # On a cluster we joined, an unset --workers means "as many as its CPUs allow".
        workers = None if config.ray_address and config.workers is None else plan.workers
        return make_backend(config.backend, spec, workers, plan.threads, config.ray_address)

    return factory


def _worker_spec(config: BatchConfig, anchor: LoraWeights, labels: tuple[str, ...], threads: int) -> WorkerSpec:
    from prisp.models import resolve_model

    # Resolving here converts a registered model once, before workers could race to convert it.
    source, _ = resolve_model(config.model)
    spec = get_task(config.task)
    return WorkerSpec(config.model, source, anchor, config.task, labels, threads,
                      custom_task=None if spec.builtin else spec)


class _Run:
    """State of one run while it executes (the public entry point is :func:`run_batch`)."""

    def __init__(self, config: BatchConfig, users: UserSet, sink: AdapterSink, anchor: LoraWeights, progress: bool):
        from tqdm import tqdm

        self.config, self.users, self.sink = config, users, sink
        self.anchor = anchor
        self.anchor_hash = anchor_digest(anchor)
        self.summary = BatchSummary(uuid.uuid4().hex[:12], len(users.jobs), plan=config.plan())
        self.keys: dict[str, str] = {}
        self.bar = tqdm(total=len(users.jobs), unit="user", desc=f"{config.task} batch", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)

    def log_user(self, user_id: str, status: str, **fields) -> None:
        self.sink.log({"type": "user", "run_id": self.summary.run_id, "user_id": user_id, "status": status,
                       "job_key": self.keys.get(user_id), **fields})

    def triage(self) -> list[Assignment]:
        """Record users failed at read time and skip finished ones; return the jobs to run."""
        pending = []
        for job in self.users.jobs:
            if job.error:
                self.fail(job.user_id, job.error, attempts=0)
                continue
            key = self.keys[job.user_id] = job_key(self.anchor_hash, self.config, self.users.labels, job)
            if self.sink.finished_key(job.user_id) == key:
                self.summary.skipped += 1
                self.log_user(job.user_id, "skipped")
                self.bar.update(1)
                continue
            pending.append(Assignment(job.user_id, job.items, self.config.user_config(job.user_id)))
        return pending

    def fail(self, user_id: str, error: str, attempts: int, **fields) -> None:
        self.summary.failed += 1
        self.summary.failures[user_id] = error
        self.log_user(user_id, "failed", error=error, attempts=attempts, **fields)
        self.bar.update(1)

    def finish(self, job: Assignment, outcome: UserOutcome, spec: WorkerSpec) -> None:
        """Store a successful user's adapter and log it."""
        report = {**outcome.report, "user_id": job.user_id, "job_key": self.keys[job.user_id],
                  "seed": job.config.seed, "model": self.config.model, "threads": spec.threads,
                  "worker": outcome.worker, "job_seconds": outcome.seconds, "run_id": self.summary.run_id}
        try:
            where = self.sink.put(job.user_id, outcome.weights, self.config.model, report)
        except PrispError as exc:  # e.g. the encrypted store does not know this user: that user alone fails
            self.fail(job.user_id, f"cannot store the adapter: {exc}", attempts=job.attempt, worker=outcome.worker)
            return
        self.summary.done += 1
        self.summary.user_seconds.append(outcome.seconds)
        self.log_user(job.user_id, "done", attempts=job.attempt, seconds=round(outcome.seconds, 3),
                      worker=outcome.worker, peak_memory_mb=report.get("peak_memory_mb"), adapter=where)
        self.bar.update(1)

    def dispatch(self, pending: list[Assignment], backend: Backend, spec: WorkerSpec) -> None:
        """Keep ``backend`` full until every pending job has an outcome, retrying transient failures."""
        queue = deque(pending)
        for job, outcome in outcomes(backend, queue):
            if outcome.worker and outcome.worker_peak_rss_mb:
                peaks = self.summary.worker_peak_mb
                peaks[outcome.worker] = max(peaks.get(outcome.worker, 0.0), outcome.worker_peak_rss_mb)
            if outcome.fatal:
                raise PrispError(outcome.error)
            if outcome.ok:
                self.finish(job, outcome, spec)
            elif not outcome.permanent and job.attempt <= self.config.retries:
                self.log_user(job.user_id, "retry", error=outcome.error, attempts=job.attempt)
                queue.append(Assignment(job.user_id, job.items, job.config, job.attempt + 1))
            else:
                self.fail(job.user_id, outcome.error, attempts=job.attempt, worker=outcome.worker)


def run_batch(config: BatchConfig, users: UserSet, sink: AdapterSink, anchor: LoraWeights,
              progress: bool = True, backend_factory: BackendFactory | None = None) -> BatchSummary:
    """Personalize every user of ``users`` into ``sink``, skipping the finished ones.

    Args:
        config: backend, workers and training options (``config.personalize.seed`` is the run seed).
        users: the users to personalize (see :func:`prisp.batch.load_users`).
        sink: where adapters and the log go (e.g. :class:`prisp.batch.DirectoryStore`).
        anchor: the anchor LoRA every user starts from.
        progress: show a progress bar over users on stderr.
        backend_factory: builds the backend from the worker spec and plan (tests inject one).

    Returns:
        The run's summary; per-user results are in the sink's log.

    Raises:
        PrispError: workers could not start (model or anchor unusable), or the cluster is unreachable.
    """
    if users.task != config.task:
        raise PrispError(f"users were read for {users.task} but the batch is for {config.task}")
    run = _Run(config, users, sink, anchor, progress)
    start = time.perf_counter()
    sink.log({"type": "run", "run_id": run.summary.run_id, "users": len(users.jobs), "source": str(users.source),
              "config": asdict(config), "plan": asdict(run.summary.plan), "revision": code_revision()})
    backend = None
    try:
        pending = run.triage()
        if pending:  # a re-run with nothing left to do never pays for starting workers
            spec = _worker_spec(config, anchor, users.labels, run.summary.plan.threads)
            backend = (backend_factory or _default_factory(config))(spec, run.summary.plan)
            run.summary.plan = WorkerPlan(backend.capacity, spec.threads)
            run.dispatch(pending, backend, spec)
    finally:
        if backend is not None:
            backend.close()
        run.bar.close()
        run.summary.wall_seconds = time.perf_counter() - start
    sink.log({"type": "summary", **run.summary.to_dict()})
    return run.summary


def code_revision() -> str | None:
    """The git commit of the prisp source tree when it is a checkout (read from .git, no subprocess)."""
    from prisp import __version__

    for parent in Path(__file__).resolve().parents:
        head = parent / ".git" / "HEAD"
        if head.is_file():
            ref = head.read_text(encoding="utf-8").strip()
            if not ref.startswith("ref: "):
                return ref
            ref_file = parent / ".git" / ref[5:]
            if ref_file.is_file():
                return ref_file.read_text(encoding="utf-8").strip()
            packed = parent / ".git" / "packed-refs"
            lines = packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []
            return next((line.split()[0] for line in lines if line.endswith(" " + ref[5:])), None)
    return f"prisp {__version__}"

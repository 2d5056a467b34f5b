"""What runs inside a batch worker: the base model and anchor loaded once, then one user per call.

Both backends use this module: the local pool calls :func:`init_local_worker` as its initializer
and :func:`run_local_job` per user; a Ray actor holds a :class:`WorkerContext`. A job is any
picklable object with a ``user_id`` and an ``execute`` method (:class:`Job`): the batch's
:class:`Assignment` personalizes one user and returns the adapter to the driver instead of writing
it, so a cluster needs no shared disk and the store has a single writer; ``prisp bench --workers``
sends its own job (``prisp.bench.pool``) to the same workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from prisp.adapters import LoraWeights
from prisp.data.lamp import ProfileItem
from prisp.data.tasks import TaskSpec, register_task
from prisp.errors import PrispError
from prisp.personalize import PersonalizeConfig, personalize


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start (pickled once per worker, not once per user).

    Attributes:
        model_name: the base model as the user named it.
        model_source: where to load it from on this machine (resolved by the driver), or None.
        anchor: the anchor LoRA, shipped as data so remote workers need not see the driver's disk
            (None when jobs name one of ``anchors`` instead).
        task: LaMP task.
        labels: the task's label set.
        threads: torch intra-op threads for this worker.
        anchors: further anchors by name, for jobs that start from different anchors on the same
            workers (the bench's PRISP and task-adapted anchors), so workers outlive a change of anchor.
        device: where the model runs (None: CPU).
        custom_task: a custom task's spec, registered in the worker under ``task`` (a spec file on the driver's
            disk need not exist where the worker runs); None for the built-in tasks.
    """

    model_name: str
    model_source: str | None
    anchor: LoraWeights | None
    task: str
    labels: tuple[str, ...]
    threads: int
    anchors: Mapping[str, LoraWeights] = field(default_factory=dict)
    device: str | None = None
    custom_task: TaskSpec | None = None

    def anchor_named(self, name: str | None = None) -> LoraWeights:
        """``anchors[name]``, or ``anchor`` when ``name`` is None.

        Raises:
            PrispError: no such anchor in this spec.
        """
        found = self.anchor if name is None else self.anchors.get(name)
        if found is None:
            raise PrispError(f"the worker spec has no anchor {name or '(default)'!r}")
        return found


@dataclass(frozen=True)
class Assignment:
    """One user's work order: history and the fully resolved options (seed included)."""

    user_id: str
    items: tuple[ProfileItem, ...]
    config: PersonalizeConfig
    attempt: int = 1

    def execute(self, context: WorkerContext, outcome: UserOutcome) -> None:
        """Personalize this user from the spec's anchor; the folded adapter and report go into ``outcome``."""
        result = personalize(context.model, context.tokenizer, context.spec.anchor_named(), context.spec.task,
                             self.items, self.config, context.spec.labels)
        outcome.weights = result.weights
        outcome.report = result.report()


class Job(Protocol):
    """A unit of per-user work a worker runs on its loaded model (pickled to the worker)."""

    user_id: str

    def execute(self, context: WorkerContext, outcome: UserOutcome) -> None:
        """Do the work on ``context``, filling ``outcome``; may raise (the context reports the error)."""


@dataclass
class UserOutcome:
    """What a worker sends back for one user.

    Attributes:
        weights: the folded adapter (None on failure).
        result: what a job other than :class:`Assignment` returns (e.g. a bench user's predictions).
        report: ``PersonalizeResult.report()`` plus worker facts (pid, threads, job wall time).
        error: one line, or None on success.
        permanent: the error is in the user's data or options, so retrying cannot help.
        fatal: the worker itself could not start (model or anchor unusable): the whole run stops.
    """

    user_id: str
    weights: LoraWeights | None = None
    result: object | None = None
    report: dict = field(default_factory=dict)
    error: str | None = None
    permanent: bool = False
    fatal: bool = False
    worker: str = ""
    seconds: float = 0.0
    worker_peak_rss_mb: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def set_threads(threads: int) -> None:
    """Pin torch to ``threads`` intra-op threads (and one inter-op thread: workers are the parallelism)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed once parallel work ran in this process; intra-op is what matters


class WorkerContext:
    """A worker's loaded state: base model, tokenizer, anchor."""

    def __init__(self, spec: WorkerSpec) -> None:
        from prisp.models import load_model

        set_threads(spec.threads)
        if spec.custom_task is not None:
            register_task(spec.custom_task)
        source = spec.model_source if spec.model_source and Path(spec.model_source).is_dir() else spec.model_name
        loaded = load_model(source, device=spec.device)
        for anchor in (spec.anchor, *spec.anchors.values()):
            if anchor is not None:
                anchor.check_fits(loaded.model)
        self.spec = spec
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def run(self, job: Job) -> UserOutcome:
        """Run one user's job; never raises (errors come back in the outcome)."""
        start = time.perf_counter()
        outcome = UserOutcome(job.user_id, worker=self.name)
        try:
            # The job's trained model copy is local to execute, so it is freed before the next user.
            job.execute(self, outcome)
        except PrispError as exc:
            outcome.error, outcome.permanent = str(exc), True
        except Exception as exc:  # noqa: BLE001 - a worker must report, not die, so the others continue
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
            outcome.error = f"{type(exc).__name__}: {exc}{where}"
        outcome.seconds = time.perf_counter() - start
        outcome.worker_peak_rss_mb = _process_peak_rss_mb()
        return outcome


def _process_peak_rss_mb() -> float | None:
    """Lifetime high-water mark of this worker's resident memory (model load included)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux


def quiet_worker() -> None:
    """Settings for a dedicated worker process (never called in the driver: they are process-wide).

    Per-user warnings would drown the driver's progress bar, and tokenizer threads would
    oversubscribe the cores the worker plan just divided up.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # e.g. "examples were cut to max_length": the count is in each user's report already.
    logging.getLogger("prisp").setLevel(logging.ERROR)


# The local pool's per-process state; a module global because ProcessPoolExecutor initializers
# cannot hand objects to the tasks any other way.
_CONTEXT: WorkerContext | None = None
_START_ERROR: str | None = None


def start_error(exc: BaseException) -> str:
    """One line for a worker that could not load its model or anchor."""
    return str(exc) if isinstance(exc, PrispError) else f"{type(exc).__name__}: {exc}"


def init_local_worker(spec: bytes) -> None:
    """Pool initializer: load the base model and anchor once for this process (``spec``: a pickled
    :class:`WorkerSpec`).

    A failure is kept and reported with the first task rather than raised: an initializer that
    raises only breaks the pool, and the driver would see "process terminated abruptly".
    """
    global _CONTEXT, _START_ERROR
    quiet_worker()
    # Workers never need the store key; a fork server started before the driver dropped it would pass it on.
    os.environ.pop("PRISP_STORE_KEY", None)
    try:
        _CONTEXT = WorkerContext(pickle.loads(spec))
    except Exception as exc:  # noqa: BLE001 - reported as a fatal outcome instead
        _START_ERROR = start_error(exc)


def run_local_job(job: Job) -> UserOutcome:
    """Pool task: one user's job on this process's loaded context."""
    if _CONTEXT is None:
        return UserOutcome(job.user_id, error=f"worker could not start: {_START_ERROR}", fatal=True)
    return _CONTEXT.run(job)

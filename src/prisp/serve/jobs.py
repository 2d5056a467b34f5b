"""Background personalization jobs: one worker thread, a bounded queue, one pending job per user.

One worker because Stage 2 on CPU already uses every torch thread and holds a full copy of the base
model; two at once would only double peak memory. One pending job per user because an update must
start from the version before it: two concurrent updates of one user would race for the same base.

Every state change goes to a ``journal`` (the store's job table: ids, status, times, version, error; never the
items), so a job's record outlives the process: at start the server marks jobs it finds queued or running as
failed ("interrupted"). A job that runs past ``timeout_s`` is reported failed and the queue moves on; its
thread cannot be killed, so it is abandoned and told (``cancelled()``) to discard its result.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

from prisp.errors import PrispError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"


class JobQueueFullError(PrispError):
    """The process already has its maximum number of pending jobs."""


class JobBusyError(PrispError):
    """The user already has a queued or running job."""


@dataclass(frozen=True)
class Job:
    """A snapshot of one job's state (what ``GET /v1/jobs/{id}`` reports)."""

    job_id: str
    user_id: str
    task: str
    kind: str  # "personalize" or "update"
    status: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    adapter_version: int | None = None
    error: str | None = None


class JobQueue:
    """Runs ``work()`` callables (returning the new adapter version) one at a time, in order."""

    def __init__(self, max_pending: int, journal: Callable[[dict], None] | None = None,
                 timeout_s: float | None = None, history: list[Job] = ()):
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._journal = journal
        self._jobs: dict[str, Job] = {job.job_id: job for job in history}
        self._futures: dict[str, Future] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prisp-job")

    def submit(self, user_id: str, task: str, kind: str, work: Callable[[Callable[[], bool]], int]) -> Job:
        """Queue ``work(cancelled)`` for ``user_id``; ``cancelled()`` turns True once the job timed out or its user
        was deleted, and the work must then discard its result.

        Raises:
            JobBusyError: The user already has a pending job.
            JobQueueFullError: ``max_pending`` jobs are already queued or running.
        """
        with self._lock:
            pending = [j for j in self._jobs.values() if j.status in (QUEUED, RUNNING)]
            if any(j.user_id == user_id for j in pending):
                raise JobBusyError("this user already has a personalization job queued or running; "
                                   "wait for it")
            if len(pending) >= self.max_pending:
                raise JobQueueFullError(f"the server has {len(pending)} pending jobs "
                                        f"(limit {self.max_pending}); retry later")
            job = Job(job_id=f"j_{secrets.token_hex(16)}", user_id=user_id, task=task, kind=kind,
                      status=QUEUED, created_at=time.time())
            self._jobs[job.job_id] = job
        # Journalled before the worker may pick it up: otherwise its ``queued`` row could land after (and
        # overwrite) the worker's ``running`` one, and a crash right then would leave no record of the job.
        self._record(job)
        with self._lock:
            if job.job_id in self._jobs:  # not forgotten (its user deleted) in between
                self._futures[job.job_id] = self._executor.submit(self._run, job.job_id, work)
        return job

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled or job_id not in self._jobs

    def _run(self, job_id: str, work: Callable[[Callable[[], bool]], int]) -> None:
        if not self._set(job_id, status=RUNNING, started_at=time.time()):
            return  # forgotten (user deleted) before it started
        if self.timeout_s is None:
            self._finish(job_id, work)
            return
        worker = threading.Thread(target=self._finish, args=(job_id, work), daemon=True, name=f"prisp-{job_id}")
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            with self._lock:
                self._cancelled.add(job_id)
            logger.warning("job %s ran past %.0f s: reported failed, its thread abandoned", job_id, self.timeout_s)
            self._set(job_id, status=FAILED, finished_at=time.time(),
                      error=f"timed out after {self.timeout_s:.0f} s (--job-timeout-s)")
            with self._lock:
                self._futures.pop(job_id, None)

    def _finish(self, job_id: str, work: Callable[[Callable[[], bool]], int]) -> None:
        try:
            version = work(lambda: self.cancelled(job_id))
        except PrispError as exc:
            self._set(job_id, status=FAILED, finished_at=time.time(), error=str(exc))
        except Exception as exc:  # a bug: log it, report one line, keep the worker alive
            logger.exception("job %s failed", job_id)
            error = f"internal error ({type(exc).__name__})"
            self._set(job_id, status=FAILED, finished_at=time.time(), error=error)
        else:
            self._set(job_id, status=SUCCEEDED, finished_at=time.time(), adapter_version=version)
        finally:
            with self._lock:
                self._futures.pop(job_id, None)  # drops the closure, and the user's items with it

    def _set(self, job_id: str, **changes) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or (job_id in self._cancelled and job.status == FAILED):
                return False  # forgotten, or already reported timed out: a late result changes nothing
            job = self._jobs[job_id] = replace(job, **changes)
        self._record(job)
        return True

    def _record(self, job: Job) -> None:
        if self._journal is None:
            return
        try:
            self._journal(asdict(job))
        except Exception:  # noqa: BLE001 - the in-memory state stays right; a journal failure must not kill the job
            logger.exception("could not record job %s", job.job_id)

    def get(self, job_id: str) -> Job | None:
        """The job's current snapshot, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def forget_user(self, user_id: str) -> int:
        """Cancel the user's queued jobs and drop all their records; returns how many were dropped.

        A running job cannot be interrupted; its save then fails because the user no longer exists.
        """
        with self._lock:
            doomed = [job_id for job_id, job in self._jobs.items() if job.user_id == user_id]
            for job_id in doomed:
                future = self._futures.get(job_id)
                if future is not None and future.cancel():
                    del self._futures[job_id]  # a running one stays until its own finally removes it
                del self._jobs[job_id]
                self._cancelled.add(job_id)
        return len(doomed)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._futures:
                    return True
            time.sleep(0.02)
        return False

    def shutdown(self) -> None:
        """Cancel queued jobs and wait for the running one."""
        self._executor.shutdown(wait=True, cancel_futures=True)

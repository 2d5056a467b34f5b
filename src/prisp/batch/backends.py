"""Execution backends: a local process pool and Ray actors, behind one small interface.

The runner keeps at most ``capacity`` users in flight, submits one job (a :class:`Job`, e.g. an
:class:`Assignment`) at a time and takes outcomes back as they finish. A backend turns its own
failures (a dead process, a lost actor) into ordinary failed outcomes, which the runner retries; it
never decides policy.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from prisp.batch.worker import (
    Job,
    UserOutcome,
    WorkerContext,
    WorkerSpec,
    init_local_worker,
    quiet_worker,
    run_local_job,
    start_error,
)
from prisp.errors import PrispError

RAY_OBJECT_STORE_BYTES = 512 * 2**20  # anchors and adapters are a few MB; Ray's default grabs 30% of RAM


class Backend(Protocol):
    """What the runner drives."""

    capacity: int

    def submit(self, job: Job) -> None:
        """Start ``job`` on a free worker (the runner never exceeds ``capacity``)."""

    def next_outcome(self) -> tuple[Job, UserOutcome]:
        """Block until some job finishes; return it with its outcome."""

    def close(self) -> None:
        """Stop the workers (idempotent)."""


def outcomes(backend: Backend, queue: deque) -> Iterator[tuple[Job, UserOutcome]]:
    """Keep ``backend`` full from ``queue`` and yield each finished ``(job, outcome)`` until both are empty.

    The caller may append to ``queue`` while iterating (e.g. a retry); it is picked up before the end.
    """
    in_flight = 0
    while queue or in_flight:
        while queue and in_flight < backend.capacity:
            backend.submit(queue.popleft())
            in_flight += 1
        job, outcome = backend.next_outcome()
        in_flight -= 1
        yield job, outcome


def _worker_context() -> multiprocessing.context.BaseContext:
    """How pool processes start: from a fork server that imported torch once, else spawned.

    Plain fork is unsafe (a parent whose torch already ran OpenMP threads can deadlock its children);
    spawn is safe but every worker re-imports torch, transformers and peft (15-20 s on a busy 2-core
    machine). A fork server is a clean process that never trains, so forking it is safe, and with the
    worker module preloaded each new worker starts in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # Windows
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["prisp.batch.worker"])
    return context


class LocalBackend:
    """A pool of ``workers`` spawned processes, each loading the model once in its initializer."""

    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        self.spec = spec
        self.capacity = workers
        self._executor: ProcessPoolExecutor | None = None
        self._futures: dict[Future, Job] = {}

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # The spec goes as one plain pickle: multiprocessing's pickler would share each anchor tensor as a
            # file descriptor, and a fork server passes at most 256 per new process (two anchors of the
            # default model already take 240).
            self._executor = ProcessPoolExecutor(self.capacity, mp_context=_worker_context(),
                                                 initializer=init_local_worker,
                                                 initargs=(pickle.dumps(self.spec),))
        return self._executor

    def submit(self, job: Job) -> None:
        self._futures[self._pool().submit(run_local_job, job)] = job

    def next_outcome(self) -> tuple[Job, UserOutcome]:
        done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
        future = done.pop()
        job = self._futures.pop(future)
        try:
            return job, future.result()
        except BrokenProcessPool:
            # A worker died (e.g. killed for memory); every job in flight fails with this, and the
            # next submit builds a fresh pool, so the runner's retries land on live workers.
            self._discard_pool()
            return job, UserOutcome(job.user_id, error="a worker process died while this user was in flight")
        except Exception as exc:  # noqa: BLE001 - e.g. an outcome that failed to pickle
            return job, UserOutcome(job.user_id, error=f"{type(exc).__name__}: {exc}")

    def _discard_pool(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        for future in self._futures:
            future.cancel()
        self._futures.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class _RayWorker:
    """The body of a Ray actor: a :class:`WorkerContext`, or the reason it could not start."""

    def __init__(self, spec: WorkerSpec) -> None:
        quiet_worker()
        try:
            self.context: WorkerContext | None = WorkerContext(spec)
            self.error = None
        except Exception as exc:  # noqa: BLE001 - reported with the first job, like the local pool
            self.context, self.error = None, start_error(exc)

    def run(self, job: Job) -> UserOutcome:
        if self.context is None:
            return UserOutcome(job.user_id, error=f"worker could not start: {self.error}", fatal=True)
        return self.context.run(job)


def import_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PrispError("--backend ray needs Ray: pip install ray (tested with 2.60)") from None
    return ray


class RayBackend:
    """``workers`` Ray actors (``threads`` CPUs each), on a local cluster or the one at ``address``.

    The spec (anchor included) goes into the object store once; each actor loads the base model once.
    A cluster this backend started is shut down by :meth:`close`; one it joined is left running.
    """

    def __init__(self, spec: WorkerSpec, workers: int | None, threads: int, address: str | None) -> None:
        ray = self._ray = import_ray()
        self._owns = not ray.is_initialized()
        if self._owns:
            self._init_cluster(workers, threads, address)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        self.capacity = workers
        self._threads = threads
        self._spec_ref = ray.put(spec)
        self._actor_class = ray.remote(_RayWorker)
        self._idle = [self._new_actor() for _ in range(workers)]
        self._refs: dict = {}

    def _init_cluster(self, workers: int | None, threads: int, address: str | None) -> None:
        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        if os.environ.get("PRISP_HOME"):
            env["PRISP_HOME"] = os.environ["PRISP_HOME"]
        # Workers' own output stays in Ray's session logs: interleaved, it would garble the progress bar.
        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                   "runtime_env": {"env_vars": env}}
        if address is None:
            # A private local cluster sized for exactly our actors.
            from prisp.batch.config import available_cores

            options |= {"num_cpus": (workers or available_cores()) * threads,
                        "object_store_memory": RAY_OBJECT_STORE_BYTES}
        try:
            self._ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PrispError(f"cannot start or join the Ray cluster{f' at {address}' if address else ''}: "
                             f"{str(exc).splitlines()[0]}") from None

    def _new_actor(self):
        return self._actor_class.options(num_cpus=self._threads).remote(self._spec_ref)

    def submit(self, job: Job) -> None:
        actor = self._idle.pop()
        self._refs[actor.run.remote(job)] = (actor, job)

    def next_outcome(self) -> tuple[Job, UserOutcome]:
        ray = self._ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        actor, job = self._refs.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            # The actor's process is gone: replace it so retries and later users have a worker.
            actor = self._new_actor()
            outcome = UserOutcome(job.user_id, error=f"Ray actor died: {str(exc).splitlines()[0]}")
        except ray.exceptions.RayError as exc:
            outcome = UserOutcome(job.user_id, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        self._idle.append(actor)
        return job, outcome

    def close(self) -> None:
        ray = self._ray
        for actor in self._idle + [actor for actor, _ in self._refs.values()]:
            ray.kill(actor)
        self._idle, self._refs = [], {}
        if self._owns and ray.is_initialized():
            ray.shutdown()
            self._owns = False


def make_backend(name: str, spec: WorkerSpec, workers: int, threads: int, address: str | None) -> Backend:
    """The backend called ``name`` (``local`` or ``ray``), started and ready for jobs."""
    if name == "ray":
        return RayBackend(spec, workers, threads, address)
    return LocalBackend(spec, workers)

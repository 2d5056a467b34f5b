"""Options of a batch personalization run and how they map onto workers, threads and seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from prisp.console import available_cores  # noqa: F401 - part of this module's API (prisp.batch)
from prisp.errors import PrispError
from prisp.models import DEFAULT_MODEL
from prisp.personalize import PersonalizeConfig

BACKENDS = ("local", "ray")


def user_seed(global_seed: int, user_id: str) -> int:
    """The seed of one user's job, a pure function of the run seed and the user id.

    Deriving it from the id (not from the order users are scheduled in) is what makes a user's
    adapter the same whichever backend, worker or re-run trains it.
    """
    digest = hashlib.sha256(f"prisp-batch:{global_seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF  # torch seeds must fit a signed 64-bit int


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers run and how many torch threads each uses."""

    workers: int
    threads: int


@dataclass(frozen=True)
class BatchConfig:
    """Options of one ``personalize-batch`` run.

    Attributes:
        task: LaMP task every user is personalized for.
        model: base model name or directory (recorded in every adapter).
        backend: ``local`` (process pool) or ``ray``.
        workers: parallel workers; None sizes the pool to the cores (local) or the cluster (ray).
        threads: torch threads per worker; None splits the cores evenly so nothing is oversubscribed.
        ray_address: an existing Ray cluster; None starts a local one.
        retries: extra attempts after a transient failure (worker crash, lost actor, unexpected error).
        personalize: training options; its ``seed`` is the run seed each user's seed derives from.
    """

    task: str
    model: str = DEFAULT_MODEL
    backend: str = "local"
    workers: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    retries: int = 2
    personalize: PersonalizeConfig = field(default_factory=lambda: PersonalizeConfig(progress=False))

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PrispError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("workers", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PrispError(f"--{name} must be a positive integer, got {value!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise PrispError(f"--retries must be 0 or more, got {self.retries!r}")
        if self.ray_address is not None and self.backend != "ray":
            raise PrispError("--ray-address needs --backend ray")

    def plan(self, cores: int | None = None) -> WorkerPlan:
        """Workers and threads per worker for ``cores`` CPUs (default: this machine's).

        Threads default to ``cores // workers`` because CPU training collapses (OpenMP spinning) when
        the workers' threads add up to more than the cores.
        """
        cores = cores or available_cores()
        if self.workers is None:
            threads = self.threads or 1
            return WorkerPlan(max(1, cores // threads), threads)
        return WorkerPlan(self.workers, self.threads or max(1, cores // self.workers))

    def user_config(self, user_id: str) -> PersonalizeConfig:
        """The personalization options of one user (its own derived seed, no per-step progress bar)."""
        return replace(self.personalize, seed=user_seed(self.personalize.seed, user_id), progress=False)

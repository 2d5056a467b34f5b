"""Benchmark configuration: one typed dataclass, the two protocols, the quick / standard / paper profiles."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prisp.batch.config import WorkerPlan, available_cores
from prisp.bench.descriptions import check_kinds
from prisp.bench.methods import DEFAULT_METHODS, VARIANTS, get_method
from prisp.data.locations import SAMPLE_DIR, default_data_dir
from prisp.data.tasks import normalize_task_name
from prisp.errors import PrispError
from prisp.models import DEFAULT_MODEL
from prisp.personalize.hyperparams import check_schedule
from prisp.profiles import ProfileConfig
from prisp.sharers import PerPcsConfig, PrimeConfig, SharerConfig


@dataclass(frozen=True)
class Protocol:
    """A data-access regime of the paper.

    Attributes:
        name: ``few-shot`` or ``full``.
        task_samples: task-level samples for task adaptation (None: every task-adaptive query).
        items: a user's most recent history items used (0: the whole history).
        pool_sharer_data: methods without sharer LoRAs also task-adapt on the sharer candidates' data
            (App. A.2).
    """

    name: str
    task_samples: int | None
    items: int
    pool_sharer_data: bool


PROTOCOLS: dict[str, Protocol] = {
    "few-shot": Protocol("few-shot", 50, 10, False),
    "full": Protocol("full", None, 0, True),
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``prisp bench`` run depends on (recorded in every result row).

    Attributes:
        tasks, methods, variants: the grid (variants apply to personalized methods).
        protocol: a key of :data:`PROTOCOLS`.
        data, split: target users' split; ``train_split`` holds task-adaptive users, ``sharer_split`` sharers.
        users: target users per task (the first N of the split; None: all).
        model, device: base model and where it runs (None: CUDA when available, else CPU).
        out: output directory (results.jsonl, report.md, figures, caches).
        profile: the profile these defaults came from.
        task_samples: overrides the protocol's task-adaptation samples.
        task_epochs: task-adaptation epochs (Table 7: 3).
        max_length: tokens per training example; max_input_tokens, gen_batch_size: decoding.
        max_new_tokens: caps every task's answer budget (None: the task's own budget).
        personalize_lr: overrides the schedule's Stage-2 learning rate (personal methods).
        schedule: Stage-2 schedule of PRISP, OPPU and the ablations: ``paper`` (Table 7) or ``tuned`` (searched
            on train users, ``prisp.personalize.hyperparams.TUNED``). Sharer methods keep Table 7's own rows.
        data_sizes, data_size_tasks, data_size_users: Figure 6 sweep over user items (Base variant).
        cross_task, cross_task_users: Figure 7: every sharer method (Per-Pcs, PriME) of the grid also runs on
            each task with every *other* task's sharer pool (Base variant, ``cross_task_users`` target users,
            default ``users``), beside its own pool on the same users; the report's adaptability table divides.
        descriptions, sni: Figure 8: Stage 1 (``anchor``) and Stage 2 (``prisp``) from the reference description
            and each named other wording (``paraphrase``, ``imprecise``; Base variant); an imprecise wording a
            spec does not give is the nearest SNI train description in ``sni`` (default ``$PRISP_SNI`` or
            ``../shared/data/sni/tasks.jsonl``).
        prisp_anchor: ``hypernet`` (shipped or ``hypernet`` checkpoint; task-adapted when none exists) or
            ``task-adapted``; a callable given to ``run_bench`` overrides both.
        decode: how label tasks are answered: ``free`` (the paper's protocol: greedy generation snapped to a
            label; the default), ``labels`` / ``auto`` (rank the label set by log-likelihood, ``prisp.scoring``).
        workers: processes the users of a personal-method cell (PRISP, OPPU, ablations) run on, each
            loading the model once with ``cores // workers`` torch threads; 1 runs them in this process.
            Sharer and prompt-only methods always run in this process.
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    variants: tuple[str, ...] = tuple(VARIANTS)
    protocol: str = "few-shot"
    data: Path = field(default_factory=lambda: default_data_dir(benchmark=True))
    split: str = "dev"
    train_split: str = "train"
    sharer_split: str = "sharer"
    users: int | None = None
    model: str = DEFAULT_MODEL
    device: str | None = None
    out: Path = Path("bench/results/run")
    profile: str = "custom"
    seed: int = 0
    task_samples: int | None = None
    task_epochs: int = 3
    max_length: int = 512
    max_input_tokens: int = 1024
    gen_batch_size: int = 8
    max_new_tokens: int | None = None
    personalize_lr: float | None = None
    sharer: SharerConfig = field(default_factory=SharerConfig)
    per_pcs: PerPcsConfig = field(default_factory=PerPcsConfig)
    prime: PrimeConfig = field(default_factory=PrimeConfig)
    profiles: ProfileConfig = field(default_factory=ProfileConfig)
    data_sizes: tuple[int, ...] = ()
    data_size_tasks: tuple[str, ...] = ()
    data_size_users: int | None = None
    cross_task: bool = False
    cross_task_users: int | None = None
    descriptions: tuple[str, ...] = ()
    sni: Path | None = None
    prisp_anchor: str = "hypernet"
    hypernet: Path | None = None
    workers: int = 1
    decode: str = "free"
    schedule: str = "paper"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise PrispError("--tasks is empty; name at least one LaMP task")
        object.__setattr__(self, "tasks", tuple(normalize_task_name(t) for t in self.tasks))
        object.__setattr__(
            self, "data_size_tasks", tuple(normalize_task_name(t) for t in self.data_size_tasks)
        )
        for name in self.methods:
            get_method(name)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise PrispError(
                f"unknown variant {unknown[0] if unknown else '(none)'}; expected: {', '.join(VARIANTS)}"
            )
        if self.protocol not in PROTOCOLS:
            raise PrispError(f"unknown protocol {self.protocol!r}; expected one of: {', '.join(PROTOCOLS)}")
        for name in ("users", "task_samples", "data_size_users", "cross_task_users"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PrispError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if any(size < 1 for size in self.data_sizes):
            raise PrispError(f"--data-sizes must be positive item counts, got {list(self.data_sizes)}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise PrispError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.decode not in ("free", "labels", "auto"):
            raise PrispError(f"--decode must be free, labels or auto, got {self.decode!r}")
        check_schedule(self.schedule)
        check_kinds(self.descriptions)
        if self.prisp_anchor not in ("hypernet", "task-adapted"):
            raise PrispError(f"--prisp-anchor must be hypernet or task-adapted, got {self.prisp_anchor!r}")

    @property
    def protocol_spec(self) -> Protocol:
        return PROTOCOLS[self.protocol]

    @property
    def items(self) -> int:
        """User history items of the main grid (0: all)."""
        return self.protocol_spec.items

    @property
    def samples(self) -> int | None:
        return self.task_samples or self.protocol_spec.task_samples

    def worker_plan(self, cores: int | None = None) -> WorkerPlan:
        """Workers and torch threads per worker for ``cores`` CPUs (default: this machine's).

        Threads are ``cores // workers`` so the workers' threads add up to the cores: CPU training
        collapses (OpenMP spinning) when they add up to more.
        """
        return WorkerPlan(self.workers, max(1, (cores or available_cores()) // self.workers))

    def to_json(self) -> dict:
        """JSON-ready dict (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


QUICK = BenchConfig(
    tasks=("LaMP-2N", "LaMP-4"),
    data=SAMPLE_DIR,
    split="dev",
    sharer_split="train",
    users=2,
    profile="quick",
    task_samples=4,
    task_epochs=1,
    max_length=96,
    max_input_tokens=192,
    max_new_tokens=4,
    sharer=SharerConfig(pool_size=2, candidates=None, items=3, epochs=1, max_length=96),
    per_pcs=PerPcsConfig(max_length=64),
    prime=PrimeConfig(budget=2, batch_size=2, max_new_tokens=4),
    profiles=ProfileConfig(max_new_tokens=8, max_input_tokens=192, item_chars=60),
    data_sizes=(1, 5),
    data_size_tasks=("LaMP-2N",),
    data_size_users=1,
)
# Sized for the default model on 2 CPU cores from measured costs (bench/standard.md): one LaMP-1 sharer
# alone trains for ~3 min on one thread, so a pool of 8 from 200 candidates cost ~30 min per task.
STANDARD = BenchConfig(
    tasks=("LaMP-1", "LaMP-2N", "LaMP-4", "LaMP-5"),
    users=4,
    profile="standard",
    sharer=SharerConfig(pool_size=3, candidates=60),
    data_sizes=(1, 5, 10, 30, 50),
    data_size_tasks=("LaMP-2N", "LaMP-4"),
    data_size_users=8,
)
# The paper's protocol (100 target users, six tasks, Qwen3-0.6B); meant for a GPU.
PAPER = BenchConfig(
    tasks=("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"),
    users=100,
    model="Qwen/Qwen3-0.6B",
    profile="paper",
    sharer=SharerConfig(pool_size=100, candidates=1000),
    data_sizes=(1, 5, 10, 30, 50),
    data_size_tasks=("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"),
)
PROFILES: dict[str, BenchConfig] = {"quick": QUICK, "standard": STANDARD, "paper": PAPER}


def profile_config(profile: str, **overrides) -> BenchConfig:
    """The ``profile``'s config with ``overrides`` (options left None keep the profile's value).

    Raises:
        PrispError: unknown profile.
    """
    if profile not in PROFILES:
        raise PrispError(f"unknown profile {profile!r}; expected one of: {', '.join(PROFILES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(PROFILES[profile], **given)

"""Per-task training hyperparameters: Table 7 of the paper, and the Stage-2 schedules ``paper`` and ``tuned``."""

from __future__ import annotations

from dataclasses import dataclass

from prisp.data.tasks import DEFAULT_SCHEDULE, get_task
from prisp.errors import PrispError


@dataclass(frozen=True)
class StageHyperparams:
    """Batch size, epochs and learning rate of one training stage.

    ``lr_B`` / ``lr_C``: the LoRA factor B's and the bridge C's own peak learning rates where they differ
    from ``lr`` (None: ``lr``). The r x r bridge starts at the identity and has 64 numbers per module; on
    the 135M model it only moves at ~30x B's rate (bench/results/schedule_search.md).
    """

    batch_size: int
    epochs: int
    lr: float
    lr_B: float | None = None
    lr_C: float | None = None

    def factor_lrs(self) -> dict[str, float]:
        """{factor: learning rate} for the factors that have their own."""
        return own_rates(self.lr_B, self.lr_C)


# Table 7, "PRISP (Ours)": also used for OPPU and the ablations (the paper aligns OPPU's personalization stage).
PRISP_TABLE7: dict[str, StageHyperparams] = {
    "LaMP-1": StageHyperparams(16, 1, 2e-4),
    "LaMP-2": StageHyperparams(16, 1, 1e-4),
    "LaMP-3": StageHyperparams(6, 1, 1e-4),
    "LaMP-4": StageHyperparams(16, 1, 5e-4),
    "LaMP-5": StageHyperparams(10, 1, 1e-6),
    "LaMP-7": StageHyperparams(16, 1, 3e-6),
}
# Table 7, "Task Adaptation": the same for every task.
TASK_ADAPTATION = StageHyperparams(6, 3, 1e-4)


# Stage-2 schedules. ``paper``: Table 7 as published (batch 16, one epoch: 1-2 optimizer steps on 10 items, which
# leaves a 135M model's anchor nearly where it was). ``tuned``: chosen per task and strategy by
# bench/schedule_search.py on train-split users only (never dev), the same grid and budget for every strategy;
# bench/results/schedule_search.md has the grid, every cell's scores and the command; this table is its "Chosen"
# section: lowest held-out NLL of the user's own older items. A first round ran the whole grid on 2 users (LaMP-2N,
# LaMP-4) or 1 (LaMP-1, LaMP-5); a refinement round (``--refine 4``) ran each strategy's 4 best cells on 6 users
# and chose among those. With 6 users no own bridge rate won for PRISP on any task, so C trains at B's rate.
SCHEDULES = ("paper", "tuned")
TUNED: dict[str, dict[str, StageHyperparams]] = {
    "prisp": {
        "LaMP-1": StageHyperparams(4, 2, 0.003),
        "LaMP-2N": StageHyperparams(4, 1, 0.001),
        "LaMP-4": StageHyperparams(4, 2, 0.003),
        "LaMP-5": StageHyperparams(4, 2, 0.003),
    },
    "oppu": {
        "LaMP-1": StageHyperparams(4, 1, 0.003),
        "LaMP-2N": StageHyperparams(4, 1, 0.001),
        "LaMP-4": StageHyperparams(4, 1, 0.003),
        "LaMP-5": StageHyperparams(4, 1, 0.003),
    },
    "no-bridge": {
        "LaMP-1": StageHyperparams(4, 2, 0.003),
        "LaMP-2N": StageHyperparams(4, 1, 0.001),
        "LaMP-4": StageHyperparams(4, 2, 0.003),
        "LaMP-5": StageHyperparams(4, 2, 0.003),
    },
    "bridge-only": {
        "LaMP-1": StageHyperparams(4, 1, 0.1),
        "LaMP-2N": StageHyperparams(4, 1, 0.1),
        "LaMP-4": StageHyperparams(4, 1, 0.3),
        "LaMP-5": StageHyperparams(4, 1, 0.1),
    },
    # Table 4's SVD starts: the same grid plus two lower cells (their optimum sits below PRISP's).
    "pissa": {
        "LaMP-1": StageHyperparams(4, 1, 0.001),
        "LaMP-2N": StageHyperparams(4, 1, 0.0003),
        "LaMP-4": StageHyperparams(4, 1, 0.001),
        "LaMP-5": StageHyperparams(4, 1, 0.001),
    },
    "lora-ga": {
        "LaMP-1": StageHyperparams(4, 1, 0.001),
        "LaMP-2N": StageHyperparams(4, 1, 0.0003),
        "LaMP-4": StageHyperparams(4, 1, 0.0003),
        "LaMP-5": StageHyperparams(4, 1, 0.001),
    },
}


def own_rates(lr_B: float | None, lr_C: float | None) -> dict[str, float]:
    """{factor: learning rate} for the factors (B, C) given their own rate."""
    return {name: lr for name, lr in (("B", lr_B), ("C", lr_C)) if lr is not None}


def check_schedule(schedule: str) -> None:
    """Raises PrispError (one line) unless ``schedule`` is one of ``SCHEDULES``."""
    if schedule not in SCHEDULES:
        raise PrispError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def personalization_hyperparams(task: str, strategy: str = "prisp", schedule: str = "paper") -> StageHyperparams:
    """The Stage-2 schedule of ``strategy`` on ``task``; LaMP-2N (news categorization) takes LaMP-2's row.

    A task without a Table 7 row (a custom task's spec file, or LongLaMP-2) and not searched: ``paper`` means
    the schedule its spec gives (``[schedule]``, default batch 4, 1 epoch, lr 3e-3), and ``tuned`` is refused.

    Raises:
        PrispError: an unknown schedule, or ``tuned`` for a task or strategy the search did not cover.
    """
    check_schedule(schedule)
    spec = get_task(task)
    name = spec.name
    table7 = "LaMP-2" if name == "LaMP-2N" else name
    if table7 not in PRISP_TABLE7 and not (schedule == "tuned" and name in TUNED.get(strategy, {})):
        if schedule == "tuned":
            raise PrispError(f"no tuned Stage-2 schedule for {name} (Table 7 has no row for it and the search did "
                             "not cover it); use --schedule paper (the [schedule] of its spec), or give --lr, "
                             "--epochs and --batch-size")
        row = dict(spec.schedule or DEFAULT_SCHEDULE)
        return StageHyperparams(int(row["batch_size"]), int(row["epochs"]), float(row["lr"]))
    if schedule == "paper":
        return PRISP_TABLE7[table7]
    row = TUNED.get(strategy, {}).get(name)
    if row is None:
        covered = sorted({t for rows in TUNED.values() for t in rows}) or ["none"]
        raise PrispError(f"no tuned Stage-2 schedule for {strategy} on {name} (the search covered "
                         f"{', '.join(sorted(TUNED)) or 'no strategy'} on {', '.join(covered)}); use "
                         "--schedule paper, or give --lr, --epochs and --batch-size")
    return row


# Table 7, "Sharer PEFT": each sharer's own LoRA (Per-Pcs and PriME build on these).
SHARER_PEFT_TABLE7: dict[str, StageHyperparams] = {
    "LaMP-1": StageHyperparams(16, 1, 1e-5),
    "LaMP-2": StageHyperparams(6, 3, 2e-5),
    "LaMP-3": StageHyperparams(2, 2, 1e-5),
    "LaMP-4": StageHyperparams(10, 3, 2e-5),
    "LaMP-5": StageHyperparams(3, 2, 2e-5),
    "LaMP-7": StageHyperparams(16, 2, 1e-5),
}


@dataclass(frozen=True)
class GateHyperparams:
    """Table 7, "Sharer Gate": Per-Pcs' trained gate (batch, steps, lr). Recorded for reference; prisp's gate
    scores pieces by representation similarity and trains nothing."""

    batch_size: int
    steps: int
    lr: float


SHARER_GATE_TABLE7: dict[str, GateHyperparams] = {
    "LaMP-1": GateHyperparams(6, 100, 1e-5),
    "LaMP-2": GateHyperparams(6, 100, 2e-5),
    "LaMP-3": GateHyperparams(4, 100, 1e-5),
    "LaMP-4": GateHyperparams(6, 50, 2e-5),
    "LaMP-5": GateHyperparams(6, 50, 2e-5),
    "LaMP-7": GateHyperparams(6, 50, 2e-5),
}

# Table 7, "Per-Pcs top-k": pieces composed per layer.
PER_PCS_TOP_K: dict[str, int] = {"LaMP-1": 1, "LaMP-2": 3, "LaMP-3": 1, "LaMP-4": 1, "LaMP-5": 1, "LaMP-7": 2}


@dataclass(frozen=True)
class PrimeHyperparams:
    """Table 7, "PRiME": history examples per evaluation, sharer LoRAs merged, evaluation budget."""

    batch_size: int
    loras: int
    budget: int


PRIME_TABLE7: dict[str, PrimeHyperparams] = {
    "LaMP-1": PrimeHyperparams(16, 5, 10),
    "LaMP-2": PrimeHyperparams(16, 3, 5),
    "LaMP-3": PrimeHyperparams(6, 5, 10),
    "LaMP-4": PrimeHyperparams(16, 3, 5),
    "LaMP-5": PrimeHyperparams(10, 3, 10),
    "LaMP-7": PrimeHyperparams(16, 3, 5),
}


def table7_row(table: dict, task: str):
    """``task``'s row of one of the Table 7 dicts above; LaMP-2N takes LaMP-2's row (as PRISP's does)."""
    name = get_task(task).name
    return table["LaMP-2" if name == "LaMP-2N" else name]

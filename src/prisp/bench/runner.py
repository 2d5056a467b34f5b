"""``prisp bench``: the grid method x prompt variant x task under identical prompts, decoding and metrics.

Every method answers the same target users' queries through ``prisp.predict`` and is scored by
``prisp.metrics``; personalization cost comes from the one training loop's accounting (sharer methods add the
sharer training they use). Each finished cell is appended to ``results.jsonl`` at once, so an interrupted run
resumes where it stopped. With ``workers`` > 1 the users of a personal-method cell run on a process pool
(``prisp.bench.pool``); the rows are the same as the sequential run's.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prisp.adapters import attach_lora, shared_copy
from prisp.batch.config import WorkerPlan
from prisp.bench.anchors import Anchor, AnchorProvider
from prisp.bench.config import BenchConfig
from prisp.bench.context import TaskContext
from prisp.bench.methods import UNTRAINED_KINDS, BenchMethod, get_method, method_variants
from prisp.bench.pool import UserPool
from prisp.bench.results import Cell, ResultStore, git_revision, row_key
from prisp.data.lamp import LampSplit
from prisp.data.tasks import get_task
from prisp.generation import GenerationConfig
from prisp.metrics import evaluate, task_score
from prisp.personalize import PersonalizeConfig
from prisp.personalize.per_user import predict_personalized
from prisp.predict import PredictConfig, PredictionRun, predict_split
from prisp.sharers import HistoryEmbedder, PerPcs, Prime, predict_with_sharers

ALL_ITEMS = 10**9  # "the whole history" for options that need a count


@dataclass
class MethodOutcome:
    """A method's predictions for one cell, what personalization cost per user, and its provenance.

    ``plan`` is the worker pool the users ran on (None: in this process).
    """

    run: PredictionRun
    costs: list = field(default_factory=list)  # UserCost or TargetCost, one per user
    anchor: Anchor | None = None
    extra: dict = field(default_factory=dict)
    plan: WorkerPlan | None = None


@dataclass
class BenchOutcome:
    """What a run did."""

    written: int
    skipped: int
    results: Path


def grid(config: BenchConfig, task: str) -> list[Cell]:
    """The cells of ``task``: every method x variant, plus the Figure 6 data-size sweep (Base variant)."""
    cells = [
        Cell(task, name, variant, config.items, config.users)
        for name in config.methods
        for variant in method_variants(get_method(name), config.variants)
    ]
    if task in config.data_size_tasks:
        users = config.data_size_users or config.users
        cells += [
            Cell(task, name, "np", size, users)
            for name in config.methods
            if get_method(name).kind not in UNTRAINED_KINDS
            for size in config.data_sizes
        ]
    for kind in ("", *config.descriptions) if config.descriptions else ():
        cells += [Cell(task, name, "np", config.items, config.users, description=kind) for name in ("anchor", "prisp")]
    if config.cross_task and len(config.tasks) > 1:
        users = config.cross_task_users or config.users
        cells += [
            Cell(task, name, "np", config.items, users, source if source != task else "")
            for name in config.methods
            if get_method(name).kind == "sharer"
            for source in config.tasks
        ]
    unique = {}
    for cell in cells:
        unique.setdefault((cell.method, cell.variant, cell.items, cell.users, cell.source, cell.description), cell)
    return list(unique.values())


def cell_key(config: BenchConfig, cell: Cell) -> tuple:
    return row_key(
        {"model": config.model, "protocol": config.protocol, "split": config.split, "decode": config.decode,
         "schedule": config.schedule, **asdict(cell)}
    )


def predict_config(config: BenchConfig, ctx: TaskContext, split: LampSplit, variant: str, items: int):
    """The benchmark's prediction options for one cell, and the mean PAG profile seconds (None without PAG)."""
    profiles, seconds = ctx.profiles(split) if variant in ("pag", "rag+pag") else ({}, None)
    budget = get_task(ctx.task).max_new_tokens
    gen = GenerationConfig(
        max_new_tokens=min(budget, config.max_new_tokens or budget),
        batch_size=config.gen_batch_size,
        max_input_tokens=config.max_input_tokens,
        first_line=get_task(ctx.task).first_line,
    )
    pconf = PredictConfig(method=variant, history=items, generation=gen, profiles=profiles, decode=config.decode)
    return pconf, seconds


def run_prompt(ctx: TaskContext, method: BenchMethod, cell: Cell, split: LampSplit, pconf) -> MethodOutcome:
    """A prompt-only baseline: the task-adapted model, no per-user training."""
    run = predict_split(ctx.prompt_model, ctx.loaded.tokenizer, split, pconf)
    return MethodOutcome(run, [], ctx.task_anchor(with_sharer_data=True))


def run_anchor(ctx: TaskContext, method: BenchMethod, cell: Cell, split: LampSplit, pconf) -> MethodOutcome:
    """PRISP's Stage-1 anchor alone (every user gets the same adapter): the floor Stage 2 must stay above."""
    anchor = ctx.anchor_for(cell.description)
    model = attach_lora(shared_copy(ctx.loaded.model), anchor.weights).eval()
    run = predict_split(model, ctx.loaded.tokenizer, split, pconf)
    return MethodOutcome(run, [], anchor, description_details(ctx, cell))


def personal_anchor(ctx: TaskContext, method: BenchMethod, cell: Cell) -> Anchor:
    """The anchor a Stage-2 method's users start from (for PRISP's, from the cell's description wording)."""
    return ctx.anchor_for(cell.description) if method.anchor == "prisp" else ctx.task_anchor(with_sharer_data=True)


def anchor_key(method: BenchMethod, cell: Cell) -> str:
    """The name a worker pool knows a personal cell's anchor by."""
    return method.anchor + (f":{cell.description}" if cell.description and method.anchor == "prisp" else "")


def description_details(ctx: TaskContext, cell: Cell) -> dict:
    if not cell.description:
        return {}
    wording, _ = ctx.described_anchor(cell.description)
    return {"description": {"kind": wording.kind, "text": wording.text, "origin": wording.origin}}


def run_personal(ctx: TaskContext, method: BenchMethod, cell: Cell, split: LampSplit, pconf) -> MethodOutcome:
    """A Stage-2 strategy (PRISP, OPPU, ablations): one adapter per user, cached across variants and runs."""
    config = ctx.config
    anchor = personal_anchor(ctx, method, cell)
    pers = PersonalizeConfig(
        strategy=method.strategy,
        k=cell.items or ALL_ITEMS,
        schedule=config.schedule,
        lr=config.personalize_lr,
        max_length=config.max_length,
        seed=config.seed,
        progress=False,
    )
    pool, extra = ctx.user_pool, {"personalize": asdict(pers), **description_details(ctx, cell)}
    with ctx.progress_bar(len(split.users), f"{ctx.task} {method.name} {cell.variant}") as bar:
        if pool is not None:
            pooled = pool.predict(
                split, anchor_key(method, cell), pers, pconf, ctx.cache / "adapters", on_user=lambda _: bar.update()
            )
            result, extra["workers"] = pooled.result, pooled.workers
        else:
            result = predict_personalized(
                ctx.loaded.model,
                ctx.loaded.tokenizer,
                config.model,
                split,
                anchor.weights,
                pers,
                pconf,
                ctx.cache / "adapters",
                on_user=lambda _: bar.update(),
            )
    return MethodOutcome(result.run, result.users, anchor, extra, pool.plan if pool is not None else None)


# How each sharer method is built over the pool from the run's config.
SHARER_METHODS = {
    "per-pcs": lambda pool, config, embedder, task: PerPcs(pool, config.per_pcs, embedder, task),
    "prime": lambda pool, config, embedder, task: Prime(pool, config.prime, embedder, task),
}


def run_sharer(ctx: TaskContext, method: BenchMethod, cell: Cell, split: LampSplit, pconf) -> MethodOutcome:
    """Per-Pcs or PriME over the task's sharer pool, or over another task's (``cell.source``, Figure 7: the
    source task's sharers and the task-adapted anchor they sit on, reused without retraining; the method's
    selection on the target user's history is the only adaptation)."""
    pool = ctx.source(cell.source).pool if cell.source else ctx.pool
    builder = SHARER_METHODS[method.name](pool, ctx.config, ctx.embedder, ctx.task)
    desc = f"{ctx.task} {method.name} {cell.variant}" + (f" ({cell.source} sharers)" if cell.source else "")
    with ctx.progress_bar(len(split.users), desc) as bar:
        result = predict_with_sharers(
            ctx.loaded.model,
            ctx.loaded.tokenizer,
            ctx.config.model,
            split,
            builder,
            pconf,
            cell.items or ALL_ITEMS,
            ctx.cache / "targets",
            on_user=lambda _: bar.update(),
        )
    extra = {
        "method_config": builder.key_payload(),
        "pool_task": pool.task,
        "pool_size": len(pool.sharers),
        "pool_training_seconds": pool.training_seconds,
        "pool_selection_seconds": pool.details.get("selection_seconds"),
        "pool_sharers": [s.user for s in pool.sharers],
        "own_seconds": _mean([c.own_seconds for c in result.users]),
        "sharer_seconds": _mean([c.sharer_seconds for c in result.users]),
        "targets": [{"user": c.user, "sharers": c.sharers, **c.details} for c in result.users],
    }
    anchor = ctx.source(cell.source).task_anchor() if cell.source else ctx.task_anchor(with_sharer_data=False)
    return MethodOutcome(result.run, result.users, anchor, extra)


EXECUTORS = {"prompt": run_prompt, "anchor": run_anchor, "personal": run_personal, "sharer": run_sharer}


def _mean(values: Sequence) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def cost_fields(costs: Sequence) -> dict:
    """Per-user personalization cost aggregated for a row (means over users, as the paper's figures)."""
    peaks = [c.peak_memory_mb for c in costs if c.peak_memory_mb is not None]
    return {
        "seconds": _mean([c.seconds for c in costs]) or 0.0,
        "seconds_total": sum(c.seconds for c in costs),
        "peak_memory_mb": _mean(peaks),
        "peak_memory_max_mb": max(peaks) if peaks else None,
        "trainable_params": round(_mean([c.trainable_params for c in costs]) or 0),
        "cached_users": sum(bool(c.cached) for c in costs),
    }


def provenance(config: BenchConfig, plan: WorkerPlan | None = None) -> dict:
    """What produced a row: the full config, the code revision, when and where.

    ``threads`` is this process's torch threads; ``workers`` and ``threads_per_worker`` say where the
    row's users ran (a pool ``plan``, or 1 x this process's threads).
    """
    threads = torch.get_num_threads()
    host = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "workers": plan.workers if plan else 1,
        "threads_per_worker": plan.threads if plan else threads,
        "machine": platform.machine(),
        "device": _device(config),
    }
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {"config": config.to_json(), "git_revision": git_revision(), "created": created, "host": host}


def make_row(
    config: BenchConfig,
    cell: Cell,
    method: BenchMethod,
    outcome: MethodOutcome,
    split: LampSplit,
    labels: Sequence[str],
    profile_seconds: float | None,
) -> dict:
    """One results.jsonl row."""
    run, anchor = outcome.run, outcome.anchor
    metrics = evaluate(cell.task, [g or "" for g in run.golds], run.outputs, labels)
    return {
        "model": config.model,
        "protocol": config.protocol,
        "split": config.split,
        "decode": config.decode,
        "schedule": config.schedule,
        **asdict(cell),
        "label": method.label,
        "kind": method.kind,
        "n_users": len(split.users),
        "queries": len(run.ids),
        "metrics": metrics,
        "score": task_score(cell.task, metrics),
        **cost_fields(outcome.costs),
        "predict_seconds": run.generation.seconds,
        "profile_seconds": profile_seconds,
        "shared_params": method.shared_params,
        "requires_task_data": method.requires_task_data or bool(anchor and anchor.requires_task_data),
        "anchor": anchor.source if anchor else None,
        "details": outcome.extra,
        "predictions": query_records(run, split),
        "labels": list(labels) if get_task(cell.task).kind == "classification" else None,
        **provenance(config, outcome.plan),
    }


def query_records(run: PredictionRun, split: LampSplit) -> list[dict]:
    """Each query's user, gold and answer, so a report can re-score any subset of users (``bench.stats``)."""
    owner = {q.id: user for user, queries in split.users.items() for q in queries}
    return [
        {"id": i, "user": owner[i], "gold": g, "output": o}
        for i, g, o in zip(run.ids, run.golds, run.outputs)
    ]


def _device(config: BenchConfig) -> str:
    return config.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_cells(ctx: TaskContext, cells: Sequence[Cell], store: ResultStore, bar) -> int:
    """Run the pending cells of one task, appending a row as each finishes; returns rows written."""
    written = 0
    last_prompt = max((i for i, c in enumerate(cells) if get_method(c.method).kind == "prompt"), default=-1)
    try:
        for index, cell in enumerate(cells):
            method = get_method(cell.method)
            if method.kind == "personal" and ctx.config.workers > 1 and ctx.user_pool is None:
                ctx.user_pool = start_user_pool(ctx, cells)  # once per task: workers load the model once
            split = ctx.targets(cell.users)
            pconf, profile_seconds = predict_config(ctx.config, ctx, split, cell.variant, cell.items)
            outcome = EXECUTORS[method.kind](ctx, method, cell, split, pconf)
            store.append(make_row(ctx.config, cell, method, outcome, split, ctx.labels, profile_seconds))
            written += 1
            bar.update()
            if index == last_prompt:  # free the task-adapted copy before trained methods' memory is measured
                ctx.release_prompt_model()
    finally:
        if ctx.user_pool is not None:
            ctx.user_pool.close()
            ctx.user_pool = None
    return written


def start_user_pool(ctx: TaskContext, cells: Sequence[Cell]) -> UserPool:
    """The pool for the personal cells among ``cells``, its spec carrying every anchor they start from."""
    from prisp.models import resolve_model

    anchors = {anchor_key(get_method(c.method), c): personal_anchor(ctx, get_method(c.method), c).weights
               for c in cells if get_method(c.method).kind == "personal"}
    # Resolved here so a registered model converts once, before workers could race to convert it.
    source, _ = resolve_model(ctx.config.model)
    device = _device(ctx.config)
    plan = ctx.config.worker_plan()
    return UserPool(
        ctx.config.model, source, None if device == "cpu" else device, ctx.task, ctx.labels, anchors, plan
    )


def missing_cells(config: BenchConfig, store: ResultStore) -> dict[str, list[Cell]]:
    """Per task of ``config``, its grid cells that have no row in ``store`` yet."""
    return {
        task: [c for c in grid(config, task) if not store.has(cell_key(config, c))] for task in config.tasks
    }


def report_only(config: BenchConfig) -> tuple[Path, list[Cell]]:
    """Write the report from the rows already in ``config.out`` (nothing is computed); returns it and the cells
    still missing."""
    from prisp.bench.report import write_report

    store = ResultStore(config.out)
    missing = [cell for cells in missing_cells(config, store).values() for cell in cells]
    return write_report(config, store.rows, missing), missing


def run_bench(
    config: BenchConfig,
    prisp_anchor: AnchorProvider | None = None,
    loaded=None,
    embedder: HistoryEmbedder | None = None,
) -> BenchOutcome:
    """Run (or resume) the benchmark grid of ``config`` and write its report.

    Args:
        config: the grid and everything it depends on.
        prisp_anchor: overrides the PRISP anchor provider (``config.prisp_anchor``); see
            ``prisp.bench.anchors``.
        loaded: an already loaded base model (``prisp.models.LoadedModel``); loaded from ``config.model``
            if None.
        embedder: the history embedder for sharer selection (default: MiniLM).
    """
    from prisp.bench.report import write_report

    store = ResultStore(config.out)
    pending = missing_cells(config, store)
    total = sum(len(grid(config, task)) for task in config.tasks)
    todo = sum(len(cells) for cells in pending.values())
    written = 0
    if todo:
        loaded = loaded or _load(config)
        embedder = embedder or HistoryEmbedder()
        contexts: dict[str, TaskContext] = {}
        with tqdm(total=todo, desc="bench", unit="row", file=sys.stderr, disable=not config.progress) as bar:
            for task, cells in pending.items():
                if cells:
                    ctx = contexts.get(task) or TaskContext(config, task, loaded, embedder, prisp_anchor, contexts)
                    written += run_cells(ctx, cells, store, bar)
    write_report(config, store.rows)
    return BenchOutcome(written, total - todo, store.path)


def _load(config: BenchConfig):
    from prisp.models import load_model

    device = _device(config)
    return load_model(config.model, device=None if device == "cpu" else device)

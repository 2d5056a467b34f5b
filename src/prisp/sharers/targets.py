"""Per-target adapters from a sharer pool, with the same cost accounting as Stage 2.

A sharer method (Per-Pcs, PriME) builds one adapter per target user from the pool; this module times it with
the training loop's own memory monitor, adds the training cost of the sharers it relied on (the paper charges
it to the method), caches the adapter per target, and answers the target's queries exactly like
``predict_personalized``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from prisp.adapters import LoraWeights, attach_lora, load_adapter, save_adapter, shared_copy
from prisp.data.lamp import LampSplit, ProfileItem
from prisp.data.protocol import recent_items
from prisp.data.tasks import label_set
from prisp.generation import GenerationResult
from prisp.predict import PredictConfig, PredictionRun, predict_split
from prisp.sharers.pool import Sharer
from prisp.training import MemoryMonitor  # the loop's own monitor: one accounting for every method


@dataclass
class Measurement:
    """Wall time and peak memory of a block (filled in when the block ends)."""

    seconds: float = 0.0
    peak_memory_mb: float | None = None


@contextlib.contextmanager
def measured(device: torch.device | str = "cpu") -> Iterator[Measurement]:
    """Time a block and sample its peak memory exactly as ``prisp.training.train`` does."""
    out = Measurement()
    monitor = MemoryMonitor(torch.device(device))
    start = time.perf_counter()
    with monitor:
        yield out
    out.seconds = time.perf_counter() - start
    report = monitor.report()
    out.peak_memory_mb = report["peak_rss_mb"] or report["peak_cuda_mb"]


@dataclass
class AdapterBuild:
    """What a sharer method produced for one target: the adapter and its own cost."""

    weights: LoraWeights
    seconds: float
    peak_memory_mb: float | None
    trainable_params: int  # parameters the method itself optimised for this target (PriME: merge weights)
    sharers: list[Sharer]  # the sharers whose LoRAs it used (their training is charged to the target)
    details: dict = field(default_factory=dict)


@dataclass
class TargetCost:
    """One target's cost: the method's own work plus the training of the sharers it used.

    ``seconds``/``peak_memory_mb``/``trainable_params`` mirror :class:`prisp.personalize.per_user.UserCost`,
    so a benchmark aggregates every method the same way.
    """

    user: str
    cached: bool
    seconds: float
    peak_memory_mb: float | None
    trainable_params: int
    own_seconds: float
    own_peak_memory_mb: float | None
    sharer_seconds: float
    sharer_peak_memory_mb: float | None
    sharer_trainable_params: int
    sharers: list[str]
    details: dict = field(default_factory=dict)

    @classmethod
    def from_build(cls, user: str, build: AdapterBuild, cached: bool = False) -> TargetCost:
        sharer_s = sum(s.cost.seconds + s.gate_seconds for s in build.sharers)
        peaks = [s.cost.peak_memory_mb for s in build.sharers if s.cost.peak_memory_mb is not None]
        sharer_peak = max(peaks) if peaks else None
        total_peak = max([p for p in (build.peak_memory_mb, sharer_peak) if p is not None], default=None)
        return cls(
            user,
            cached,
            build.seconds + sharer_s,
            total_peak,
            build.trainable_params,
            build.seconds,
            build.peak_memory_mb,
            sharer_s,
            sharer_peak,
            sum(s.cost.trainable_params for s in build.sharers),
            [s.user for s in build.sharers],
            build.details,
        )


class SharerMethod(Protocol):
    """A sharer method: ``build`` one target's adapter; ``key_payload`` names all the result depends on."""

    name: str

    def key_payload(self) -> dict: ...

    def build(
        self, base, tokenizer, task: str, items: Sequence[ProfileItem], labels: Sequence[str]
    ) -> AdapterBuild: ...


@dataclass
class SharerRun:
    """Predictions over all targets plus the per-target costs."""

    run: PredictionRun
    users: list[TargetCost] = field(default_factory=list)


def target_key(model_name: str, method: SharerMethod, task: str, items: Sequence[ProfileItem]) -> str:
    payload = {
        "model": model_name,
        "method": method.name,
        "task": task,
        "config": method.key_payload(),
        "items": [item.to_json() for item in items],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def target_model(
    base,
    tokenizer,
    model_name: str,
    task: str,
    user: str,
    history: Sequence[ProfileItem],
    k: int,
    method: SharerMethod,
    labels: Sequence[str],
    cache_dir: Path | None,
):
    """The target's model (a copy of ``base`` with the composed adapter) and its cost; cached per target."""
    items = recent_items(history, k)
    cached = cache_dir / f"{method.name}-{target_key(model_name, method, task, items)}" if cache_dir else None
    if cached and (cached / "target.json").is_file():
        cost = TargetCost(**{**json.loads((cached / "target.json").read_text()), "cached": True})
        return attach_lora(shared_copy(base), load_adapter(cached)).eval(), cost
    build = method.build(base, tokenizer, task, items, labels)
    cost = TargetCost.from_build(user, build)
    if cached:
        save_adapter(build.weights, cached, model_name, {"target.json": json.dumps(asdict(cost), indent=1)})
    return attach_lora(shared_copy(base), build.weights).eval(), cost


def predict_with_sharers(
    base,
    tokenizer,
    model_name: str,
    split: LampSplit,
    method: SharerMethod,
    predict_config: PredictConfig,
    k: int,
    cache_dir: Path | None,
    on_user: Callable[[str], None] | None = None,
) -> SharerRun:
    """Answer ``split`` target by target, each with the adapter ``method`` composes from the pool."""
    labels = label_set(split.task, split.inputs)
    wanted = {q.id for q in split.queries[: predict_config.limit or len(split.queries)]}
    runs, costs = [], []
    for user, queries in split.users.items():
        queries = [q for q in queries if q.id in wanted]
        if not queries:
            continue
        model, cost = target_model(
            base, tokenizer, model_name, split.task, user, queries[0].profile, k, method, labels, cache_dir
        )
        costs.append(cost)
        user_split = LampSplit(split.task, split.split, queries, users={user: queries})
        runs.append(predict_split(model, tokenizer, user_split, replace(predict_config, limit=None)))
        del model
        if on_user:
            on_user(user)
    return SharerRun(merge_runs(split, runs, wanted), costs)


def merge_runs(split: LampSplit, runs: Sequence[PredictionRun], wanted: set[str]) -> PredictionRun:
    """One :class:`PredictionRun` in the split's query order from per-user runs."""
    by_id = {
        qid: (run.prompts[i], run.outputs[i], run.raw_outputs[i], run.golds[i])
        for run in runs
        for i, qid in enumerate(run.ids)
    }
    ids = [q.id for q in split.queries if q.id in wanted and q.id in by_id]
    rows = [by_id[i] for i in ids]
    generation = GenerationResult(
        [r[2] for r in rows],
        sum(r.generation.new_tokens for r in runs),
        sum(r.generation.seconds for r in runs),
        sum(r.generation.truncated_prompts for r in runs),
    )
    return PredictionRun(
        split.task,
        ids,
        [r[0] for r in rows],
        [r[1] for r in rows],
        generation,
        [r[3] for r in rows],
        [r[2] for r in rows],
    )

"""Anchors for the benchmark: the task-adapted LoRA (cached in the run directory) and the pluggable PRISP
anchor.

The PRISP anchor comes from a provider, ``(AnchorRequest) -> Anchor``. The default, :func:`hypernet_anchor`,
generates it from the task description (Table 11) with the hypernetwork checkpoint (``--hypernet`` or the one
shipped for the model) and falls back to the task-adapted anchor, recorded as such, when the model has none.
``run_bench(config, prisp_anchor=my_provider)`` plugs in anything else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prisp.adapters import LoraWeights, load_adapter, save_adapter
from prisp.data.lamp import Query
from prisp.data.tasks import TASKS, get_task
from prisp.errors import PrispError
from prisp.personalize import task_adapt
from prisp.personalize.hyperparams import TASK_ADAPTATION
from prisp.training import TrainConfig

logger = logging.getLogger(__name__)

# Table 11 (descriptions given to the hypernetwork), kept here for callers of the benchmark API; the
# descriptions themselves live on the task specs (``TaskSpec.description``).
TASK_DESCRIPTIONS: dict[str, str] = {name: spec.description for name, spec in TASKS.items()}


@dataclass
class Anchor:
    """An anchor LoRA and where it came from."""

    weights: LoraWeights
    source: str  # e.g. "task-adapted (50 samples)", "hypernet:/path"
    requires_task_data: bool
    seconds: float = 0.0


@dataclass
class AnchorRequest:
    """What a PRISP anchor provider gets. ``task_adapted()`` trains (or loads) the fallback on demand."""

    base: object
    tokenizer: object
    model_name: str
    task: str
    hypernet: Path | None
    task_adapted: Callable[[], Anchor]
    description: str | None = None  # another wording than the task's own (Figure 8)


AnchorProvider = Callable[[AnchorRequest], Anchor]


def task_adapted_anchor(
    base,
    tokenizer,
    model_name: str,
    task: str,
    queries: Sequence[Query],
    samples: int | None,
    epochs: int,
    max_length: int,
    seed: int,
    labels: Sequence[str],
    cache_dir: Path,
) -> Anchor:
    """Train a task-adapted anchor (Table 7 schedule) on ``samples`` queries (None: all), or load it."""
    report_file = cache_dir / "task_adaptation.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        return Anchor(load_adapter(cache_dir), report["source"], True, report["train"]["seconds"])
    n = samples or len(queries)
    config = TrainConfig(
        epochs=epochs,
        batch_size=TASK_ADAPTATION.batch_size,
        lr=TASK_ADAPTATION.lr,
        seed=seed,
        micro_batch_size=3,
        max_length=max_length,
        progress=False,
    )
    result = task_adapt(base, tokenizer, task, queries, n, seed, config=config, labels=labels)
    source = f"task-adapted ({len(result.query_ids)} samples)"
    report = {"task": task, "source": source, "query_ids": result.query_ids, "train": result.train.to_dict()}
    save_adapter(
        result.weights, cache_dir, model_name, {"task_adaptation.json": json.dumps(report, indent=1)}
    )
    return Anchor(result.weights, source, True, result.train.seconds)


def hypernet_anchor(request: AnchorRequest) -> Anchor:
    """The PRISP anchor from the hypernetwork; the task-adapted anchor when the model has no checkpoint.

    An explicitly given ``--hypernet`` that fails to load is an error, never a silent fallback.
    """
    from prisp.hypernet.anchor import Anchorer
    from prisp.hypernet.checkpoint import shipped_checkpoint

    if request.hypernet is None and shipped_checkpoint(request.model_name) is None:
        if request.description is not None:
            raise PrispError(f"no hypernetwork checkpoint for {request.model_name}: an anchor from another "
                             "description needs one (--hypernet)")
        logger.warning(
            "no hypernetwork checkpoint for %s: PRISP starts from the task-adapted anchor", request.model_name
        )
        fallback = request.task_adapted()
        return Anchor(
            fallback.weights, f"{fallback.source}; no hypernet for the model", True, fallback.seconds
        )
    start = time.perf_counter()
    anchorer = Anchorer.load(request.hypernet, request.model_name, request.base, request.tokenizer)
    weights = anchorer.generate(request.description or get_task(request.task).description).weights
    where = request.hypernet or "shipped"
    return Anchor(weights, f"hypernet ({where})", False, time.perf_counter() - start)


def task_adapted_provider(request: AnchorRequest) -> Anchor:
    """Provider that always uses the task-adapted anchor (an ablation: PRISP's Stage 2 with task data)."""
    if request.description is not None:
        raise PrispError("--descriptions needs the hypernet anchor: a task-adapted anchor reads no description")
    return request.task_adapted()


ANCHOR_PROVIDERS: dict[str, AnchorProvider] = {
    "hypernet": hypernet_anchor,
    "task-adapted": task_adapted_provider,
}

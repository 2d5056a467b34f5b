"""The README's main job: NP vs RAG on the packaged sample with the default model, as a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from prisp.data.lamp import load_task_split
from prisp.data.tasks import get_task, label_set
from prisp.metrics import evaluate, task_score
from prisp.models import load_model
from prisp.predict import PredictConfig, predict_split

METHODS = ("np", "rag")


def run_demo(model_name: str, data: Path, split: str, tasks: Sequence[str],
             personalize_task: str | None = "LaMP-4") -> list[dict]:
    """Predict every task of ``data``/``split`` with NP and RAG, print metrics and a few answers.

    With ``personalize_task``, also run the whole PRISP pipeline on that task: an anchor generated from
    the task's description by the shipped hypernetwork, then one bridge-personalized adapter per user.
    """
    console = Console(stderr=False)
    console.print(f"[bold]prisp demo[/]: model {model_name}, data {data} ({split})")
    start = time.perf_counter()
    loaded = load_model(model_name)
    console.print(f"model ready in {time.perf_counter() - start:.1f} s")
    rows, examples = [], []
    for task in tasks:
        split_data = load_task_split(data, task, split)
        golds = [q.gold for q in split_data.queries]
        labels = label_set(task, split_data.inputs)
        for method in METHODS:
            run = predict_split(loaded.model, loaded.tokenizer, split_data, PredictConfig(method=method))
            metrics = evaluate(task, golds, run.outputs, labels)
            rows.append({"task": get_task(task).name, "method": method, "metrics": metrics,
                         "score": task_score(task, metrics), "seconds": run.generation.seconds,
                         "queries": len(run.ids)})
            examples.append((task, method, split_data.queries[0].gold, run.outputs[0]))
            console.print(f"  {task} {method}: {_fmt(metrics)} ({len(run.ids)} queries, "
                          f"{run.generation.seconds:.1f} s)")
    console.print(_table(rows))
    console.print(_examples(examples))
    if personalize_task:
        rows.append(_prisp_row(console, loaded, model_name, data, split, personalize_task))
    return rows


def _prisp_row(console: Console, loaded, model_name: str, data: Path, split: str, task: str) -> dict:
    """Stage 1 + Stage 2 on one task: hypernetwork anchor from text, then PRISP per user."""
    from prisp.hypernet.anchor import Anchorer
    from prisp.personalize import PersonalizeConfig
    from prisp.personalize.per_user import predict_personalized

    split_data = load_task_split(data, task, split)
    anchor = Anchorer.load(model_name=model_name, base=loaded.model, tokenizer=loaded.tokenizer)
    generated = anchor.generate(get_task(task).description)
    console.print(f"PRISP on {task}: anchor generated from its description in {generated.total_ms:.0f} ms; "
                  f"personalizing {len(split_data.users)} users (A frozen, B and C trained, one epoch) ...")
    result = predict_personalized(loaded.model, loaded.tokenizer, model_name, split_data, generated.weights,
                                  PersonalizeConfig(progress=False), PredictConfig(), cache_dir=None)
    metrics = evaluate(task, [q.gold for q in split_data.queries], result.run.outputs,
                       label_set(task, split_data.inputs))
    seconds = sum(u.seconds for u in result.users) / len(result.users)
    console.print(f"  {task} prisp: {_fmt(metrics)} ({seconds:.1f} s of training per user, "
                  f"{result.users[0].trainable_params:,} trainable parameters)")
    return {"task": get_task(task).name, "method": "prisp", "metrics": metrics, "score": task_score(task, metrics),
            "seconds": result.run.generation.seconds, "queries": len(result.run.ids)}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def _table(rows: list[dict]) -> Table:
    table = Table(title="NP vs RAG (BM25 top-1 of the 10 most recent items) on the packaged sample")
    for column in ("task", "metrics", "NP", "RAG", "NP s", "RAG s"):
        table.add_column(column, justify="left" if column in ("task", "metrics") else "right")
    by_task: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["method"]] = row
    for task, methods in by_task.items():
        keys = list(methods["np"]["metrics"])
        table.add_row(task, " / ".join(keys),
                      " / ".join(f"{methods['np']['metrics'][k]:.3f}" for k in keys),
                      " / ".join(f"{methods['rag']['metrics'][k]:.3f}" for k in keys),
                      f"{methods['np']['seconds']:.1f}", f"{methods['rag']['seconds']:.1f}")
    return table


def _examples(examples: list[tuple[str, str, str | None, str]]) -> Table:
    table = Table(title="First query of each task: gold vs prediction")
    for column in ("task", "method", "gold", "prediction"):
        table.add_column(column, overflow="fold")
    for task, method, gold, pred in examples:
        table.add_row(task, method, gold or "", pred)
    return table

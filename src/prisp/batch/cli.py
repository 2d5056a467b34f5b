"""Typer commands of the batch layer: ``personalize-batch`` and ``export vllm``.

They are registered on the main app by ``prisp.cli``; each already turns a :class:`PrispError`
into one line on stderr and exit code 2, so registering them needs no wrapper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prisp.console import SCHEDULE_HELP, friendly
from prisp.models import DEFAULT_MODEL

export_app = typer.Typer(help="Export personalized adapters for serving stacks.", no_args_is_help=True)


@friendly
def personalize_batch_command(
    task: str = typer.Option(..., help="LaMP task, e.g. LaMP-4."),
    anchor: Path = typer.Option(..., help="Anchor LoRA directory (peft) every user starts from."),
    users: Path = typer.Option(..., help="A LaMP questions file (users = identical profiles, id = first query "
                                         "id) or JSON lines of {\"user_id\", \"items\"}."),
    out: Path = typer.Option(..., help="Adapter store: STORE/<user_id>/adapter/ and STORE/results.jsonl."),
    backend: str = typer.Option("local", help="local (process pool) | ray (local cluster, or --ray-address)."),
    workers: Optional[int] = typer.Option(None, help="Parallel workers [default: one per core / cluster CPU]."),
    threads: Optional[int] = typer.Option(None, help="torch threads per worker [default: cores // workers]."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting one."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model (registered name or local directory)."),
    strategy: str = typer.Option("prisp", help="prisp | oppu | full-lora | no-bridge | bridge-only | pissa | lora-ga."),
    seed: int = typer.Option(0, help="Run seed; each user's seed derives from it and the user id."),
    retries: int = typer.Option(2, help="Extra attempts for a user after a transient failure."),
    k: int = typer.Option(10, help="Most recent history items used per user."),
    schedule: str = typer.Option("paper", help=SCHEDULE_HELP),
    epochs: Optional[int] = typer.Option(None, help="Epochs over each user's examples [default: the schedule's]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: the schedule's for the task]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: the schedule's for the task]."),
    micro_batch_size: int = typer.Option(4, help="Gradient-accumulation chunk (bounds memory; same update)."),
    micro_batch_tokens: int = typer.Option(640, help="Cap on a chunk's padded tokens (bounds memory; same update)."),
    max_length: int = typer.Option(512, help="Tokens per training example."),
    progress: bool = typer.Option(True, help="Progress bar over users on stderr."),
    key_file: Optional[Path] = typer.Option(None, help="Key of an encrypted serving store given as --out "
                                                      "[default: $PRISP_STORE_KEY]."),
) -> None:
    """Personalize many users in parallel; finished users are skipped, failed ones retried and reported."""
    from prisp.adapters import load_adapter
    from prisp.batch.config import BatchConfig
    from prisp.batch.runner import run_batch
    from prisp.batch.sealed import open_store
    from prisp.batch.users import load_users
    from prisp.data.tasks import get_task
    from prisp.personalize import PersonalizeConfig

    spec = get_task(task)
    training = PersonalizeConfig(strategy=strategy, k=k, schedule=schedule, epochs=epochs, lr=lr, batch_size=batch_size,
                                 micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens,
                                 max_length=max_length, seed=seed,
                                 progress=False)
    training.train_config(spec.name)  # an uncovered --schedule tuned is refused before any worker starts
    config = BatchConfig(task=spec.name, model=model, backend=backend, workers=workers, threads=threads,
                         ray_address=ray_address, retries=retries, personalize=training)
    user_set = load_users(users, spec.name)
    anchor_weights = load_adapter(anchor)
    plan = config.plan()
    with open_store(out, spec.name, key_file) as store:
        from prisp.serve.keys import drop_key_from_environment

        drop_key_from_environment()  # loaded (or unused): workers started below must not inherit it
        typer.echo(f"{len(user_set.jobs)} users from {users}; backend {backend}, "
                   f"{'cluster-sized' if ray_address and workers is None else plan.workers} workers x "
                   f"{plan.threads} threads -> {out}", err=True)
        summary = run_batch(config, user_set, store, anchor_weights, progress=progress)
    typer.echo(summary.describe())
    typer.echo(f"log: {store.log_path}")
    if summary.failed:
        raise typer.Exit(1)  # scripts must notice partial failure; the summary above says who and why


@export_app.command("vllm")
@friendly
def export_vllm_command(
    store: Path = typer.Option(..., help="Adapter store written by personalize-batch."),
    out: Path = typer.Option(..., help="Export directory (one adapter per user; a LoRA resolver directory)."),
    base_model_name: Optional[str] = typer.Option(
        None, help="Name vLLM serves the base model under (--served-model-name); written into each adapter "
                   "[default: the model recorded in the store]."),
    task: Optional[str] = typer.Option(None, help="Task whose adapters to export (needed for an encrypted store)."),
    key_file: Optional[Path] = typer.Option(None, help="Key of an encrypted store [default: $PRISP_STORE_KEY]."),
) -> None:
    """Write the store's per-user adapters in the layout vLLM multi-LoRA serving loads (plaintext: protect OUT)."""
    from prisp.batch.export import MODULES_JSON, MODULES_TXT, export_vllm
    from prisp.batch.sealed import open_store
    from prisp.data.tasks import normalize_task_name

    with open_store(store, normalize_task_name(task) if task else None, key_file, writer=False) as source:
        result = export_vllm(source, out, base_model_name)
    typer.echo(f"{len(result.names)} adapters (max rank {result.max_rank}, base model "
               f"{result.base_model_name!r}) -> {result.out}")
    typer.echo(f"--lora-modules list: {result.out / MODULES_TXT} (JSON: {result.out / MODULES_JSON})")

"""The ``prisp bench`` command (wired into ``prisp.cli``'s app as ``bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prisp.console import THREADS_HELP, set_threads
from prisp.errors import PrispError


def _csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def bench_command(
    tasks: Optional[str] = typer.Option(None, help="Comma-separated LaMP tasks (default: the profile's)."),
    methods: Optional[str] = typer.Option(
        None,
        help="Comma-separated: np, rag, pag, rag+pag, per-pcs, prime, oppu, "
        "prisp (also anchor = PRISP Stage 1 alone, full-lora, no-bridge, bridge-only, pissa, lora-ga).",
    ),
    variants: Optional[str] = typer.Option(
        None, help="Prompt variants of personalized methods: np,rag,pag,rag+pag."
    ),
    protocol: Optional[str] = typer.Option(None, help="few-shot (50 task samples, 10 user items) or full."),
    data: Optional[Path] = typer.Option(None, help="LaMP data directory (default: the profile's)."),
    split: Optional[str] = typer.Option(None, help="Target users' split (default: dev)."),
    users: Optional[int] = typer.Option(None, help="Target users per task (the split's first N)."),
    profile: str = typer.Option("standard", help="quick (CI smoke) | standard (this machine) | paper (GPU)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: bench/results/<profile>)."),
    model: Optional[str] = typer.Option(None, help="Base model: registered name, local dir or cached HF id."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    data_sizes: Optional[str] = typer.Option(None, help="Figure 6 user item counts, e.g. 1,5,10,30,50, or none to skip the sweep (default: the profile's)."),
    data_size_tasks: Optional[str] = typer.Option(
        None, help="Tasks of the Figure 6 sweep, each one of --tasks (default: the profile's, those run)."
    ),
    data_size_users: Optional[int] = typer.Option(
        None, help="Target users per task of the Figure 6 sweep (default: the profile's, else --users)."
    ),
    cross_task: Optional[bool] = typer.Option(
        None, "--cross-task/--no-cross-task",
        help="Figure 7: also run each sharer method (per-pcs, prime) on every task with every other task's sharer "
        "pool, and report adaptability (default: the profile's).",
    ),
    cross_task_users: Optional[int] = typer.Option(
        None, help="Target users per task of the cross-task cells (default: --users)."
    ),
    descriptions: Optional[str] = typer.Option(
        None, help="Figure 8: other description wordings to anchor from, e.g. paraphrase,imprecise (Stage 1 and "
        "Stage 2 rows beside the reference's)."
    ),
    sni: Optional[Path] = typer.Option(
        None, help="SNI tasks.jsonl an imprecise wording is chosen from (default: $PRISP_SNI or "
        "../shared/data/sni/tasks.jsonl)."
    ),
    prisp_anchor: Optional[str] = typer.Option(
        None, help="hypernet (falls back to task-adapted) | task-adapted."
    ),
    hypernet: Optional[Path] = typer.Option(None, help="Hypernetwork checkpoint for the PRISP anchor."),
    seed: Optional[int] = typer.Option(None, help="Seed."),
    threads: Optional[str] = typer.Option(None, help="This process's " + THREADS_HELP),
    workers: Optional[int] = typer.Option(
        None,
        help="Processes for the users of PRISP, OPPU and ablation cells, each loading the model once "
        "with cores // N torch threads (default 1: in this process). Per-Pcs, PriME and prompt-only "
        "methods stay in this process.",
    ),
    decode: str = typer.Option(
        "free", help="Label tasks: free (greedy generation snapped to a label; the paper's protocol) | labels "
        "(rank the label set by log-likelihood) | auto (labels where the task has a label set)."
    ),
    schedule: str = typer.Option(
        "paper", help="Stage-2 schedule of PRISP, OPPU and the ablations: paper (Table 7) | tuned (searched on "
        "train users; bench/results/schedule_search.md)."
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Only (re)write report.md and the figures from the rows already there."
    ),
) -> None:
    """Run the paper's comparison grid (resumable) and write results.jsonl, report.md and figures."""
    from prisp.bench.config import profile_config
    from prisp.bench.runner import run_bench

    set_threads(threads)
    sizes = _data_sizes(data_sizes)
    config = profile_config(
        profile,
        tasks=_csv(tasks),
        methods=_csv(methods),
        variants=_csv(variants),
        protocol=protocol,
        data=data,
        split=split,
        users=users,
        out=out or Path("bench/results") / profile,
        model=model,
        device=device,
        data_sizes=sizes,
        data_size_tasks=_csv(data_size_tasks),
        data_size_users=data_size_users,
        cross_task=cross_task,
        cross_task_users=cross_task_users,
        descriptions=_csv(descriptions),
        sni=sni,
        prisp_anchor=prisp_anchor,
        hypernet=hypernet,
        seed=seed,
        workers=workers,
        decode=decode,
        schedule=schedule,
        progress=progress,
    )
    if data_size_tasks is not None:
        stray = [t for t in config.data_size_tasks if t not in config.tasks]
        if stray:
            raise PrispError(f"--data-size-tasks {', '.join(stray)} not among --tasks ({', '.join(config.tasks)})")
    if report_only:
        from prisp.bench.runner import report_only as write_report_only

        path, missing = write_report_only(config)
        typer.echo(f"report: {path} ({len(missing)} grid cells not run yet)")
        return
    _quiet_transformers()
    outcome = run_bench(config)
    typer.echo(
        f"bench {config.profile}: {outcome.written} rows written, {outcome.skipped} already done -> "
        f"{outcome.results}; report: {Path(config.out) / 'report.md'}"
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _data_sizes(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    try:
        return tuple(int(s) for s in _csv(value))
    except ValueError:
        raise PrispError(f"--data-sizes takes item counts such as 1,5,10 or none, got {value!r}") from None

"""The ``prisp`` command line (typer). Commands print one line on bad input and exit non-zero."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from prisp.errors import PrispError

app = typer.Typer(help="prisp: private, few-shot personalization of small language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: download official LaMP files.", no_args_is_help=True)
download_app = typer.Typer(help="Download a benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(download_app, name="download")

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
EXIT_USER_ERROR = 2


def friendly(command: Callable) -> Callable:
    """Turn a :class:`PrispError` into one line on stderr and exit code 2 (no stack trace)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PrispError as exc:
            typer.echo(f"prisp: error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def default_data_dir() -> Path:
    """``$PRISP_DATA`` when set, else the hand-written sample shipped in the package."""
    return Path(os.environ["PRISP_DATA"]) if os.environ.get("PRISP_DATA") else SAMPLE_DIR


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _set_threads(threads: Optional[int]) -> None:
    import torch

    threads = threads or int(os.environ.get("PRISP_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)


def load_for_inference(model_name: str, adapter: Optional[Path], threads: Optional[int]):
    """Load the base model (and a peft adapter on top) with a status line on stderr."""
    from prisp.models import load_model

    _quiet_transformers()
    _set_threads(threads)
    typer.echo(f"loading model {model_name} ...", err=True)
    loaded = load_model(model_name)
    if adapter is not None:
        from prisp.adapters import apply_adapter_dir

        loaded.model = apply_adapter_dir(loaded.model, adapter)
    return loaded


@app.command()
@friendly
def predict(
    task: str = typer.Option(..., help="LaMP task, e.g. LaMP-4 (LaMP_4 also accepted)."),
    out: Path = typer.Option(..., help="Where to write predictions (LaMP outputs format)."),
    data: Optional[Path] = typer.Option(None, help="Data directory [default: $PRISP_DATA or the packaged sample]."),
    split: str = typer.Option("dev", help="Split name: reads {split}_questions.json."),
    method: str = typer.Option("np", help="Prompt method: np | rag."),
    k: int = typer.Option(1, help="Items retrieved per query (rag)."),
    history: int = typer.Option(10, help="Recent history items retrieval may use (0 = whole profile)."),
    model: str = typer.Option("smollm2-135m", help="Registered name, local model dir or cached HF id."),
    adapter: Optional[Path] = typer.Option(None, help="A peft LoRA adapter directory to apply."),
    limit: Optional[int] = typer.Option(None, help="Answer only the first N queries."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    snap: bool = typer.Option(True, help="Map label answers that start with a label onto it ('1' -> '[1]')."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: $PRISP_THREADS or torch's]."),
) -> None:
    """Answer a LaMP split with NP or RAG prompts and write the predictions."""
    from tqdm import tqdm

    from prisp.data.lamp import load_task_split
    from prisp.data.tasks import get_task
    from prisp.generation import GenerationConfig
    from prisp.predict import PredictConfig, predict_split, write_json_atomic

    spec = get_task(task)
    config = PredictConfig(method=method, k=k, history=history, limit=limit, snap_labels=snap,
                           generation=GenerationConfig(max_new_tokens=spec.max_new_tokens, batch_size=batch_size))
    split_data = load_task_split(data or default_data_dir(), spec.name, split, require_golds=False)
    loaded = load_for_inference(model, adapter, threads)
    total = min(len(split_data.queries), limit or len(split_data.queries))
    with tqdm(total=total, desc=f"{spec.name} {method}", unit="q", file=sys.stderr) as bar:
        run = predict_split(loaded.model, loaded.tokenizer, split_data, config, on_batch=bar.update)
    write_json_atomic(out, run.as_lamp_outputs())
    gen = run.generation
    typer.echo(f"{spec.name} {split} {method}: {len(run.ids)} queries in {gen.seconds:.1f} s "
               f"({len(run.ids) / gen.seconds:.2f} q/s, {gen.tokens_per_second:.1f} new tokens/s) -> {out}")


@app.command("eval")
@friendly
def eval_cmd(
    task: str = typer.Option(..., help="LaMP task (LaMP-4 or LaMP_4)."),
    golds: Path = typer.Option(..., help="Gold outputs file ({task, golds:[{id, output}]})."),
    preds: Path = typer.Option(..., help="Predictions file in the same format."),
    questions: Optional[Path] = typer.Option(None, help="Questions file (LaMP-2N reads its categories here)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    partial: bool = typer.Option(False, help="Score only the golds that have a prediction (after --limit)."),
) -> None:
    """Score predictions with the official LaMP metrics."""
    from prisp.metrics import evaluate_files, task_score

    metrics = evaluate_files(task, golds, preds, questions, partial=partial)
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    for key, value in metrics.items():
        typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"score: {task_score(task, metrics):.4f}")


@download_app.command("lamp")
@friendly
def download_lamp_cmd(
    task: str = typer.Option(..., help="LaMP task, e.g. LaMP-4."),
    dest: Path = typer.Option(..., help="Destination root; files land in DEST/<task>/."),
    split: list[str] = typer.Option(["train", "dev"], help="Splits to fetch (repeatable): train, dev, test."),
    base_url: Optional[str] = typer.Option(None, help="Mirror URL [default: $PRISP_LAMP_URL or the official]."),
    sha256: Optional[Path] = typer.Option(None, help="JSON {file name: sha256} of expected digests."),
) -> None:
    """Download the official LaMP files (resumable, checksummed)."""
    from prisp.data.download import download_lamp
    from prisp.data.lamp import read_json

    checksums = read_json(sha256) if sha256 else None
    results = download_lamp(task, dest, splits=split, base_url=base_url, checksums=checksums,
                            on_result=lambda r: typer.echo(r.describe()))
    typer.echo(f"{len(results)} files in {Path(dest) / results[0].spec.dest.split('/')[0]}" if results else "")


@app.command()
@friendly
def models() -> None:
    """List the registered base models and whether they are installed and cached."""
    from prisp.models import REGISTRY, prisp_home

    for entry in REGISTRY.values():
        cached = (prisp_home() / "models" / entry.name / "config.json").is_file()
        typer.echo(f"{entry.name}: {entry.description} [package {entry.package}; "
                   f"{'cached' if cached else 'not converted yet'}]")


@app.command()
@friendly
def demo(
    model: str = typer.Option("smollm2-135m", help="Base model."),
    data: Path = typer.Option(SAMPLE_DIR, help="Data directory [default: the packaged sample]."),
    split: str = typer.Option("dev", help="Split."),
    tasks: str = typer.Option("LaMP-1,LaMP-2,LaMP-2N,LaMP-3,LaMP-4,LaMP-5,LaMP-7", help="Comma-separated tasks."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
) -> None:
    """The main job on the embedded defaults: NP vs RAG predictions and metrics on the packaged sample."""
    from prisp.demo import run_demo

    _quiet_transformers()
    _set_threads(threads)
    run_demo(model, data, split, [t.strip() for t in tasks.split(",") if t.strip()])


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

"""The ``prisp`` command line (typer). Commands print one line on bad input and exit non-zero."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from prisp.batch.cli import export_app, personalize_batch_command
from prisp.bench.cli import bench_command
from prisp.console import SCHEDULE_HELP, THREADS_HELP, friendly, quiet_transformers, set_threads
from prisp.data.locations import SAMPLE_DIR, default_data_dir
from prisp.errors import PrispError
from prisp.hypernet.cli import anchor_command, hypernet_app
from prisp.models import DEFAULT_MODEL
from prisp.serve.cli import serve_app

app = typer.Typer(help="prisp: private, few-shot personalization of small language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: download official LaMP files; write derived tasks' files.",
                       no_args_is_help=True)
download_app = typer.Typer(help="Download a benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(serve_app, name="serve")
app.add_typer(hypernet_app, name="hypernet")
app.add_typer(export_app, name="export")
data_app.add_typer(download_app, name="download")

DECODE_HELP = ("Label tasks (LaMP-1/2/2N/3): auto = labels; labels = rank the task's label set by the model's "
               "log-likelihood (always a label); free = greedy generation (snapped to a label in predict).")


def load_for_inference(model_name: str, adapter: Optional[Path], threads: Optional[str]):
    """Load the base model (and a peft adapter on top) with a status line on stderr."""
    from prisp.models import load_model

    quiet_transformers()
    set_threads(threads)
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
    method: str = typer.Option("np", help="np | rag | pag | rag+pag, or a personalization strategy: prisp | oppu | "
                                          "full-lora | no-bridge | bridge-only | pissa | lora-ga (needs --anchor)."),
    anchor: Optional[Path] = typer.Option(None, help="Anchor LoRA directory for personalized methods."),
    rag: bool = typer.Option(False, help="Personalized methods: also prepend the BM25 top-k item to prompts."),
    pag: bool = typer.Option(False, help="Personalized methods: also prepend the user's PAG profile (written once "
                                         "by the base model, cached under $PRISP_HOME/profiles)."),
    cache: Optional[Path] = typer.Option(None, help="Per-user adapter cache [default: $PRISP_HOME/adapters]."),
    schedule: str = typer.Option("paper", help=f"Personalized methods: {SCHEDULE_HELP}"),
    k: int = typer.Option(1, help="Items retrieved per query (rag)."),
    history: int = typer.Option(10, help="Recent history items retrieval may use (0 = whole profile)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Registered name, local model dir or cached HF id."),
    adapter: Optional[Path] = typer.Option(None, help="A peft LoRA adapter directory to apply."),
    limit: Optional[int] = typer.Option(None, help="Answer only the first N queries."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    snap: bool = typer.Option(True, help="Map label answers that start with a label onto it ('1' -> '[1]')."),
    decode: str = typer.Option("auto", help=DECODE_HELP),
    label_normalise: str = typer.Option("mean", help="Label scoring: mean (per token, EOS included) or sum."),
    rating_rule: str = typer.Option("likeliest", help="Rating tasks (LaMP-3) under label decoding: likeliest "
                                                     "rating, or expected-error (least expected absolute error)."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Answer a LaMP split with NP or RAG prompts and write the predictions."""
    from tqdm import tqdm

    from prisp.data.lamp import load_task_split
    from prisp.data.tasks import get_task
    from prisp.files import write_json_atomic
    from prisp.generation import GenerationConfig
    from prisp.personalize import STRATEGIES, PersonalizeConfig
    from prisp.predict import PredictConfig, predict_split, variant_method
    from prisp.profiles import with_profiles

    spec = get_task(task)
    personalized = method in STRATEGIES
    if personalized and anchor is None:
        raise PrispError(f"--method {method} personalizes each user and needs --anchor DIR")
    personal = PersonalizeConfig(strategy=method, schedule=schedule, progress=False) if personalized else None
    if personal is not None:
        personal.train_config(spec.name)  # an uncovered --schedule tuned is refused before the model loads
    config = PredictConfig(method=variant_method(rag, pag) if personalized else method, k=k, history=history,
                           limit=limit, snap_labels=snap, decode=decode, label_normalise=label_normalise,
                           rating_rule=rating_rule,
                           generation=GenerationConfig(max_new_tokens=spec.max_new_tokens, batch_size=batch_size,
                                                       first_line=spec.first_line))
    split_data = load_task_split(data or default_data_dir(), spec.name, split, require_golds=False)
    loaded = load_for_inference(model, adapter, threads)
    config = with_profiles(config, loaded.model, loaded.tokenizer, model, split_data)
    total = min(len(split_data.queries), limit or len(split_data.queries))
    if personalized:
        run = _predict_personalized(loaded, model, split_data, anchor, personal, config, cache)
    else:
        with tqdm(total=total, desc=f"{spec.name} {method}", unit="q", file=sys.stderr) as bar:
            run = predict_split(loaded.model, loaded.tokenizer, split_data, config, on_batch=bar.update)
    write_json_atomic(out, run.as_lamp_outputs())
    gen = run.generation
    typer.echo(f"{spec.name} {split} {method}: {len(run.ids)} queries in {gen.seconds:.1f} s "
               f"({len(run.ids) / gen.seconds:.2f} q/s, {gen.tokens_per_second:.1f} new tokens/s) -> {out}")


def _predict_personalized(loaded, model_name, split_data, anchor, personal, config, cache):
    from tqdm import tqdm

    from prisp.adapters import load_adapter
    from prisp.models import prisp_home
    from prisp.personalize.per_user import predict_personalized

    anchor_weights = load_adapter(anchor)
    anchor_weights.check_fits(loaded.model)
    users = len(split_data.users_asking(config.limit))
    with tqdm(total=users, desc=f"{split_data.task} {personal.strategy} users", unit="user", file=sys.stderr) as bar:
        result = predict_personalized(loaded.model, loaded.tokenizer, model_name, split_data, anchor_weights,
                                      personal, config,
                                      cache or prisp_home() / "adapters", on_user=lambda _: bar.update())
    trained = [u for u in result.users if not u.cached]
    typer.echo(f"personalized {len(result.users)} users ({len(trained)} trained, "
               f"{len(result.users) - len(trained)} from cache)", err=True)
    return result.run


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


@data_app.command("derive")
@friendly
def derive_cmd(
    task: str = typer.Option(..., help="A derived task, e.g. LongLaMP-2 (built from LaMP-5)."),
    data: Optional[Path] = typer.Option(None, help="Directory holding the source task's files."),
    out: Path = typer.Option(..., help="Directory to write <task>/<split>_questions.json and _outputs.json to."),
    split: list[str] = typer.Option(["train", "dev"], help="Splits to write (repeatable)."),
) -> None:
    """Write a derived task's splits as LaMP files (e.g. to score them with prisp eval, or to ship them)."""
    from prisp.data.lamp import load_task_split, split_documents
    from prisp.data.tasks import get_task
    from prisp.files import write_json_atomic

    spec = get_task(task)
    if not spec.derived_from:
        raise PrispError(f"{spec.name} is not a derived task; it has its own files")
    splits = [load_task_split(data or default_data_dir(), spec.name, name) for name in split]  # all, then write
    for loaded in splits:
        questions, outputs = split_documents(loaded)
        folder = out / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{loaded.split}_questions.json", questions)
        write_json_atomic(folder / f"{loaded.split}_outputs.json", outputs)
        typer.echo(f"{spec.name} {loaded.split}: {len(loaded.queries)} queries from {spec.derived_from} -> {folder}")


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


def _read_history(history: Path, task: str, user: Optional[str]):
    """A history file: a JSON list of profile items, or a LaMP questions file plus --user QUERY_ID.

    Returns the items and the label set (LaMP-2N reads its categories from the questions' inputs).
    """
    from prisp.data.lamp import load_history, load_split, read_json
    from prisp.data.tasks import label_set

    if user is None:
        if isinstance(read_json(history), list) and _looks_like_questions(read_json(history)):
            raise PrispError(f"{history} is a LaMP questions file: pass --user QUERY_ID to pick the user")
        return load_history(history, task), label_set(task)
    split = load_split(history, None, task)
    match = [q for q in split.queries if q.id == user]
    if not match:
        raise PrispError(f"{history}: no question with id {user!r}")
    return match[0].profile, label_set(task, split.inputs)


def _looks_like_questions(records: list) -> bool:
    return bool(records) and isinstance(records[0], dict) and "profile" in records[0] and "input" in records[0]


@app.command("personalize")
@friendly
def personalize_cmd(
    anchor: Path = typer.Option(..., help="Anchor LoRA directory (peft): hypernet, task-adapted or random."),
    task: str = typer.Option(..., help="LaMP task."),
    history: Path = typer.Option(..., help="JSON list of LaMP profile items, or a LaMP questions file + --user."),
    out: Path = typer.Option(..., help="Output adapter directory (written atomically)."),
    user: Optional[str] = typer.Option(None, help="Query id whose profile to use, when --history is a questions file."),
    strategy: str = typer.Option("prisp", help="prisp | oppu | full-lora | no-bridge | bridge-only | pissa | lora-ga."),
    k: int = typer.Option(10, help="Most recent history items used."),
    schedule: str = typer.Option("paper", help=SCHEDULE_HELP),
    epochs: Optional[int] = typer.Option(None, help="Epochs over the user's examples [default: the schedule's]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: the schedule's for the task]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: the schedule's for the task]."),
    micro_batch_size: int = typer.Option(4, help="Gradient-accumulation chunk (bounds memory; same update)."),
    micro_batch_tokens: int = typer.Option(640, help="Cap on a chunk's padded tokens (bounds memory; same update)."),
    seed: int = typer.Option(0, help="Seed."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Stage 2: personalize an anchor for one user; writes a plain peft LoRA + personalization.json."""
    from prisp.adapters import load_adapter
    from prisp.data.tasks import get_task
    from prisp.personalize import PersonalizeConfig, personalize
    from prisp.personalize.cache import save_personalized

    spec = get_task(task)
    config = PersonalizeConfig(strategy=strategy, k=k, schedule=schedule, epochs=epochs, lr=lr,
                               batch_size=batch_size, micro_batch_size=micro_batch_size,
                               micro_batch_tokens=micro_batch_tokens, seed=seed)
    config.train_config(spec.name)  # an uncovered --schedule tuned is refused before the model loads
    items, labels = _read_history(history, spec.name, user)
    if not items:
        raise PrispError(f"{history}: the user's history is empty; personalization needs at least one item")
    anchor_weights = load_adapter(anchor)
    loaded = load_for_inference(model, None, threads)
    result = personalize(loaded.model, loaded.tokenizer, anchor_weights, spec.name, items, config, labels)
    report = {**result.report(), "anchor": str(anchor), "model": model, "history": str(history), "user": user}
    save_personalized(result.weights, out, model, report)
    peak = report["peak_memory_mb"]
    typer.echo(f"{strategy}: {len(result.items)} items -> {result.examples} examples, "
               f"{result.train.trainable_params:,} trainable params, {result.train.seconds:.1f} s, "
               f"peak {peak:.0f} MB, final loss {result.train.final_loss:.4f} -> {out}")


@app.command("task-adapt")
@friendly
def task_adapt_cmd(
    task: str = typer.Option(..., help="LaMP task."),
    out: Path = typer.Option(..., help="Output adapter directory."),
    data: Optional[Path] = typer.Option(None, help="Data directory [default: $PRISP_DATA or the packaged sample]."),
    split: str = typer.Option("train", help="Split of task-adaptive users."),
    samples: int = typer.Option(50, help="Random task-level samples."),
    epochs: int = typer.Option(3, help="Epochs (Table 7: 3)."),
    lr: float = typer.Option(1e-4, help="Learning rate (Table 7: 1e-4)."),
    batch_size: int = typer.Option(6, help="Batch size (Table 7: 6)."),
    seed: int = typer.Option(0, help="Seed for sampling and init."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train a task-adapted anchor LoRA on N random task samples (the paper's baselines' task stage)."""
    from prisp.adapters import save_adapter
    from prisp.data.lamp import load_task_split
    from prisp.data.tasks import get_task, label_set
    from prisp.personalize import task_adapt
    from prisp.training import TrainConfig

    spec = get_task(task)
    split_data = load_task_split(data or default_data_dir(), spec.name, split)
    loaded = load_for_inference(model, None, threads)
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, micro_batch_size=3)
    result = task_adapt(loaded.model, loaded.tokenizer, spec.name, split_data.queries, samples, seed,
                        config=config, labels=label_set(spec.name, split_data.inputs))
    report = {"task": spec.name, "samples": len(result.query_ids), "query_ids": result.query_ids,
              "train": result.train.to_dict(), "model": model}
    save_adapter(result.weights, out, model, {"task_adaptation.json": json.dumps(report, indent=1)})
    typer.echo(f"task-adapted anchor on {len(result.query_ids)} samples, {result.train.steps} steps, "
               f"{result.train.seconds:.1f} s, final loss {result.train.final_loss:.4f} -> {out}")


@app.command("lora-init")
@friendly
def lora_init_cmd(
    out: Path = typer.Option(..., help="Output adapter directory."),
    seed: int = typer.Option(0, help="Seed."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model (shapes are read from it)."),
) -> None:
    """Write a random-init peft LoRA (r 8, q_proj/v_proj; B = 0) to use as an anchor."""
    from prisp.adapters import LoraSpec, random_init, save_adapter

    loaded = load_for_inference(model, None, None)
    save_adapter(random_init(loaded.model, LoraSpec(), seed=seed), out, model)
    typer.echo(f"random LoRA (seed {seed}) -> {out}")


@app.command()
@friendly
def generate(
    input: str = typer.Option(..., "--input", help="The text to answer (or a LaMP input with --task)."),
    adapter: Optional[Path] = typer.Option(None, help="A peft LoRA directory to apply."),
    task: Optional[str] = typer.Option(None, help="Wrap --input in the task's Table 16 prompt."),
    max_new_tokens: int = typer.Option(64, help="Answer budget."),
    decode: str = typer.Option("auto", help=DECODE_HELP + " Needs --task for labels."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Generate one answer, optionally with an adapter."""
    from prisp.data.prompts import query_prompt
    from prisp.data.tasks import label_set
    from prisp.generation import GenerationConfig
    from prisp.generation import generate as run_generate
    from prisp.predict import DECODE_MODES, decode_mode
    from prisp.scoring import score_labels

    if not input.strip():
        raise PrispError("--input is empty")
    if decode not in DECODE_MODES:
        raise PrispError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "labels" and not task:
        raise PrispError("--decode labels needs --task (the label set is the task's)")
    mode = decode_mode(task, decode) if task else "free"
    labels = label_set(task, [input]) if task else ()
    prompt = query_prompt(task, input, labels) if task else input
    loaded = load_for_inference(model, adapter, threads)
    if mode == "labels":
        typer.echo(score_labels(loaded.model, loaded.tokenizer, [prompt], labels).choices[0])
        return
    result = run_generate(loaded.model, loaded.tokenizer, [prompt], GenerationConfig(max_new_tokens=max_new_tokens,
                                                                                       first_line=False))
    typer.echo(result.texts[0])


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
    model: str = typer.Option(DEFAULT_MODEL, help="Base model."),
    data: Path = typer.Option(SAMPLE_DIR, help="Data directory [default: the packaged sample]."),
    split: str = typer.Option("dev", help="Split."),
    tasks: str = typer.Option("LaMP-1,LaMP-2,LaMP-2N,LaMP-3,LaMP-4,LaMP-5,LaMP-7", help="Comma-separated tasks."),
    personalize: str = typer.Option("LaMP-4", help="Task to run the full PRISP pipeline on ('' to skip)."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """The main job on the embedded defaults: NP vs RAG vs PRISP predictions and metrics on the packaged sample."""
    from prisp.demo import run_demo

    quiet_transformers()
    set_threads(threads)
    run_demo(model, data, split, [t.strip() for t in tasks.split(",") if t.strip()], personalize or None)


app.command("bench")(friendly(bench_command))
app.command("anchor")(friendly(anchor_command))
app.command("personalize-batch")(personalize_batch_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

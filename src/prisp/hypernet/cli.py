"""CLI for the hypernetwork: ``prisp hypernet train`` (sub-app) and ``prisp anchor`` (a plain function).

Wire into ``prisp.cli``::

    from prisp.hypernet.cli import anchor_command, hypernet_app
    app.add_typer(hypernet_app, name="hypernet")
    app.command("anchor")(friendly(anchor_command))

Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import enum
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from prisp.console import THREADS_HELP, friendly, quiet_transformers, set_threads
from prisp.data.locations import default_sni_file
from prisp.models import DEFAULT_MODEL

hypernet_app = typer.Typer(help="The Text-to-LoRA hypernetwork: train one on SNI tasks.", no_args_is_help=True,
                           pretty_exceptions_enable=False, add_completion=False)


@hypernet_app.callback()
def _hypernet_group() -> None:
    """The Text-to-LoRA hypernetwork: train one on SNI tasks."""


class Encoder(str, enum.Enum):
    minilm = "minilm"
    base = "base"


class Mode(str, enum.Enum):
    sft = "sft"
    recon = "recon"


def _command_line() -> str:
    argv0 = Path(sys.argv[0]).name
    if argv0 == "prisp":
        return shlex.join(["prisp", *sys.argv[1:]])
    if sys.argv[0].endswith(os.path.join("hypernet", "cli.py")):
        return shlex.join(["python", "-m", "prisp.hypernet.cli", *sys.argv[1:]])
    return shlex.join(sys.argv)


@hypernet_app.command("train")
@friendly
def train_command(
    out: Path = typer.Option(..., help="Run directory: checkpoint/ (hypernet.safetensors + .json), log.jsonl."),
    data: Optional[Path] = typer.Option(None, help="SNI tasks.jsonl (default: $PRISP_SNI or "
                                                   "../shared/data/sni/tasks.jsonl)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Base model: registered name, local directory or HF id."),
    encoder: Encoder = typer.Option(Encoder.minilm, help="Description encoder."),
    mode: Mode = typer.Option(Mode.sft, help="sft: generated LoRA in the base model's graph; recon: L1 to "
                                             "per-task LoRAs."),
    epochs: int = typer.Option(3, min=1),
    steps_limit: Optional[int] = typer.Option(None, min=1, help="Stop after this many steps in all (the LR schedule spans them)."),
    batch_size: int = typer.Option(8, min=1),
    lr: float = typer.Option(1e-4, min=0.0),
    weight_decay: float = typer.Option(0.01, min=0.0, help="AdamW weight decay."),
    dropout: Optional[float] = typer.Option(None, min=0.0, max=0.95, help="Dropout inside the hypernetwork's trunk "
                                            "(new networks only; default 0.05, --init-from keeps the checkpoint's)."),
    max_length: int = typer.Option(256, min=8, help="Tokens per example (the prompt's left part is cut)."),
    save_every: Optional[int] = typer.Option(None, min=1, help="Checkpoint every N steps (default: each epoch end)."),
    eval_every: Optional[int] = typer.Option(None, min=1, help="Held-out loss every N steps; the weights with the "
                                                               "lowest one are kept in OUT/best (default: off)."),
    eval_instances: int = typer.Option(2, min=0, help="Held-out instances per task for ROUGE-L (0: skip)."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue exactly from OUT/checkpoint (its optimiser state and LR schedule)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this checkpoint's weights (e.g. the shipped one: "
                                                        "'shipped') with a fresh optimiser and schedule."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train the hypernetwork (resumable; logs loss per step, held-out metrics per epoch)."""
    import logging

    from prisp.errors import PrispError
    from prisp.hypernet.checkpoint import shipped_checkpoint
    from prisp.hypernet.data import load_sni
    from prisp.hypernet.encoders import make_encoder
    from prisp.hypernet.recipe import HyperTrainConfig, train_hypernet
    from prisp.models import load_model

    if init_from is not None and resume:
        raise PrispError("--init-from starts a new run; --resume continues one: give one of them")
    if dropout is not None and (init_from is not None or resume):
        raise PrispError("--dropout shapes a new hypernetwork; --init-from and --resume keep the checkpoint's own")
    if init_from is not None and str(init_from) == "shipped":
        init_from = shipped_checkpoint(model)
        if init_from is None:
            raise PrispError(f"no hypernet checkpoint ships for {model}; give --init-from DIR")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    quiet_transformers()
    set_threads(threads)
    config = HyperTrainConfig(mode=mode.value, epochs=epochs, batch_size=batch_size, lr=lr, max_length=max_length,
                              weight_decay=weight_decay, hypernet={} if dropout is None else {"dropout": dropout},
                              seed=seed, steps_limit=steps_limit, save_every=save_every, eval_every=eval_every,
                              eval_instances=eval_instances)
    sni = load_sni(data or default_sni_file())
    typer.echo(f"loading model {model} ...", err=True)
    loaded = load_model(model)
    description_encoder = make_encoder(encoder.value, loaded.model, loaded.tokenizer)
    result = train_hypernet(loaded.model, loaded.tokenizer, sni, description_encoder, out, config, model_name=model,
                            command=_command_line(), resume=resume, init_from=init_from)
    final = result.state.history[-1] if result.state.history else {}
    typer.echo(f"hypernet at {result.out_dir / 'checkpoint'}: {result.state.step} steps, held-out loss "
               f"{final.get('heldout_loss', float('nan')):.4f} (no adapter "
               f"{result.state.base_metrics.get('heldout_loss', float('nan')):.4f})")
    if result.state.best:
        best = result.state.best
        typer.echo(f"lowest held-out loss {best['heldout_loss']:.4f} at step {best['step']}: "
                   f"{result.out_dir / 'best'}")


def anchor_command(
    description: Optional[str] = typer.Option(None, help="The task, in a sentence or two [default: --task's own "
                                                         "description]."),
    task: Optional[str] = typer.Option(None, help="A task name or spec file (.toml/.json) whose description to use."),
    out: Path = typer.Option(..., help="Adapter directory to write (standard peft LoRA)."),
    hypernet: Optional[Path] = typer.Option(None, help="Hypernet checkpoint (default: the one shipped for --model)."),
    t2l: Optional[Path] = typer.Option(None, help="Instead of a prisp hypernet: a published Text-to-LoRA checkpoint "
                                                  "directory (hypermod.pt + args.yaml [+ adapter_config.json])."),
    encoder_dir: Optional[Path] = typer.Option(None, help="With --t2l: local copy of the checkpoint's description "
                                                          "encoder (e.g. gte-large-en-v1.5)."),
    trust_remote_code: bool = typer.Option(False, help="With --t2l: let the encoder directory run its own "
                                                       "modelling code (gte-large-en-v1.5 needs it)."),
    module_order: Optional[str] = typer.Option(None, help="With --t2l: T2L's module-type numbering, e.g. "
                                                          "'v_proj,q_proj' (default: args.yaml's target_modules)."),
    model: Optional[str] = typer.Option(None, help="Base model the adapter is for (default: smollm2-135m, or the "
                                                   "T2L checkpoint's model_dir)."),
    threads: Optional[str] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Generate a task anchor LoRA from a description in one hypernetwork forward pass."""
    from prisp.data.tasks import get_task
    from prisp.errors import DataError, PrispError

    if description is None:
        if task is None:
            raise PrispError("give --description TEXT or --task NAME_OR_SPEC_FILE")
        description = get_task(task).description
    if not description.strip():
        raise DataError("--description is empty; describe the task in a sentence or two")
    if t2l is None and (encoder_dir is not None or trust_remote_code or module_order is not None):
        raise PrispError("--encoder-dir, --trust-remote-code and --module-order only apply with --t2l")
    if t2l is not None and hypernet is not None:
        raise PrispError("pass either --hypernet or --t2l, not both")
    quiet_transformers()
    set_threads(threads)
    start = time.perf_counter()
    if t2l is not None:
        from prisp.hypernet.t2l_import import T2LAnchorer

        order = [m.strip() for m in module_order.split(",") if m.strip()] if module_order else None
        anchorer = T2LAnchorer.load(t2l, model, encoder_dir, trust_remote_code, order)
        for note in anchorer.notes:
            typer.echo(f"prisp: note: {note}", err=True)
    else:
        from prisp.hypernet.anchor import Anchorer

        anchorer = Anchorer.load(hypernet, model or DEFAULT_MODEL)
    load_s = time.perf_counter() - start
    first = anchorer.generate(description)
    result = anchorer.write(description, out)
    typer.echo(f"wrote anchor {result.out_dir} ({result.weights.num_parameters():,} LoRA parameters); generated in "
               f"{result.total_ms:.1f} ms (encode {result.encode_ms:.1f} + hypernet {result.hypernet_ms:.1f}; "
               f"first call {first.total_ms:.1f} ms; loading {load_s:.1f} s)")


if __name__ == "__main__":
    hypernet_app()

"""Training the hypernetwork on multi-task SNI data, through the project's one loop (``prisp.training.train``).

Two modes (a small strategy table, :data:`MODES`):

* ``sft`` (Text-to-LoRA's choice): the generated LoRA is applied to the frozen base model in-graph
  (:class:`~prisp.hypernet.injection.BatchedLora`, one LoRA per batch row), loss on answer tokens only,
  gradients only into the hypernetwork.
* ``recon``: L1 between the generated factors and per-task target LoRAs, themselves trained with
  ``prisp.training.train`` on a few tasks (cheap: no base-model pass per hypernet step).

Each epoch is one call of ``train``; together they follow one schedule over the whole run (linear warm-up
over ``warmup_ratio`` of the run's steps, then linear decay towards zero at its last step) with one AdamW
whose moments carry from epoch to epoch. Every ``save_every`` steps (from the loop's ``on_step``) the
checkpoint takes the hypernetwork, the run state (epoch, step, which examples of the epoch are done) and
the loop's :class:`~prisp.training.TrainState` (AdamW moments and step counts, dropout RNG, position in the
epoch's seeded batch order). With ``eval_every`` the held-out answer loss is also measured every that many
steps (and at the run's start and each epoch's end), and the weights with the lowest one so far are kept in
``best/``: more epochs keep lowering the training loss while the loss on unseen tasks turns up again, so the
last checkpoint is not the one to ship. ``--resume`` continues from it exactly: an interrupted run resumed from a
checkpoint takes the same steps, with the same losses and final weights, as one never interrupted, as long
as the options are unchanged. A checkpoint written before this state was saved still resumes (the epoch's
remaining examples in a new call, the schedule at its step), with a warning that AdamW's moments restart.
Loss is logged per step (``log.jsonl``), held-out metrics after every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from prisp.adapters import LoraSpec, shapes_for_model
from prisp.errors import DataError
from prisp.files import JsonlLog
from prisp.hypernet import recon as recon_mode
from prisp.hypernet.checkpoint import HyperNetCheckpoint, load_checkpoint, save_checkpoint
from prisp.hypernet.data import DescriptionTable, SniData, described_examples, description_table
from prisp.hypernet.encoders import DescriptionEncoder
from prisp.hypernet.evaluation import HyperLoraModel, RougeProbe, add_header, answer_loss, rouge_l, sft_loss
from prisp.hypernet.model import HyperNet, HyperNetConfig
from prisp.training import Example, TokenizedExample, TrainConfig, TrainState, tokenize_examples, train

logger = logging.getLogger(__name__)
MODE_NAMES = ("sft", "recon")


@dataclass
class HyperTrainConfig:
    """Options of a hypernetwork training run.

    Attributes:
        mode: ``sft`` or ``recon``.
        epochs: Passes over the training examples.
        batch_size: Examples per step (tasks mix within a batch).
        lr: Peak learning rate, reached at the end of the warm-up.
        warmup_ratio: Fraction of the run's steps spent warming up linearly from the start; the learning rate
            then decays linearly towards zero at the run's last step. One schedule over the whole run: it
            spans the per-epoch ``train`` calls and continues unchanged across a resume.
        weight_decay, max_grad_norm: As in ``TrainConfig``.
        max_length: Tokens per example (prompts lose their left part beyond it).
        seed: Seeds description draws, shuffling and dropout.
        steps_limit: Stop after this many steps in all; the schedule then spans this many steps (None: no
            limit). The steps are the first ones of the unlimited run's batch order.
        save_every: Checkpoint every this many steps (None: at the end of each epoch only).
        eval_every: Held-out answer loss every this many steps, the best weights kept in ``best/`` (None: held-out
            metrics at the end of each epoch only, no ``best/``).
        eval_instances: Held-out instances per task for ROUGE-L (0 skips generation).
        eval_max_new_tokens: Answer budget of the ROUGE-L probe.
        hypernet: Overrides of :class:`HyperNetConfig` options (e.g. ``{"head_in_dim": 64}``).
        recon_tasks: Training tasks that get a target LoRA in ``recon`` mode.
        recon_epochs, recon_lr: Training of those target LoRAs.
        micro_batch_size: SFT examples per forward pass; 1 (default) avoids padding entirely, which on a CPU
            is faster than batched passes over right-padded SNI examples of very different lengths.
    """

    mode: str = "sft"
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0
    steps_limit: int | None = None
    save_every: int | None = None
    eval_every: int | None = None
    eval_instances: int = 2
    eval_max_new_tokens: int = 32
    hypernet: dict = field(default_factory=dict)
    recon_tasks: int = 8
    recon_epochs: int = 4
    recon_lr: float = 1e-3
    micro_batch_size: int | None = 1

    def __post_init__(self) -> None:
        checks = {
            "mode": self.mode in MODE_NAMES,
            "epochs": isinstance(self.epochs, int) and self.epochs >= 1,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "lr": self.lr > 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_length": isinstance(self.max_length, int) and self.max_length >= 8,
            "steps_limit": self.steps_limit is None or self.steps_limit >= 1,
            "save_every": self.save_every is None or self.save_every >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "eval_instances": self.eval_instances >= 0,
            "recon_tasks": self.recon_tasks >= 1,
        }
        for option, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid hypernet training option {option}={getattr(self, option)!r}")


@dataclass
class RunState:
    """Where a run stands; saved in the checkpoint JSON under ``state``."""

    epoch: int = 0  # epochs fully done
    step: int = 0  # optimiser steps done in all
    consumed: list[int] = field(default_factory=list)  # positions of the current epoch's examples done, in order
    call_start: int = 0  # of those, done before the epoch's current train() call (a resumed old checkpoint)
    done: bool = False
    seconds: float = 0.0  # training wall time in all (train() calls only)
    history: list[dict] = field(default_factory=list)  # per-epoch metrics
    base_metrics: dict = field(default_factory=dict)  # held-out metrics without adapter (computed once)
    best: dict = field(default_factory=dict)  # with eval_every: step, epoch and held-out loss of best/


@dataclass
class RunResult:
    checkpoint: HyperNetCheckpoint
    state: RunState
    out_dir: Path


@dataclass(frozen=True)
class RunSpec:
    """What ``train_hypernet`` was asked to do (the inputs ``_prepare`` builds a run from)."""

    base: nn.Module
    tokenizer: object
    data: SniData
    encoder: DescriptionEncoder
    out_dir: Path
    config: HyperTrainConfig
    model_name: str
    command: str = ""
    resume: bool = False
    init_from: Path | None = None


@dataclass
class _Run:
    """Everything a run needs, built once (``loop``: the training loop's state, updated every step;
    ``measured``: step and held-out loss of the latest ``eval_every`` measurement, reused at an epoch's end)."""

    wrapper: HyperLoraModel
    tokenizer: object
    data: SniData
    table: DescriptionTable
    eval_rows: dict[str, int]
    heldout_examples: list[TokenizedExample]
    probe: RougeProbe
    config: HyperTrainConfig
    checkpoint: HyperNetCheckpoint
    out_dir: Path
    log_file: Path
    loop: TrainState | None = None
    measured: tuple[int, float] | None = None


def train_hypernet(base: nn.Module, tokenizer, data: SniData, encoder: DescriptionEncoder, out_dir: str | Path,
                   config: HyperTrainConfig, *, model_name: str, command: str = "",
                   resume: bool = False, init_from: str | Path | None = None) -> RunResult:
    """Train (or resume training) a hypernetwork; checkpoints go to ``out_dir/checkpoint``.

    The run is one learning-rate schedule and one AdamW over all its steps; resuming from a checkpoint
    continues both exactly (see the module docstring).

    Args:
        base: The base causal LM; frozen here (``requires_grad_(False)``) and never modified.
        tokenizer: Its tokenizer.
        data: SNI tasks (train split trains, heldout split evaluates).
        encoder: Description encoder (its name is recorded).
        out_dir: Run directory: ``checkpoint/``, ``log.jsonl`` (one line per step and per epoch), ``targets/``.
        config: Run options.
        model_name: Base model name recorded in the checkpoint (e.g. ``smollm2-135m``).
        command: The exact command line, recorded.
        resume: Continue from ``out_dir/checkpoint`` (refused if options or data differ).
        init_from: Start a new run from this checkpoint's hypernetwork weights (e.g. the shipped one) instead
            of a random initialisation: training further with a fresh AdamW and its own schedule.

    Raises:
        DataError: No training tasks, a resume whose data/options differ from the saved run, or an
            ``init_from`` checkpoint for another base model or encoder.
    """
    spec = RunSpec(base, tokenizer, data, encoder, Path(out_dir), config, model_name, command, resume,
                   Path(init_from) if init_from is not None else None)
    run, state = _prepare(spec)
    mode = MODES[config.mode](run)
    if state.done:
        logger.info("run in %s is already complete (step %d)", run.out_dir, state.step)
        return RunResult(run.checkpoint, state, run.out_dir)
    if not state.base_metrics:
        state.base_metrics = _evaluate(run, with_adapter=False)
        logger.info("held-out without adapter: %s", _fmt(state.base_metrics))
    if config.eval_every and not state.best:
        # The starting point competes too: a continued run that only gets worse leaves its start in best/.
        _periodic_eval(run, state)
        _save(run, state)
    total_steps = mode.total_steps()
    while not state.done:
        examples = mode.examples(state.epoch)  # header = position in this list
        _run_epoch(run, mode, state, examples, total_steps)
        if len(state.consumed) >= len(examples):
            state.epoch, state.consumed, state.call_start = state.epoch + 1, [], 0
            # The next epoch is a fresh pass (its own shuffle and dropout seed) with the same AdamW moments.
            run.loop = TrainState(optimizer=run.loop.optimizer) if run.loop is not None else None
        limited = config.steps_limit is not None and state.step >= config.steps_limit
        state.done = limited or state.epoch >= config.epochs
        _end_of_epoch(run, state)
    return RunResult(run.checkpoint, state, run.out_dir)


def _prepare(spec: RunSpec) -> tuple[_Run, RunState]:
    """Build the run of ``spec``: a new hypernetwork, or the checkpoint in ``spec.out_dir`` when resuming."""
    spec.base.requires_grad_(False)
    data, config, out_dir = spec.data, spec.config, spec.out_dir
    train_tasks, heldout = data.split("train"), data.split("heldout")
    if not train_tasks:
        raise DataError(f"{data.path or 'SNI data'} has no tasks with split 'train'")
    table = description_table(train_tasks)
    eval_rows = {task.name: table.add(task.name, task.eval_description) for task in heldout}
    embeddings = _embeddings(spec.encoder, table.texts, out_dir / "embeddings.safetensors")  # [R, d]
    ckpt_dir = out_dir / "checkpoint"
    if spec.resume and (ckpt_dir / "hypernet.json").is_file():
        checkpoint, state, loop = _resumed(spec, ckpt_dir)
    else:
        if (ckpt_dir / "hypernet.json").is_file():
            raise DataError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        (out_dir / "log.jsonl").unlink(missing_ok=True)
        torch.manual_seed(config.seed)
        shapes = shapes_for_model(spec.base, LoraSpec().target_modules)
        if spec.init_from is not None:
            checkpoint = _warm_start(spec, shapes)
        else:
            hypernet_config = HyperNetConfig.for_shapes(spec.encoder.dim, shapes, **config.hypernet)
            checkpoint = HyperNetCheckpoint(HyperNet(hypernet_config), base_model=spec.model_name,
                                            encoder=spec.encoder.name)
        state, loop = RunState(), None
    checkpoint.meta.update(training_command=spec.command, data_sha256=data.sha256,
                           train_config=asdict(config), data_tasks={"train": len(train_tasks), "heldout": len(heldout)})
    wrapper = HyperLoraModel(spec.base, checkpoint.hypernet, embeddings)
    heldout_examples = _heldout_examples(spec.tokenizer, heldout, eval_rows, config.max_length)
    probe = RougeProbe(rows=[eval_rows[t.name] for t in heldout],
                       prompts=[[i.input for i in t.instances[:config.eval_instances]] for t in heldout],
                       golds=[[i.output for i in t.instances[:config.eval_instances]] for t in heldout])
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(wrapper, spec.tokenizer, data, table, eval_rows, heldout_examples, probe, config, checkpoint, out_dir,
               out_dir / "log.jsonl", loop)
    return run, state


def _warm_start(spec: RunSpec, shapes: dict) -> HyperNetCheckpoint:
    """A new run's checkpoint holding ``spec.init_from``'s hypernetwork (refused for another model/encoder)."""
    source = load_checkpoint(spec.init_from, shapes)
    if source.base_model != spec.model_name:
        raise DataError(f"--init-from {spec.init_from} was trained for base model {source.base_model!r}, "
                        f"not {spec.model_name!r}")
    if source.encoder != spec.encoder.name:
        raise DataError(f"--init-from {spec.init_from} uses encoder {source.encoder!r}, not {spec.encoder.name!r}")
    conflicts = [k for k, v in spec.config.hypernet.items() if getattr(source.config, k, v) != v]
    if conflicts:
        raise DataError(f"--init-from keeps the checkpoint's architecture: its {conflicts[0]} is "
                        f"{getattr(source.config, conflicts[0])!r}, not {spec.config.hypernet[conflicts[0]]!r}")
    source.hypernet.train()
    weights = hashlib.sha256()
    for name, tensor in sorted(source.hypernet.state_dict().items()):
        weights.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    checkpoint = HyperNetCheckpoint(source.hypernet, base_model=spec.model_name, encoder=spec.encoder.name)
    # Recorded so the shipped checkpoint says which weights its run continued and how they were trained.
    checkpoint.meta["initialised_from"] = {"path": str(spec.init_from), "weights_sha256": weights.hexdigest(),
                                           "training_command": source.meta.get("training_command"),
                                           "training": source.meta.get("training")}
    logger.info("new run initialised from %s (weights sha256 %s)", spec.init_from, weights.hexdigest()[:12])
    return checkpoint


def _resumed(spec: RunSpec, ckpt_dir: Path) -> tuple[HyperNetCheckpoint, RunState, TrainState | None]:
    """The checkpoint, run state and loop state to continue from (refused when data or options differ)."""
    checkpoint = load_checkpoint(ckpt_dir, with_train_state=True)
    _check_resumable(checkpoint, spec.data, spec.encoder, spec.config)
    state = RunState(**checkpoint.meta["state"])
    limit_left = spec.config.steps_limit is None or state.step < spec.config.steps_limit
    state.done = state.done and not (state.epoch < spec.config.epochs and limit_left)
    loop = checkpoint.train_state
    if loop is None or loop.optimizer is None:
        # Written before the loop state was saved: its partial epoch cannot be replayed, so the rest of the
        # epoch's examples go to a new train() call, with fresh moments; the schedule continues at state.step.
        logger.warning("checkpoint %s has no optimiser state (an older format): AdamW's moments restart; "
                       "the learning-rate schedule continues at step %d", ckpt_dir, state.step)
        loop, state.call_start = None, len(state.consumed)
    _truncate_log(spec.out_dir / "log.jsonl", state.step)
    logger.info("resuming %s at epoch %d step %d (%d examples of the epoch done)", ckpt_dir, state.epoch,
                state.step, len(state.consumed))
    return checkpoint, state, loop


def _embeddings(encoder: DescriptionEncoder, texts: list[str], cache: Path) -> torch.Tensor:
    """Encode ``texts``, reusing ``cache`` when it holds exactly these texts from this encoder."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([encoder.name, encoder.dim, texts]).encode("utf-8")).hexdigest()
    if cache.is_file():
        stored = load_file(str(cache))
        if "key" in stored and bytes(stored["key"].tolist()).decode("ascii") == key:
            logger.info("description embeddings from %s", cache)
            return stored["embeddings"]
    logger.info("encoding %d descriptions with %s", len(texts), encoder.name)
    embeddings = encoder.encode(texts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings.contiguous(), "key": torch.tensor(list(key.encode("ascii")), dtype=torch.uint8)},
              str(cache))
    return embeddings


def _check_resumable(checkpoint: HyperNetCheckpoint, data: SniData, encoder, config: HyperTrainConfig) -> None:
    meta = checkpoint.meta
    if "state" not in meta:
        raise DataError("cannot resume: the checkpoint has no run state (it is a finished, exported hypernet)")
    if meta.get("data_sha256") != data.sha256:
        raise DataError(f"cannot resume: the data's sha256 {data.sha256[:12]} differs from the run's "
                        f"{str(meta.get('data_sha256'))[:12]}")
    if checkpoint.encoder != encoder.name:
        raise DataError(f"cannot resume: the run used encoder {checkpoint.encoder!r}, not {encoder.name!r}")
    saved = meta.get("train_config", {})
    for option in ("mode", "batch_size", "seed", "max_length"):
        if saved.get(option) != getattr(config, option):
            raise DataError(f"cannot resume: option {option} was {saved.get(option)!r}, now {getattr(config, option)!r}")
    changed = [o for o in ("epochs", "steps_limit", "lr", "warmup_ratio", "weight_decay", "max_grad_norm")
               if o in saved and saved[o] != getattr(config, o)]
    if changed:
        logger.warning("resuming with changed %s: the run continues, but no longer as the uninterrupted run would "
                       "(the learning-rate schedule or the updates differ from here on)", ", ".join(changed))


def _heldout_examples(tokenizer, heldout, eval_rows, max_length) -> list[TokenizedExample]:
    examples = [Example(prompt=i.input, answer=i.output) for t in heldout for i in t.instances]
    rows = [eval_rows[t.name] for t in heldout for _ in t.instances]
    tokenized = tokenize_examples(tokenizer, examples, max_length - 1)
    return [add_header(e, row, max_length) for e, row in zip(tokenized, rows)]


def _run_epoch(run: _Run, mode, state: RunState, examples: list[TokenizedExample], total_steps: int) -> None:
    """The epoch's ``train`` call (continuing ``run.loop`` exactly), checkpointing every ``save_every`` steps.

    The call covers the epoch's examples not done before it began (all of them, unless an old checkpoint
    left a partial epoch), shuffled by a seed of the epoch; its steps sit at ``state.step - run.loop.step``
    onwards in the run's one schedule.
    """
    config = run.config
    before = set(state.consumed[:state.call_start])
    positions = [p for p in range(len(examples)) if p not in before]
    done_in_call = run.loop.step if run.loop is not None else 0
    if len(state.consumed) - state.call_start != min(done_in_call * config.batch_size, len(positions)):
        raise DataError(f"cannot resume: the checkpoint's loop state (step {done_in_call} of the epoch's call) "
                        f"disagrees with its {len(state.consumed)} examples done")
    schedule_start = state.step - done_in_call  # run steps before this call
    max_steps = None if config.steps_limit is None else config.steps_limit - schedule_start
    if done_in_call >= min(math.ceil(len(positions) / config.batch_size), max_steps or math.inf):
        return  # interrupted after the call's last step: nothing left to train in it
    start_step, seconds_before = state.step, state.seconds
    started = time.perf_counter()
    seen: list[int] = []  # example positions the loss hook reported since the last step

    def on_step(loop: TrainState, value: float) -> None:
        run.loop = loop
        state.step = schedule_start + loop.step
        state.consumed += seen
        seen.clear()
        elapsed = time.perf_counter() - started
        state.seconds = seconds_before + elapsed
        _log(run, {"step": state.step, "epoch": state.epoch, "loss": round(value, 5), "seconds": round(elapsed, 2)})
        logger.info("step %d/%d epoch %d loss %.4f (%.2f s/step)", state.step, total_steps, state.epoch, value,
                    elapsed / (state.step - start_step))
        if config.eval_every and state.step % config.eval_every == 0:
            _periodic_eval(run, state)  # before the save below, so the checkpoint's state knows best/
        if config.save_every and state.step % config.save_every == 0:
            _save(run, state)  # after the optimiser step: weights and loop state agree

    run.wrapper.on_loss = lambda loss, headers, tokens: seen.extend(headers)
    run.wrapper.row_lookup = mode.rows(state.epoch)
    train_config = TrainConfig(epochs=1, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                               warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
                               seed=config.seed + 7919 * state.epoch + state.call_start,
                               max_length=config.max_length, progress=False, micro_batch_size=mode.micro_batch_size,
                               schedule_steps=total_steps, schedule_start=schedule_start, max_steps=max_steps)
    try:
        train(run.wrapper, list(run.wrapper.hypernet.parameters()), [examples[p] for p in positions], train_config,
              loss_fn=mode.loss_fn, pad_id=run.tokenizer.pad_token_id or 0, state=run.loop, on_step=on_step)
    finally:
        run.wrapper.on_loss = None
        run.wrapper.row_lookup = None
        state.seconds = seconds_before + time.perf_counter() - started
    _save(run, state)


def _heldout_loss(run: _Run, with_adapter: bool) -> float:
    return answer_loss(run.wrapper, run.heldout_examples, with_adapter, pad_id=run.tokenizer.pad_token_id or 0)


def _evaluate(run: _Run, with_adapter: bool, step: int | None = None) -> dict:
    """Held-out metrics; the loss is not recomputed when ``eval_every`` just measured these weights (``step``)."""
    started = time.perf_counter()
    if with_adapter and run.measured is not None and run.measured[0] == step:
        metrics = {"heldout_loss": run.measured[1]}
    else:
        metrics = {"heldout_loss": _heldout_loss(run, with_adapter)}
    if run.config.eval_instances:
        metrics["heldout_rouge_l"] = rouge_l(run.wrapper, run.tokenizer, run.probe, with_adapter,
                                             run.config.eval_max_new_tokens, run.config.max_length)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def _end_of_epoch(run: _Run, state: RunState) -> None:
    metrics = _evaluate(run, with_adapter=True, step=state.step)
    losses = _epoch_losses(run.log_file, state.epoch - (0 if state.consumed else 1))
    entry = {"epoch": state.epoch, "step": state.step, **metrics, **losses}
    state.history.append(entry)
    _log(run, {"eval": entry, "base": state.base_metrics})
    if run.config.eval_every:
        _keep_if_best(run, state, metrics["heldout_loss"])
    logger.info("epoch %d step %d: adapter %s | base %s", state.epoch, state.step, _fmt(metrics),
                _fmt(state.base_metrics))
    _save(run, state)


def _periodic_eval(run: _Run, state: RunState) -> None:
    """Held-out answer loss of the current weights (no generation: cheap enough to run every few steps)."""
    started = time.perf_counter()
    # Mid-epoch the wrapper maps headers to the epoch's drawn rows; held-out headers are rows already.
    lookup, hook = run.wrapper.row_lookup, run.wrapper.on_loss
    run.wrapper.row_lookup, run.wrapper.on_loss = None, None
    try:
        loss = _heldout_loss(run, with_adapter=True)
    finally:
        run.wrapper.row_lookup, run.wrapper.on_loss = lookup, hook
    run.measured = (state.step, loss)
    _log(run, {"step": state.step, "epoch": state.epoch, "heldout_loss": round(loss, 5),
               "eval_seconds": round(time.perf_counter() - started, 1)})
    logger.info("step %d: held-out loss %.4f (best %s)", state.step, loss,
                f"{state.best['heldout_loss']:.4f} at step {state.best['step']}" if state.best else "none yet")
    _keep_if_best(run, state, loss)


def _keep_if_best(run: _Run, state: RunState, loss: float) -> None:
    """Write the current weights to ``best/`` when their held-out loss is the lowest of the run so far."""
    if state.best and loss >= state.best["heldout_loss"]:
        return
    state.best = {"step": state.step, "epoch": state.epoch, "heldout_loss": loss}
    meta = {k: v for k, v in run.checkpoint.meta.items() if k != "state"}  # no run state: it does not resume
    meta["selected"] = {"by": "lowest held-out answer loss", **state.best, "base": state.base_metrics}
    save_checkpoint(HyperNetCheckpoint(run.checkpoint.hypernet, base_model=run.checkpoint.base_model,
                                       encoder=run.checkpoint.encoder, meta=meta), run.out_dir / "best")


def _epoch_losses(log_file: Path, epoch: int) -> dict:
    values = [r["loss"] for r in JsonlLog(log_file) if "loss" in r and r.get("epoch") == epoch]
    if not values:
        return {}
    tail = values[-max(1, len(values) // 10):]
    return {"train_loss_first": values[0], "train_loss_mean": sum(values) / len(values),
            "train_loss_last10pct": sum(tail) / len(tail)}


def _save(run: _Run, state: RunState) -> None:
    run.checkpoint.meta["state"] = asdict(state)
    run.checkpoint.train_state = run.loop
    run.checkpoint.meta["metrics"] = {"base": state.base_metrics,
                                      "final": state.history[-1] if state.history else None}
    save_checkpoint(run.checkpoint, run.out_dir / "checkpoint")


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop step and periodic-evaluation records past ``step`` (written after the last checkpoint) and any
    line a crash tore."""
    log = JsonlLog(log_file)
    if log.path.is_file():
        log.rewrite(r for r in log.records() if r.get("step", 0) <= step)


def _log(run: _Run, record: dict) -> None:
    # Per-step records are not fsynced: a crash loses at most the steps after the last checkpoint,
    # which resume truncates anyway.
    JsonlLog(run.log_file).append(record, sync=False)


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


class SftMode:
    """Examples: instances of training tasks, a description row drawn per example and epoch."""

    def __init__(self, run: _Run):
        self.run = run
        self.tasks = run.data.split("train")
        instances = [Example(prompt=i.input, answer=i.output) for t in self.tasks for i in t.instances]
        self.tokenized = tokenize_examples(run.tokenizer, instances, run.config.max_length - 1)
        self.loss_fn = sft_loss
        self.micro_batch_size = run.config.micro_batch_size

    def total_steps(self) -> int:
        steps = math.ceil(len(self.tokenized) / self.run.config.batch_size) * self.run.config.epochs
        return min(steps, self.run.config.steps_limit or steps)

    def rows(self, epoch: int) -> torch.Tensor:
        """Description row of each example position in ``epoch`` (seeded draw per example and epoch)."""
        described = described_examples(self.tasks, self.run.table, seed=self.run.config.seed * 1000 + epoch)
        return torch.tensor([d.row for d in described])

    def examples(self, epoch: int) -> list[TokenizedExample]:
        """The epoch's examples; each carries its own position as header (see :meth:`rows`)."""
        return [add_header(e, position, self.run.config.max_length) for position, e in enumerate(self.tokenized)]


MODES = {"sft": SftMode, "recon": recon_mode.ReconMode}

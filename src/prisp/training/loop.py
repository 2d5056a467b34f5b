"""The one training loop every method uses (task adaptation, PRISP, OPPU, ablations, hypernet).

Sharing the loop keeps comparisons fair: same batching, optimiser, schedule, clipping and
the same bookkeeping of wall time and peak memory.

A run may span several calls (the hypernetwork trains one call per epoch) and may be interrupted:
``TrainConfig.schedule_steps``/``schedule_start`` place a call inside one longer LR schedule, and
:class:`TrainState` (handed to ``on_step`` after every step, accepted back as ``state=``) carries
AdamW's moments, the position in the seeded batch order and the dropout RNG, so a resumed call
continues exactly where the interrupted one stopped. Without them a call is self-contained, as before.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from prisp.training.batches import IGNORE_INDEX, TokenizedExample, collate, fit_example
from prisp.training.memory import MemoryMonitor

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


@dataclass
class TrainConfig:
    """Options of :func:`train`.

    Attributes:
        epochs: Passes over the examples.
        batch_size: Examples per optimiser step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the schedule's steps spent warming up linearly; then linear decay.
        max_grad_norm: Gradient-norm clip; None disables clipping.
        seed: Seeds the shuffling and dropout (the caller's RNG state is restored after).
        max_length: Longest sequence in tokens; longer examples lose the left of their prompt.
        progress: Show a tqdm progress bar.
        micro_batch_size: Split each batch into chunks of at most this many examples to bound memory;
            gradients are accumulated so the update equals the full batch's. None: no limit.
        micro_batch_tokens: Also cap a chunk's padded size (rows x longest row) at this many tokens, so
            long examples go fewer to a chunk (same update). None: no cap. A single longer example still
            forms its own chunk.
        schedule_steps: Length of the LR schedule (warm-up + decay) in optimiser steps, when
            this call is part of a longer run trained over several calls. None: this call's steps.
        schedule_start: Steps of that schedule done before this call (by earlier calls); the
            call's first step uses the schedule's LR at this position.
        max_steps: Stop this call after this many steps (counting steps a resumed ``state`` had
            done); the schedule still spans all of them. None: go through every batch.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 512
    progress: bool = True
    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    schedule_steps: int | None = None
    schedule_start: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": isinstance(self.epochs, int) and self.epochs >= 1,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "lr": isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
            "weight_decay": isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
            "warmup_ratio": isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "seed": isinstance(self.seed, int),
            "max_length": isinstance(self.max_length, int) and self.max_length >= 2,
            "micro_batch_size": self.micro_batch_size is None
            or (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1),
            "micro_batch_tokens": self.micro_batch_tokens is None
            or (isinstance(self.micro_batch_tokens, int) and self.micro_batch_tokens >= 1),
            "schedule_steps": self.schedule_steps is None
            or (isinstance(self.schedule_steps, int) and self.schedule_steps >= 1),
            "schedule_start": isinstance(self.schedule_start, int) and self.schedule_start >= 0,
            "max_steps": self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
        }
        for option, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid training option {option}={getattr(self, option)!r}")


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer stack and LM head of a causal LM (peft-wrapped or not), or None where the split is
    unknown or unsafe (logit soft-capping, no ``lm_head``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA stays injected
    head = getattr(inner, "lm_head", None)
    get_decoder = getattr(inner, "get_decoder", None)
    if head is None or get_decoder is None or getattr(getattr(inner, "config", None), "final_logit_softcapping",
                                                         None):
        return None
    decoder = get_decoder()
    if decoder is None or decoder is inner:
        return None
    return decoder, head


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Default loss: the shifted causal-LM cross-entropy, mean over answer tokens.

    Equal to ``model(**batch).loss`` (tests check it) but projects only the answer positions onto the
    vocabulary: prompt positions need hidden states, not 49k-way logits. With answers a small fraction of
    the tokens (a headline after an article), that skips most of the LM head, its backward and the
    ``[b, T, V]`` logits tensor, about a fifth of a step. Models whose head cannot be split off use the full path.
    """
    parts = _decoder_and_head(model)
    if parts is None:
        return model(**batch).loss
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # [b, T-1]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])  # [k, V]
    return nn.functional.cross_entropy(logits.float(), targets[keep])


def warmup_then_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear rise over ``warmup_steps``, then linear decay towards zero.

    Neither end is exactly zero, so with the few steps of few-shot training no step is
    wasted at lr 0.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@dataclass
class TrainResult:
    """What a run did and cost.

    Attributes:
        steps: Optimiser steps taken.
        epochs: Passes over the examples.
        examples: Number of examples given.
        truncated: Examples whose prompt was cut to ``max_length``.
        trainable_params: Sum of ``numel`` over the trained parameters.
        losses: Loss per step.
        lrs: Learning rate used at each step.
        seconds: Wall time of the loop.
        device: Device of the trained parameters.
        peak_rss_mb: Highest resident set size sampled during the loop (CPU), or None.
        peak_rss_delta_mb: That peak minus the resident size before the loop, or None.
        process_peak_rss_mb: Lifetime high-water mark of the process (``ru_maxrss``).
        peak_cuda_mb: Peak CUDA memory allocated during the loop, or None on CPU.
        threads: torch intra-op threads the loop ran with (CPU time scales with them).
    """

    steps: int
    epochs: int
    examples: int
    truncated: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    peak_rss_mb: float | None = None
    peak_rss_delta_mb: float | None = None
    process_peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    threads: int = 1

    @property
    def final_loss(self) -> float:
        """Loss of the last step (NaN when no step ran)."""
        return self.losses[-1] if self.losses else math.nan

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass
class TrainState:
    """A point a :func:`train` call can be continued from exactly (``train(..., state=...)``).

    ``on_step`` receives one after every optimiser step. Its tensors are the live ones of the
    running optimiser and RNG snapshots: serialize them inside the callback (the loop mutates
    the moments in place at the next step). ``train`` clones what it is given.

    Attributes:
        step: Optimiser steps of this call done; a resumed call replays the seeded shuffle
            and skips this many batches, and its LR schedule continues at this position.
        optimizer: AdamW state per trained parameter, in the order of ``params``
            (``step``, ``exp_avg``, ``exp_avg_sq`` tensors; empty before the first step).
            None: AdamW starts fresh.
        rng: CPU RNG state after ``step`` (dropout masks); None seeds it from ``config.seed``
            (a fresh pass: give ``TrainState(optimizer=...)`` to carry only the moments into
            the next call of a multi-call run).
        cuda_rng: The same for the CUDA device the parameters live on, or None.
    """

    step: int = 0
    optimizer: list[dict[str, Tensor]] | None = None
    rng: Tensor | None = None
    cuda_rng: Tensor | None = None


StepCallback = Callable[[TrainState, float], None]  # (state after the step, the step's loss)


def _check_params(params: Sequence[nn.Parameter]) -> None:
    if not params:
        raise ValueError("train() needs at least one parameter to train")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("train() was given the same parameter twice")
    if not all(p.requires_grad for p in params):
        raise ValueError("every parameter given to train() must have requires_grad=True")


def _target_count(example: TokenizedExample) -> int:
    """Tokens the shifted causal-LM loss scores for this example."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def micro_batches(batch: Sequence[TokenizedExample], config: TrainConfig) -> list[list[TokenizedExample]]:
    """Split one optimiser batch into chunks of similar length within the config's row and token caps.

    Sorting by length before chunking wastes little on padding; the loss weighting in ``_step`` keeps the
    update exact whatever the grouping (only dropout masks land on other rows).
    """
    rows = config.micro_batch_size or len(batch)
    budget = config.micro_batch_tokens
    chunks: list[list[TokenizedExample]] = []
    for example in sorted(batch, key=lambda e: len(e.input_ids)):
        chunk = chunks[-1] if chunks else None
        # Ascending order: this example is the chunk's longest, so it sets the padded width.
        if chunk is None or len(chunk) >= rows or (budget and (len(chunk) + 1) * len(example.input_ids) > budget):
            chunks.append([example])
        else:
            chunk.append(example)
    return chunks


def accumulate_gradients(model, batch: Sequence[TokenizedExample], config: TrainConfig, loss_fn: LossFn,
                         pad_id: int, device: torch.device, scale: float = 1.0) -> float:
    """Backward ``scale`` x the batch's mean loss over scored tokens, in micro-batches; returns that value."""
    total = sum(_target_count(e) for e in batch)
    value = 0.0
    for chunk in micro_batches(batch, config):
        # Each chunk's loss is a mean over its tokens; re-weighting makes the sum the batch mean.
        weight = sum(_target_count(e) for e in chunk) / total if total else len(chunk) / len(batch)
        loss = loss_fn(model, collate(chunk, pad_id, device)) * (weight * scale)
        loss.backward()
        value += loss.item()
    return value


def _step(model, params, batch, optimizer, config: TrainConfig, loss_fn: LossFn, pad_id: int) -> float:
    """One optimiser step over ``batch``, in micro-batches weighted by scored tokens."""
    optimizer.zero_grad(set_to_none=True)
    value = accumulate_gradients(model, batch, config, loss_fn, pad_id, params[0].device)
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value}; lower the learning rate")
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    return value


def _batches(fitted: list[TokenizedExample], config: TrainConfig) -> Iterator[list[TokenizedExample]]:
    """Batches in a seeded random order, reshuffled each epoch (last batch may be short)."""
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        order = torch.randperm(len(fitted), generator=generator).tolist()
        for first in range(0, len(order), config.batch_size):
            yield [fitted[i] for i in order[first : first + config.batch_size]]


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig, state: TrainState | None,
                    param_lrs: Sequence[float] | None = None):
    """AdamW over ``params``, with the moments of ``state`` when it has them (hyper-parameters: ``config``)."""
    # One group per parameter when rates differ keeps the saved state's index i = parameter i.
    groups = params if param_lrs is None else [{"params": [p], "lr": lr} for p, lr in zip(params, param_lrs)]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if state is None or state.optimizer is None:
        return optimizer
    if len(state.optimizer) != len(params):
        raise ValueError(f"train() state has optimiser moments for {len(state.optimizer)} parameters, "
                         f"not {len(params)}")
    for index, (moments, param) in enumerate(zip(state.optimizer, params)):
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments and moments[name].shape != param.shape:
                raise ValueError(f"train() state: {name} of parameter {index} has shape "
                                 f"{tuple(moments[name].shape)}, the parameter {tuple(param.shape)}")
    # Clones: load_state_dict keeps same-device tensors as they are, and the caller's state must not move.
    saved = {i: {k: v.clone() for k, v in m.items()} for i, m in enumerate(state.optimizer) if m}
    # This optimiser's own param groups: config, not the saved run, sets lr and weight decay.
    optimizer.load_state_dict({"state": saved, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def _snapshot(step: int, optimizer, params: list[nn.Parameter], device: torch.device) -> TrainState:
    """The state after ``step`` optimiser steps of this call (live optimiser tensors, RNG copies)."""
    cuda = device.type == "cuda"
    return TrainState(step=step, optimizer=[dict(optimizer.state[p]) for p in params], rng=torch.get_rng_state(),
                      cuda_rng=torch.cuda.get_rng_state(device) if cuda else None)


def _seed_rng(config: TrainConfig, state: TrainState | None, device: torch.device) -> None:
    """Dropout RNG: a resumed call continues the saved stream, a fresh pass is seeded."""
    if state is None or state.rng is None:
        torch.manual_seed(config.seed)
        return
    torch.set_rng_state(state.rng)
    if device.type == "cuda" and state.cuda_rng is not None:
        torch.cuda.set_rng_state(state.cuda_rng, device)


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    examples: Sequence[TokenizedExample],
    config: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    pad_id: int = 0,
    state: TrainState | None = None,
    on_step: StepCallback | None = None,
    param_lrs: Sequence[float] | None = None,
) -> TrainResult:
    """Train exactly ``params`` of ``model`` on ``examples``.

    AdamW, linear warm-up then linear decay, gradient clipping, seeded shuffling and dropout
    (the caller's RNG state is restored afterwards). The model is in train mode during the
    loop and every submodule gets its previous mode back after.

    Exact resume: a call given the ``state`` that ``on_step`` saw after step k of an earlier
    call with the same ``examples`` and ``config`` takes the same steps k+1, k+2, ... with the
    same batches, learning rates, AdamW moments and dropout masks (hence the same parameters)
    as the uninterrupted call would have.

    Args:
        model: Any module whose forward takes the collated batch (e.g. a peft model).
        params: The parameters to optimise; all must have ``requires_grad``. Other
            parameters should be frozen (see ``prisp.adapters.set_trainable``).
        examples: Tokenized examples; those over ``config.max_length`` are cut.
        config: Loop options.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean over the batch's answer tokens;
            defaults to the model's causal-LM loss.
        pad_id: Token id used for right padding (masked out, so any valid id works).
        state: Where to continue from (see :class:`TrainState`); None: a fresh call.
        on_step: ``on_step(state, loss)`` after every optimiser step, e.g. to checkpoint.
        param_lrs: peak learning rate of each parameter of ``params`` (same order), for factors that
            need their own (the r x r bridge learns at a far higher rate than B); the warm-up and decay
            scale them all alike. None: ``config.lr`` for every parameter.

    Returns:
        Losses, learning rates, time and memory of the steps this call took.
    """
    _check_params(params)
    if param_lrs is not None and (len(param_lrs) != len(params) or not all(lr > 0 for lr in param_lrs)):
        raise ValueError(f"train() param_lrs needs one positive learning rate per parameter ({len(params)}), "
                         f"got {len(param_lrs)}")
    if not examples:
        raise ValueError("train() needs at least one example")
    fitted = [fit_example(e, config.max_length) for e in examples]
    device = params[0].device
    call_steps = math.ceil(len(fitted) / config.batch_size) * config.epochs
    first = state.step if state is not None else 0
    if not 0 <= first <= call_steps:
        raise ValueError(f"train() state is at step {first} but this call has {call_steps} steps")
    last = call_steps if config.max_steps is None else max(first, min(call_steps, config.max_steps))
    optimizer = _make_optimizer(params, config, state, param_lrs)
    total_steps = config.schedule_steps or call_steps
    factor = warmup_then_decay(total_steps, round(config.warmup_ratio * total_steps))
    offset = config.schedule_start + first  # schedule position of this call's first step
    scheduler = LambdaLR(optimizer, lambda step: factor(offset + step))
    result = TrainResult(
        steps=0,
        epochs=config.epochs,
        examples=len(fitted),
        truncated=sum(e.truncated for e in fitted),
        trainable_params=sum(p.numel() for p in params),
        device=str(device),
        threads=torch.get_num_threads(),
    )
    modes = {module: module.training for module in model.modules()}
    monitor = MemoryMonitor(device)
    bar = tqdm(total=last - first, disable=not config.progress, desc="train", leave=False)
    start = time.perf_counter()
    try:
        model.train()
        with monitor, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _seed_rng(config, state, device)  # dropout masks
            # The seeded order is regenerated from its start and the first `first` batches skipped: a resumed
            # call takes exactly the batches the interrupted one would have taken next.
            for batch in itertools.islice(_batches(fitted, config), first, last):
                result.lrs.append(optimizer.param_groups[0]["lr"])
                loss = _step(model, params, batch, optimizer, config, loss_fn or causal_lm_loss, pad_id)
                result.losses.append(loss)
                scheduler.step()
                result.steps += 1
                if on_step is not None:
                    on_step(_snapshot(first + result.steps, optimizer, params, device), loss)
                monitor.sample()
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    finally:
        bar.close()
        for module, mode in modes.items():
            module.training = mode
    result.seconds = time.perf_counter() - start
    for name, value in monitor.report().items():
        setattr(result, name, value)
    return result

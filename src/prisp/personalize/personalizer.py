"""Stage 2: personalize a copy of the base model for one user, from an anchor LoRA.

The base model passed in is never modified: each user works on a copy of its module tree whose weights are
frozen views of the base's (OPPU's merged weights get private copies), so one process can personalize many
users in turn without a 540 MB copy each (and OPPU's merge cannot leak into the next user).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from prisp.adapters import (
    LoraPair,
    LoraSpec,
    LoraWeights,
    add_bridge,
    attach_lora,
    extract_weights,
    fold_bridge,
    random_init,
    set_trainable,
    shared_copy,
)
from prisp.data.examples import user_examples
from prisp.data.lamp import ProfileItem
from prisp.data.protocol import DEFAULT_K
from prisp.data.tasks import get_task
from prisp.errors import PrispError
from prisp.personalize.hyperparams import (
    StageHyperparams,
    check_schedule,
    own_rates,
    personalization_hyperparams,
)
from prisp.personalize.strategies import Strategy, get_strategy
from prisp.personalize.svd_init import svd_start
from prisp.training import TrainConfig, TrainResult, tokenize_examples, train
from prisp.training.batches import TokenizedExample, fit_example
from prisp.training.loop import accumulate_gradients, causal_lm_loss, micro_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersonalizeConfig:
    """Options of one personalization run (None means the schedule's value for the task).

    Attributes:
        strategy: a key of ``STRATEGIES``.
        k: the user's most recent items used (few-shot protocol: 10).
        schedule: ``paper`` (Table 7) or ``tuned`` (searched on train users; ``prisp.personalize.hyperparams``).
        epochs, batch_size, lr: override the schedule's values (an explicit ``lr`` applies to every factor).
        lr_B, lr_C: B's and the bridge C's own learning rates, over the schedule's and ``lr``.
        micro_batch_size: gradient-accumulation chunk that bounds memory without changing the update.
        micro_batch_tokens: cap on a chunk's padded tokens (rows x longest); long examples go fewer to a
            chunk. 640 measured fastest on 2 cores (LaMP-4 chunks of 4, LaMP-5 of 2) and bounds peak memory.
        max_length: tokens per example; longer prompts lose their left part (logged).
        augment: add the App. B retrieval-augmented copy of every item.
        seed: seeds shuffling, dropout and OPPU's fresh LoRA.
    """

    strategy: str = "prisp"
    k: int = DEFAULT_K
    schedule: str = "paper"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_B: float | None = None
    lr_C: float | None = None
    micro_batch_size: int | None = 4
    micro_batch_tokens: int | None = 640
    max_length: int = 512
    augment: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        get_strategy(self.strategy)
        check_schedule(self.schedule)
        for name in ("k", "epochs", "max_length", "micro_batch_size", "micro_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PrispError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "lr_B", "lr_C"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PrispError(f"--{name.replace('_', '-').lower()} must be positive, got {value}")

    def train_config(self, task: str) -> TrainConfig:
        """The loop's options for ``task``: the schedule's row, with this config's explicit values on top.

        Raises:
            PrispError: an unknown schedule, or ``tuned`` where the search has no row and nothing overrides it.
        """
        table = self._row(task)
        return TrainConfig(epochs=self.epochs or table.epochs, batch_size=self.batch_size or table.batch_size,
                           lr=self.lr if self.lr is not None else table.lr, seed=self.seed,
                           max_length=self.max_length, progress=self.progress,
                           micro_batch_size=self.micro_batch_size, micro_batch_tokens=self.micro_batch_tokens)

    def factor_lrs(self, task: str) -> dict[str, float]:
        """{factor: learning rate} of the factors (B, C) that train at their own rate on ``task``."""
        row = {} if self.lr is not None else self._row(task).factor_lrs()
        return row | own_rates(self.lr_B, self.lr_C)

    def _row(self, task: str) -> StageHyperparams:
        if None not in (self.epochs, self.batch_size, self.lr):
            return StageHyperparams(self.batch_size, self.epochs, self.lr)
        return personalization_hyperparams(task, self.strategy, self.schedule)


@dataclass
class PersonalizeResult:
    """A personalized user: the exported adapter, the live model, and what it cost."""

    weights: LoraWeights  # a plain peft LoRA relative to the *original* base model
    model: torch.nn.Module  # the trained model, ready to generate (eval mode)
    strategy: str
    task: str
    items: list[str]
    examples: int
    augmented: int
    train: TrainResult
    hyperparams: dict = field(default_factory=dict)

    def report(self) -> dict:
        """The contents of ``personalization.json``."""
        return {"strategy": self.strategy, "task": self.task, "hyperparameters": self.hyperparams,
                "items_used": self.items, "examples": self.examples, "augmented_examples": self.augmented,
                "trainable_params": self.train.trainable_params, "seconds": self.train.seconds,
                "peak_memory_mb": self.train.peak_rss_mb or self.train.peak_cuda_mb,
                "train": self.train.to_dict(), "adapter_rank": self.weights.spec.r}


def _prepare(base: torch.nn.Module, anchor: LoraWeights, strategy: Strategy, seed: int,
             calibrate: Callable[[torch.nn.Module], None] | None = None):
    """The user's working model, its trainable parameters, and the LoRA to stack onto its export (or None)."""
    # OPPU merges the anchor into the targeted weights in place, PiSSA / LoRA-GA rewrite them to a residual:
    # only those weights get private copies.
    rewrites = strategy.fresh_lora or strategy.svd_init is not None
    work = shared_copy(base, own_modules=anchor.spec.target_modules if rewrites else ())
    stacked = None
    if strategy.svd_init is not None:
        model, stacked = svd_start(work, anchor.spec, strategy.svd_init, seed, calibrate)
    elif strategy.fresh_lora:
        work = attach_lora(work, anchor).merge_and_unload()
        model, stacked = attach_lora(work, random_init(work, anchor.spec, seed=seed)), anchor
    else:
        model = attach_lora(work, anchor)
    if strategy.bridge:
        add_bridge(model)
    params = set_trainable(model, strategy.train_A, strategy.train_B, strategy.train_C)
    return model, params, stacked


def _calibration(tokenized: Sequence[TokenizedExample], config: TrainConfig, pad_id: int):
    """LoRA-GA's calibration pass: the training loss's gradients over the user's examples (no step taken)."""
    def run(model: torch.nn.Module) -> None:
        fitted = [fit_example(e, config.max_length) for e in tokenized]
        # peft divides the summed gradient by the number of backward passes (one per micro-batch): scaling by
        # that count leaves the mean over all answer tokens, whatever the micro-batching (its scale sets
        # LoRA-GA's initial B).
        passes = len(micro_batches(fitted, config))
        accumulate_gradients(model, fitted, config, causal_lm_loss, pad_id, next(model.parameters()).device,
                             scale=passes)
    return run


def _factors(strategy: Strategy, n_params: int) -> list[str]:
    """The factor (A, B or C) of each trainable parameter, in ``set_trainable``'s order (A, B, C per module)."""
    per_module = [name for name, on in (("A", strategy.train_A), ("B", strategy.train_B), ("C", strategy.train_C))
                  if on]
    return per_module * (n_params // len(per_module))


def _lr_fields(factor_lrs: dict[str, float]) -> dict[str, float]:
    return {f"lr_{name}": lr for name, lr in factor_lrs.items()}


def stack_loras(first: LoraWeights, second: LoraWeights) -> LoraWeights:
    """One rank-(r1 + r2) LoRA equal to the sum of two (same scale kept): dW = [B1 B2] [A1; A2].

    OPPU's user LoRA lives on top of the merged anchor; stacking makes it a standard adapter of the
    original base model, so every strategy exports the same kind of artifact.
    """
    r = first.spec.r + second.spec.r
    if first.spec.scale != second.spec.scale or set(first.pairs) != set(second.pairs):
        raise PrispError("cannot stack LoRAs with different scales or modules")
    alpha = first.spec.scale * (r ** 0.5 if first.spec.use_rslora else r)
    spec = LoraSpec(r=r, alpha=alpha, dropout=first.spec.dropout, target_modules=first.spec.target_modules,
                    use_rslora=first.spec.use_rslora)
    pairs = {key: LoraPair(A=torch.cat([p.A, second.pairs[key].A], 0), B=torch.cat([p.B, second.pairs[key].B], 1))
             for key, p in first.pairs.items()}
    return LoraWeights(spec=spec, pairs=pairs, module_paths=first.module_paths, layers_prefix=first.layers_prefix)


def personalize(base: torch.nn.Module, tokenizer, anchor: LoraWeights, task: str, history: Sequence[ProfileItem],
                config: PersonalizeConfig = PersonalizeConfig(), labels: Sequence[str] = (),
                profile_text: str = "") -> PersonalizeResult:
    """Personalize ``base`` (untouched) for one user's ``history`` under ``config.strategy``.

    Raises:
        DataError: empty history.
        AdapterError: the anchor does not fit the base model.
    """
    task = get_task(task).name
    strategy = get_strategy(config.strategy)
    built = user_examples(task, history, config.k, labels, profile_text, config.augment)
    anchor.check_fits(base)
    train_config = config.train_config(task)
    tokenized = tokenize_examples(tokenizer, built.examples, train_config.max_length)
    pad_id = tokenizer.pad_token_id or 0
    model, params, stacked = _prepare(base, anchor, strategy, config.seed,
                                      _calibration(tokenized, train_config, pad_id))
    factor_lrs = config.factor_lrs(task)
    param_lrs = [factor_lrs.get(f, train_config.lr) for f in _factors(strategy, len(params))] if factor_lrs else None
    result = train(model, params, tokenized, train_config, pad_id=pad_id, param_lrs=param_lrs)
    if result.truncated:
        logger.warning("%d of %d examples were longer than %d tokens; their prompts were cut from the left",
                       result.truncated, len(tokenized), train_config.max_length)
    model.eval()
    exported = fold_bridge(model) if strategy.bridge else extract_weights(model)
    if stacked is not None:  # OPPU's anchor under the user LoRA; PiSSA / LoRA-GA's initial offset
        exported = stack_loras(stacked, exported)
    return PersonalizeResult(exported, model, strategy.name, task, [i.id for i in built.items],
                             len(built.examples), built.augmented, result,
                             asdict(train_config) | {"schedule": config.schedule} | _lr_fields(factor_lrs))

"""The one training loop every method uses (task adaptation, PRISP, OPPU, ablations, hypernet), and what
feeds it: ``batches`` (tokenized examples and collation), ``memory`` (the peak-memory monitor every
method's cost is measured with) and ``loop`` (options, the loop, exact resume)."""

from prisp.data.examples import Example
from prisp.training.batches import IGNORE_INDEX, TokenizedExample, collate, fit_example, tokenize_examples
from prisp.training.loop import (
    LossFn,
    StepCallback,
    TrainConfig,
    TrainResult,
    TrainState,
    causal_lm_loss,
    micro_batches,
    train,
    warmup_then_decay,
)
from prisp.training.memory import MemoryMonitor

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "LossFn",
    "MemoryMonitor",
    "StepCallback",
    "TokenizedExample",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "causal_lm_loss",
    "collate",
    "fit_example",
    "micro_batches",
    "tokenize_examples",
    "train",
    "warmup_then_decay",
]

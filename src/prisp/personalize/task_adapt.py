"""Task-adapted anchors: a fresh LoRA trained on N random task-level samples (Table 7, 'Task Adaptation')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prisp.adapters import (
    LoraSpec,
    LoraWeights,
    attach_lora,
    extract_weights,
    random_init,
    set_trainable,
    shared_copy,
)
from prisp.data.examples import query_examples
from prisp.data.lamp import Query
from prisp.data.protocol import DEFAULT_TASK_SAMPLES, sample_task_queries
from prisp.personalize.hyperparams import TASK_ADAPTATION
from prisp.training import TrainConfig, TrainResult, tokenize_examples, train


@dataclass
class TaskAdaptResult:
    """The task-adapted anchor, the query ids it saw and the training cost."""

    weights: LoraWeights
    query_ids: list[str]
    train: TrainResult


def task_adapt(base: torch.nn.Module, tokenizer, task: str, queries: Sequence[Query],
               samples: int = DEFAULT_TASK_SAMPLES, seed: int = 0, spec: LoraSpec = LoraSpec(),
               config: TrainConfig | None = None, labels: Sequence[str] = ()) -> TaskAdaptResult:
    """Train a random-init LoRA (A and B) on ``samples`` random queries of task-adaptive users.

    ``base`` is left untouched (a copy is trained). Defaults follow Table 7: 3 epochs, lr 1e-4, batch 6.
    """
    chosen = sample_task_queries(queries, samples, seed)
    config = config or TrainConfig(epochs=TASK_ADAPTATION.epochs, batch_size=TASK_ADAPTATION.batch_size,
                                   lr=TASK_ADAPTATION.lr, seed=seed, micro_batch_size=3)
    tokenized = tokenize_examples(tokenizer, query_examples(task, chosen, labels), config.max_length)
    model = attach_lora(shared_copy(base), random_init(base, spec, seed=seed))
    params = set_trainable(model, train_A=True, train_B=True, train_C=False)
    result = train(model, params, tokenized, config, pad_id=tokenizer.pad_token_id or 0)
    return TaskAdaptResult(extract_weights(model), [q.id for q in chosen], result)

"""Held-out metrics for a hypernetwork: answer loss and a small ROUGE-L, generated adapter vs none.

The wrapper (:class:`HyperLoraModel`) ties the frozen base model, the hypernetwork and the table of
description embeddings together, and the batch-header convention lets ``prisp.training.train`` carry a
description row per example: column 0 of ``input_ids`` holds the row, the rest is the usual batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prisp.hypernet.injection import BatchedLora
from prisp.hypernet.model import HyperNet
from prisp.training import IGNORE_INDEX, TokenizedExample, causal_lm_loss, collate, fit_example


class HyperLoraModel(nn.Module):
    """Frozen base model + hypernetwork + description embeddings; what the training loop sees.

    Attributes:
        base: The causal LM (its parameters must be frozen).
        hypernet: The trained network.
        embeddings: ``[R, embed_dim]`` description embeddings, indexed by row (not saved with the model).
        lora: The in-graph LoRA hooks on ``base``.
        on_loss: Optional callback receiving ``(loss, headers, tokens)`` of each training (micro-)batch.
        row_lookup: Optional ``[N]`` map from batch header to description row (training: header = example
            position); None means the header is the row itself.
    """

    def __init__(self, base: nn.Module, hypernet: HyperNet, embeddings: Tensor):
        super().__init__()
        self.base = base
        self.hypernet = hypernet
        self.register_buffer("embeddings", embeddings, persistent=False)  # [R, d]
        self.lora = BatchedLora(base, hypernet.config.spec)
        self.on_loss: Callable[[float, list[int], int], None] | None = None
        self.row_lookup: Tensor | None = None

    def rows(self, headers: Tensor) -> Tensor:
        """Description rows ``[b]`` for batch headers ``[b]``."""
        return headers if self.row_lookup is None else self.row_lookup[headers]

    def factors(self, headers: Tensor) -> dict:
        """Generated LoRA per batch row: ``(layer, module) -> (A [b, r, in], B [b, out, r])``."""
        return self.hypernet(self.embeddings[self.rows(headers)])

    def report(self, loss: Tensor, headers: Tensor, batch: dict[str, Tensor] | None = None) -> None:
        """Pass ``(loss, headers, scored tokens)`` of a (micro-)batch to ``on_loss``."""
        if self.on_loss is not None:
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if batch else len(headers)
            self.on_loss(float(loss.detach()), headers.tolist(), tokens)


def add_header(example: TokenizedExample, header: int, max_length: int) -> TokenizedExample:
    """Prepend ``header`` (a description row or an example position) as column 0, fitting ``max_length``."""
    fitted = fit_example(example, max_length - 1)
    return TokenizedExample(input_ids=[header] + fitted.input_ids, labels=[IGNORE_INDEX] + fitted.labels,
                            truncated=fitted.truncated)


def split_header(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Undo :func:`add_header` on a collated batch: ``(headers [b], batch without column 0)``."""
    rows = batch["input_ids"][:, 0]  # [b]
    return rows, {key: value[:, 1:] for key, value in batch.items()}


def sft_loss(model: HyperLoraModel, batch: dict[str, Tensor]) -> Tensor:
    """``loss_fn`` for ``prisp.training.train``: causal-LM loss on answers with each row's generated LoRA."""
    headers, batch = split_header(batch)
    with model.lora.use(model.factors(headers)):
        loss = causal_lm_loss(model.base, batch)
    model.report(loss, headers, batch)
    return loss


@torch.no_grad()
def answer_loss(model: HyperLoraModel, examples: Sequence[TokenizedExample], with_adapter: bool,
                batch_size: int = 8, pad_id: int = 0) -> float:
    """Token-weighted mean answer loss over header-carrying ``examples`` (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    total = weight = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            rows, batch = split_header(collate(examples[start:start + batch_size], pad_id))
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if with_adapter:
                with model.lora.use(model.factors(rows)):
                    loss = causal_lm_loss(model.base, batch)
            else:
                loss = causal_lm_loss(model.base, batch)
            total += float(loss) * n
            weight += n
    finally:
        model.train(was_training)
    return total / weight if weight else float("nan")


@dataclass
class RougeProbe:
    """A few held-out prompts per task, with the description row that generates their adapter."""

    rows: list[int]
    prompts: list[list[str]]
    golds: list[list[str]]


@torch.no_grad()
def rouge_l(model: HyperLoraModel, tokenizer, probe: RougeProbe, with_adapter: bool,
            max_new_tokens: int = 32, max_input_tokens: int = 256) -> float:
    """Mean ROUGE-L F of greedy answers over the probe (one adapter per task)."""
    from prisp.generation import GenerationConfig, generate
    from prisp.metrics import generation_metrics

    was_training = model.training
    model.eval()
    golds: list[str] = []
    preds: list[str] = []
    try:
        for row, prompts, task_golds in zip(probe.rows, probe.prompts, probe.golds):
            config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=len(prompts),
                                      max_input_tokens=max_input_tokens)
            if with_adapter:
                with model.lora.use(model.factors(torch.tensor([row]))):
                    texts = generate(model.base, tokenizer, prompts, config).texts
            else:
                texts = generate(model.base, tokenizer, prompts, config).texts
            preds += texts
            golds += task_golds
    finally:
        model.train(was_training)
    return generation_metrics(golds, preds)["rouge-L"] if golds else float("nan")

"""Label answers by scoring: rank a task's label set by the model's log-likelihood of each label as the answer.

For a classification or rating task a free-running greedy answer is often not a label at all on a small model, and
the metric counts it wrong whatever the model knows. Scoring asks the model the same prompt (same chat template,
same truncation as generation) and compares ``log p(label + EOS | prompt)`` over the label set: the answer is
always a label, and an adapter changes it exactly as it changes generation, through the same forward pass.

Cost: one forward over the prompt, then all candidates in one batched forward from the prompt's KV cache
(repeated once per label), so a 15-label task costs about one prompt plus 15 short continuations.

Length normalisation: ``mean`` (default) divides each label's log-likelihood by its token count (EOS included), so
multi-token labels are not penalised for their length against one-token ones; ``sum`` is the plain likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prisp.errors import DataError
from prisp.generation import format_prompt

NORMALISATIONS = ("mean", "sum")


@dataclass
class LabelScores:
    """Scores of every label for every prompt.

    Attributes:
        labels: the label set, in the order of the score columns.
        scores: ``[n_prompts, n_labels]`` normalised log-likelihoods.
        choices: the best label per prompt.
        truncated_prompts: prompts whose left part was cut to ``max_input_tokens``.
    """

    labels: tuple[str, ...]
    scores: torch.Tensor
    choices: list[str]
    truncated_prompts: int = 0


def _prompt_ids(tokenizer, prompt: str, max_input_tokens: int) -> tuple[list[int], bool]:
    text = format_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    return ids[-max_input_tokens:], len(ids) > max_input_tokens


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """Each label's answer tokens as training tokenizes an answer: the label, then EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) + eos for label in labels]
    if any(not ids for ids in out):
        raise DataError("a label has no tokens and the tokenizer has no EOS: cannot score labels")
    return out


@torch.no_grad()
def _score_one(model, prompt_ids: list[int], candidates: list[list[int]], pad_id: int,
               adapter_name: str | None = None) -> torch.Tensor:
    """Summed log-probabilities ``[L]`` of each candidate continuing ``prompt_ids``."""
    device = next(model.parameters()).device
    n = len(candidates)
    # peft's mixed-adapter forward: every row through one named adapter (the server's slots).
    route = (lambda rows: {"adapter_names": [adapter_name] * rows}) if adapter_name else (lambda rows: {})
    prompt = torch.tensor([prompt_ids], device=device)  # [1, P]
    out = model(input_ids=prompt, use_cache=True, **route(1))
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [V]: the first answer token
    cache = out.past_key_values
    width = max(len(c) for c in candidates)
    totals = torch.tensor([first[c[0]].item() for c in candidates])  # [L]
    if width == 1:
        return totals
    cache.batch_repeat_interleave(n)
    ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in candidates], device=device)  # [L, W]
    mask = torch.tensor([[1] * len(prompt_ids) + [1] * len(c) + [0] * (width - len(c)) for c in candidates],
                        device=device)  # [L, P + W]
    positions = torch.arange(len(prompt_ids), len(prompt_ids) + width, device=device).expand(n, width)
    # Feed all but each candidate's last token; position j predicts token j + 1.
    logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   cache=cache, use_cache=True, **route(n)).logits.float()  # [L, W-1, V]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # [L, W-1]
    real = torch.tensor([[j + 1 < len(c) for j in range(width - 1)] for c in candidates], device=device)
    return totals + (logprobs * real).sum(-1).cpu()


def score_labels(model, tokenizer, prompts: Sequence[str], labels: Sequence[str], normalise: str = "mean",
                 max_input_tokens: int = 1024, adapter_name: str | None = None) -> LabelScores:
    """The best label of ``labels`` for each prompt by the model's (normalised) log-likelihood.

    ``adapter_name`` routes every row through that peft adapter (a model holding several, as the server's
    slots do); None uses the model as it is.

    Raises:
        DataError: no labels, or an unknown normalisation.
    """
    if normalise not in NORMALISATIONS:
        raise DataError(f"unknown label normalisation {normalise!r}; expected one of: {', '.join(NORMALISATIONS)}")
    labels = tuple(labels)
    if not labels:
        raise DataError("label scoring needs a label set; this task has none")
    candidates = label_token_ids(tokenizer, labels)
    lengths = torch.tensor([len(c) for c in candidates], dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    rows, truncated = [], 0
    try:
        for prompt in prompts:
            ids, cut = _prompt_ids(tokenizer, prompt, max_input_tokens)
            truncated += cut
            total = _score_one(model, ids, candidates, pad, adapter_name)
            rows.append(total / lengths if normalise == "mean" else total)
    finally:
        model.train(was_training)
    scores = torch.stack(rows) if rows else torch.empty(0, len(labels))
    choices = [labels[int(i)] for i in scores.argmax(-1)] if rows else []
    return LabelScores(labels, scores, choices, truncated)

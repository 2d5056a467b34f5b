"""Label answers by scoring: rank a task's label set by the model's log-likelihood of each label as the answer.

For a classification or rating task a free-running greedy answer is often not a label at all on a small model, and
the metric counts it wrong whatever the model knows. Scoring asks the model the same prompt (same chat template,
same truncation as generation) and compares ``log p(label + EOS | prompt)`` over the label set: the answer is
always a label, and an adapter changes it exactly as it changes generation, through the same forward pass.

Cost: one forward over the prompt, then all candidates in one batched forward from the prompt's KV cache
(repeated once per label), so a 15-label task costs about one prompt plus 15 short continuations.

Length normalisation: ``mean`` (default) divides each label's log-likelihood by its token count (EOS included), so
multi-token labels are not penalised for their length against one-token ones; ``sum`` is the plain likelihood.

Ratings (LaMP-3): ``likeliest`` (default) answers the rating with the best score, like any label; ``expected-error``
answers the rating that minimises the expected absolute error under the model's distribution over the ratings (its
weighted median: the plain likelihoods renormalised over the label set), which is what MAE rewards when the model
is unsure between neighbours. Not chosen by measurement: the offline data has no LaMP-3 users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prisp.errors import DataError
from prisp.generation import format_prompt

NORMALISATIONS = ("mean", "sum")
RATING_RULES = ("likeliest", "expected-error")


@dataclass
class LabelScores:
    """Scores of every label for every prompt.

    Attributes:
        labels: the label set, in the order of the score columns.
        scores: ``[n_prompts, n_labels]`` normalised log-likelihoods.
        choices: the best label per prompt.
        log_likelihoods: ``[n_prompts, n_labels]`` plain (summed) log-likelihoods.
        truncated_prompts: prompts whose left part was cut to ``max_input_tokens``.
    """

    labels: tuple[str, ...]
    scores: torch.Tensor
    choices: list[str]
    truncated_prompts: int = 0
    log_likelihoods: torch.Tensor | None = None

    def min_expected_error(self) -> list[str]:
        """Per prompt, the numeric label with the least expected absolute error: the weighted median of the
        model's distribution over the labels (``softmax`` of the plain log-likelihoods over the label set).

        Raises:
            DataError: a label is not a number.
        """
        try:
            values = torch.tensor([float(label) for label in self.labels])
        except ValueError:
            raise DataError(f"expected-error answers need numeric labels, got {list(self.labels)}") from None
        order = values.argsort()
        totals = self.log_likelihoods if self.log_likelihoods is not None else self.scores
        probs = torch.softmax(totals.double(), dim=-1)[:, order]  # [n_prompts, n_labels], ascending values
        median = (probs.cumsum(-1) >= 0.5).float().argmax(-1)  # first value where the mass reaches a half
        return [self.labels[int(order[int(i)])] for i in median]


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
    totals, truncated = [], 0
    try:
        for prompt in prompts:
            ids, cut = _prompt_ids(tokenizer, prompt, max_input_tokens)
            truncated += cut
            totals.append(_score_one(model, ids, candidates, pad, adapter_name))
    finally:
        model.train(was_training)
    plain = torch.stack(totals) if totals else torch.empty(0, len(labels))
    scores = plain / lengths if normalise == "mean" else plain
    choices = [labels[int(i)] for i in scores.argmax(-1)] if totals else []
    return LabelScores(labels, scores, choices, truncated, plain)

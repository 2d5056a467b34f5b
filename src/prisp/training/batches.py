"""Examples as token ids for the loop: tokenizing prompt/answer pairs (loss on the answer only), cutting
over-long ones from the left of the prompt, and right-padded collation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prisp.data.examples import Example

IGNORE_INDEX = -100  # label value the causal-LM loss skips


@dataclass
class TokenizedExample:
    """Token ids ready for the loop.

    Attributes:
        input_ids: Prompt then answer tokens.
        labels: ``IGNORE_INDEX`` on prompt tokens, the token id on answer tokens.
        truncated: Whether the prompt lost tokens to fit a length limit.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_length: int, chat: bool = True
) -> list[TokenizedExample]:
    """Tokenize prompt/answer pairs with the loss on answer tokens only.

    With ``chat`` and a tokenizer that has a chat template, the prompt is rendered as a user
    turn plus the generation prompt, exactly as at inference; the answer (no special
    tokens, so format any leading space into it) and EOS follow.

    Raises:
        ValueError: An example has no answer tokens.
    """
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for index, example in enumerate(examples):
        if use_chat:
            messages = [{"role": "user", "content": example.prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template already carries BOS and friends.
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        answer_ids = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"]) + eos
        if not answer_ids:
            raise ValueError(f"example {index} has an empty answer and the tokenizer has no EOS")
        raw = TokenizedExample(
            input_ids=list(prompt_ids) + answer_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        )
        out.append(fit_example(raw, max_length))
    return out


def fit_example(example: TokenizedExample, max_length: int) -> TokenizedExample:
    """Cut an over-long example to ``max_length`` from the left of its prompt.

    The answer is what we learn from, so it survives; only an answer longer than the limit
    is itself cut (from its end, keeping one prompt token to predict its first token).
    """
    if len(example.input_ids) <= max_length:
        return example
    labels = example.labels
    n_prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    n_answer = len(example.input_ids) - n_prompt
    keep_answer = min(n_answer, max_length - 1 if n_prompt else max_length)
    keep_prompt = max_length - keep_answer
    kept = slice(n_prompt - keep_prompt, n_prompt + keep_answer)
    return TokenizedExample(input_ids=example.input_ids[kept], labels=example.labels[kept], truncated=True)


def collate(
    examples: Sequence[TokenizedExample], pad_id: int = 0, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels``, each ``[b, T]``."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # [b, T]
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # [b, T]
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # [b, T]
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

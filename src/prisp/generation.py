"""Batched greedy generation with a chat template, left padding and clean decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options.

    Attributes:
        max_new_tokens: the answer budget (tasks give short budgets for labels, longer for text).
        batch_size: prompts per forward pass; left padding keeps every prompt's end aligned.
        max_input_tokens: longer prompts are cut from the left (the instruction and query sit at the end).
        do_sample: greedy when False (the default, so predictions are reproducible).
        temperature, top_p: used only when sampling.
        first_line: keep the first non-empty line; LaMP answers are one line and small models ramble on.
    """

    max_new_tokens: int = 32
    batch_size: int = 8
    max_input_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    first_line: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_input_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GenerationConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class GenerationResult:
    """Outputs in prompt order, plus the cost of producing them."""

    texts: list[str]
    new_tokens: int
    seconds: float
    truncated_prompts: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def format_prompt(tokenizer, prompt: str) -> str:
    """Wrap ``prompt`` in the model's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


def clean_output(text: str, first_line: bool) -> str:
    """Strip whitespace and, optionally, everything after the first non-empty line."""
    text = text.strip()
    if first_line:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[0] if lines else ""
    return text


def _encode(tokenizer, prompts: Sequence[str], max_input_tokens: int) -> tuple[dict, int]:
    texts = [format_prompt(tokenizer, p) for p in prompts]
    # Chat templates already carry BOS/markers; adding special tokens again would duplicate them.
    ids = [tokenizer(t, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
           for t in texts]
    truncated = sum(len(x) > max_input_tokens for x in ids)
    ids = [x[-max_input_tokens:] for x in ids]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask}, truncated


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], config: GenerationConfig = GenerationConfig(),
             on_batch: Callable[[int], None] | None = None, *, adapter_names: Sequence[str] | None = None,
             budgets: Sequence[int] | None = None) -> GenerationResult:
    """Generate one answer per prompt, in order.

    Args:
        model: a causal LM (optionally with a peft adapter).
        tokenizer: its tokenizer (pad token set).
        prompts: raw prompts; the chat template is applied here.
        config: decoding options.
        on_batch: called with the number of prompts finished after each batch (progress bars).
        adapter_names: one peft adapter name per prompt (peft's mixed-adapter batches), so rows of one
            forward pass can use different LoRAs; None uses the model's active adapter for every row.
        budgets: one ``max_new_tokens`` per prompt (default: ``config.max_new_tokens`` for all). A batch
            decodes to its largest budget and cuts each row to its own; greedy decoding is causal, so a
            row's first ``b`` tokens do not depend on how long the others run.

    Raises:
        ValueError: ``adapter_names`` or ``budgets`` of the wrong length, or a budget below 1.
    """
    for name, values in (("adapter_names", adapter_names), ("budgets", budgets)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"generate: {len(values)} {name} for {len(prompts)} prompts")
    if budgets is not None and any(b < 1 for b in budgets):
        raise ValueError(f"generate: budgets must be positive, got {list(budgets)}")
    start = time.perf_counter()
    texts: list[str] = []
    new_tokens = truncated = 0
    device = next(model.parameters()).device
    stop_ids = _stop_ids(tokenizer, model)
    for begin in range(0, len(prompts), config.batch_size):
        end = begin + config.batch_size
        batch, cut = _encode(tokenizer, prompts[begin:end], config.max_input_tokens)
        truncated += cut
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = len(batch["input_ids"])
        limits = list(budgets[begin:end]) if budgets is not None else [config.max_new_tokens] * rows
        extra = {"adapter_names": list(adapter_names[begin:end])} if adapter_names is not None else {}
        sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p} \
            if config.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = model.generate(**batch, max_new_tokens=max(limits), pad_token_id=tokenizer.pad_token_id,
                             **sampling, **extra)
        answer_ids = out[:, batch["input_ids"].shape[1]:]
        for row, limit in zip(answer_ids, limits):
            kept = _answer_tokens(row[:limit].tolist(), stop_ids)
            new_tokens += len(kept)
            texts.append(clean_output(tokenizer.decode(kept, skip_special_tokens=True), config.first_line))
        if on_batch:
            on_batch(rows)
    return GenerationResult(texts, new_tokens, time.perf_counter() - start, truncated)


def _answer_tokens(row: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens before the first stop token (EOS, or the padding after a row that finished early)."""
    for index, token in enumerate(row):
        if token in stop_ids:
            return row[:index]
    return row


def _stop_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}

"""Training examples: a user's history items and task-level queries as prompt/answer pairs.

Each history item is phrased with the same Table 16 prompt the query will get, so personalization
teaches the answer format as well as the user's preferences. App. B: every item yields a *plain*
example and an *augmented* one with the BM25 top-1 of the user's earlier items (and the user's profile
text when there is one) prepended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prisp.data.lamp import ProfileItem, Query
from prisp.data.prompts import clip, clipped_fields, fill_prompt, query_prompt, with_context
from prisp.data.protocol import DEFAULT_K, recent_items
from prisp.data.tasks import get_task
from prisp.errors import DataError
from prisp.retrieval import Bm25Retriever, item_text


@dataclass
class Example:
    """One supervised example: the model should answer ``prompt`` with ``answer``."""

    prompt: str
    answer: str



def item_example(task: str, item: ProfileItem, labels: Sequence[str] = ()) -> Example:
    """One history item as a prompt/answer pair in the task's own prompt (Table 16 for LaMP).

    The item's fields fill the prompt through the spec's ``history_inputs`` (or its ``history_prompt`` where
    history items teach something else: LaMP-1 items carry no citation choice, so they train "title ->
    abstract"), and the spec's ``answer`` field is the answer. LaMP-7 items carry only the user's tweet, so
    they train paraphrasing it into itself (the user's style).
    """
    spec = get_task(task)
    fields = clipped_fields(item)
    if spec.history_prompt:
        prompt = spec.history_prompt.format_map(fields)
    else:
        inputs = {name: template.format_map(fields) for name, template in spec.history_inputs}
        prompt = fill_prompt(spec, inputs, labels)
    return Example(prompt, clip(item.fields[spec.answer], spec.answer_chars))


@dataclass
class UserExamples:
    """The examples built for one user and the history items they came from."""

    examples: list[Example]
    items: list[ProfileItem]
    augmented: int


def user_examples(task: str, history: Sequence[ProfileItem], k: int = DEFAULT_K, labels: Sequence[str] = (),
                  profile_text: str = "", augment: bool = True) -> UserExamples:
    """Plain + augmented examples from a user's ``k`` most recent items (oldest first).

    Retrieval for the augmented copy only sees items *earlier* than the target among those ``k``,
    so an example never contains its own answer and nothing outside the few-shot budget is used.

    Raises:
        DataError: the history is empty.
    """
    if not history:
        raise DataError("the user's history is empty: personalization needs at least one profile item")
    items = recent_items(history, k)
    examples, augmented = [], 0
    for index, item in enumerate(items):
        plain = item_example(task, item, labels)
        examples.append(plain)
        if not augment:
            continue
        earlier = items[:index]
        retrieved = Bm25Retriever(task, earlier).top_k(item_text(task, item), 1) if earlier else []
        if retrieved or profile_text:
            examples.append(Example(with_context(plain.prompt, task, retrieved, profile_text), plain.answer))
            augmented += 1
    return UserExamples(examples, items, augmented)


def query_examples(task: str, queries: Sequence[Query], labels: Sequence[str] = ()) -> list[Example]:
    """Task-level examples (official input -> gold) for task adaptation; queries without a gold are refused."""
    missing = [q.id for q in queries if q.gold is None]
    if missing:
        raise DataError(f"task adaptation needs golds; query {missing[0]!r} has none")
    return [Example(query_prompt(task, q.input, labels), q.gold) for q in queries]

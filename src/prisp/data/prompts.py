"""Prompt construction from a task's spec: query prompts, history items as context, and the retrieval query.

An input is first read into the task's input fields: a LaMP input string is parsed with the spec's
``input_pattern`` / ``input_marker`` (an input that does not parse is used verbatim, never dropped); a custom
task's input is a JSON object of its fields, or plain text when its prompt has a single field. The fields then
fill the spec's ``prompt`` template (the paper's Table 16 prompts for LaMP).
"""

from __future__ import annotations

import json
from typing import Sequence

from prisp.data.inputs import ParsedInput, parse_input  # noqa: F401  (part of this module's API)
from prisp.data.lamp import ProfileItem
from prisp.data.tasks import TaskSpec, get_task
from prisp.errors import DataError

_INSTRUCTION = "User Instruction: "


def input_text(task: str | TaskSpec, record: object) -> str:
    """A custom task's input record (dict of fields, or plain text) as the string inputs travel as."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return json.dumps(record, ensure_ascii=False, sort_keys=True)
    raise DataError(f"{get_task(task).name}: an input must be text or an object of fields, got "
                    f"{type(record).__name__}")


def fill_prompt(task: str | TaskSpec, fields: dict[str, str], labels: Sequence[str] = ()) -> str:
    """The task's prompt with its input fields (and label list) filled in."""
    spec = get_task(task)
    return spec.prompt.format_map({**fields, "labels": ", ".join(labels)})


def query_prompt(task: str | TaskSpec, text: str, labels: Sequence[str] = ()) -> str:
    """The prompt for one input (a LaMP input that does not parse is wrapped verbatim)."""
    spec = get_task(task)
    parts = parse_input(spec, text)
    if not parts.parsed:
        return f"{_INSTRUCTION}{text} Answer:"
    return fill_prompt(spec, parts.fields, parts.labels or labels)


HISTORY_FIELD_CHARS = 600


def clip(text: str, limit: int = HISTORY_FIELD_CHARS) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary (deterministic)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."


def clipped_fields(item: ProfileItem) -> dict[str, str]:
    """A history item's fields, each clipped: ACL abstracts reach 2000 characters, and a retrieved item must not
    crowd the query out of a small model's context."""
    return {key: clip(value) for key, value in item.fields.items()}


def render_item(task: str | TaskSpec, item: ProfileItem) -> str:
    """One history item as context text, in the same words the task's prompt uses (the spec's ``context``)."""
    return get_task(task).context.format_map(clipped_fields(item))


def with_context(prompt: str, task: str | TaskSpec, retrieved: Sequence[ProfileItem] = (),
                 profile_text: str = "") -> str:
    """Prepend retrieved history items (RAG) and/or a user profile text (PAG) to a prompt."""
    blocks = []
    if profile_text:
        blocks.append(f"User Profile: {profile_text.strip()}")
    if retrieved:
        history = "\n".join(render_item(task, item) for item in retrieved)
        blocks.append(f"User History:\n{history}")
    return "\n".join([*blocks, prompt]) if blocks else prompt


def retrieval_query(task: str | TaskSpec, text: str) -> str:
    """The text BM25 should match against a user's history for this input: its fields, in prompt order."""
    parts = parse_input(task, text)
    if not parts.parsed:
        return text
    return " ".join(parts.fields[name] for name in get_task(task).input_fields)

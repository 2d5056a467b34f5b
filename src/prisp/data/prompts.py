"""Prompt construction from a task's spec: query prompts, history items as context, and the retrieval query.

An input is first read into the task's input fields: a LaMP input string is parsed with the spec's
``input_pattern`` / ``input_marker`` (an input that does not parse is used verbatim, never dropped); a custom
task's input is a JSON object of its fields, or plain text when its prompt has a single field. The fields then
fill the spec's ``prompt`` template (the paper's Table 16 prompts for LaMP).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from prisp.data.lamp import ProfileItem
from prisp.data.tasks import TaskSpec, get_task, labels_in_input
from prisp.errors import DataError

_INSTRUCTION = "User Instruction: "


@dataclass(frozen=True)
class ParsedInput:
    """An input read into the task's input fields.

    Attributes:
        fields: input field -> text (empty when the input did not parse).
        labels: the label list the input names itself (LaMP-2's tags, LaMP-2N's categories), or ``()``.
        text: the input as given.
        parsed: False when a LaMP input did not match its format (then the prompt wraps ``text`` verbatim).
    """

    fields: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    text: str = ""
    parsed: bool = True


def parse_input(task: str | TaskSpec, text: str) -> ParsedInput:
    """Read an input into ``task``'s input fields.

    Raises:
        DataError: a custom task's input is not a JSON object with its fields (or plain text for a
            one-field prompt).
    """
    spec = get_task(task)
    if spec.input_format == "fields":
        return ParsedInput(fields=_field_input(spec, text), text=text)
    labels = labels_in_input(spec, text)
    if spec.input_pattern:
        match = re.search(spec.input_pattern, text, re.DOTALL | re.IGNORECASE)
        if not match:
            return ParsedInput(labels=labels, text=text, parsed=False)
        return ParsedInput(fields=match.groupdict(), labels=labels, text=text)
    match = re.search(spec.input_marker, text, re.IGNORECASE)
    if not match:
        return ParsedInput(labels=labels, text=text, parsed=False)
    return ParsedInput(fields={spec.input_fields[0]: text[match.end():].strip()}, labels=labels, text=text)


def _field_input(spec: TaskSpec, text: str) -> dict[str, str]:
    names = spec.input_fields
    if text.lstrip().startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{spec.name}: input is not a valid JSON object: {exc}") from None
        missing = [n for n in names if n not in record]
        if missing:
            raise DataError(f"{spec.name}: input lacks field(s) {missing} (the prompt needs {list(names)})")
        bad = [n for n in names if not isinstance(record[n], (str, int, float)) or isinstance(record[n], bool)]
        if bad:
            raise DataError(f"{spec.name}: input field {bad[0]!r} must be text")
        return {n: str(record[n]) for n in names}
    if len(names) != 1:
        raise DataError(f"{spec.name}: an input must be a JSON object with the fields {list(names)}")
    return {names[0]: text}


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

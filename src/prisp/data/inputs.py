"""Reading a query's input into its task's input fields (a LaMP input string parsed with the spec's regexes, a
custom task's JSON object or plain text). Kept apart from ``prisp.data.prompts`` so the data loader can read
inputs (derived tasks are built from parsed source inputs) without an import cycle."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from prisp.data.tasks import TaskSpec, get_task, labels_in_input
from prisp.errors import DataError


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

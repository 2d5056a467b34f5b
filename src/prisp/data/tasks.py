"""Tasks as specs: every task-specific fact (fields, prompt, answer, labels, description, decoding budget) lives in
one :class:`TaskSpec`, read from a small TOML (or JSON) file, so code elsewhere asks the spec instead of
branching on task names.

The seven LaMP tasks are built-in spec files (``prisp/data/builtin/*.toml``); a user's own task is a file in
the same format, given wherever a task name is accepted (``--task my_task.toml``, ``prisp.load_task(path)``).
``docs/tasks.md`` documents the format; ``examples/support_reply/`` is a complete custom task.
"""

from __future__ import annotations

import json
import math
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prisp.errors import DataError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
KINDS = {"classification": "classification", "rating": "regression", "regression": "regression",
         "generation": "generation"}
METRICS = {"classification": "accuracy-f1", "regression": "mae-rmse", "generation": "rouge"}
# Metric sets a task may name instead of its kind's default (long-form generation adds METEOR, as LongLaMP does).
METRIC_CHOICES = {"classification": ("accuracy-f1",), "regression": ("mae-rmse",),
                  "generation": ("rouge", "rouge-meteor")}
INPUT_FORMATS = ("lamp", "fields")
# A custom task's Stage-2 schedule when its file gives none: the tuned schedule's common row (batch 4, 1 epoch,
# lr 3e-3; bench/results/schedule_search.md), which learns on small models where Table 7's rates do not.
DEFAULT_SCHEDULE = {"batch_size": 4, "epochs": 1, "lr": 3e-3}
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LAMP_NAME = re.compile(r"^lamp[-_ ]?(\d)(n?)$", re.IGNORECASE)


@dataclass(frozen=True)
class TaskSpec:
    """Everything prisp knows about one task.

    Attributes:
        name: canonical name, e.g. ``"LaMP-4"`` or a custom task's ``name``.
        kind: ``"classification"``, ``"regression"`` (ratings) or ``"generation"``.
        description: the natural-language description the hypernetwork turns into an anchor (LaMP: Table 11;
            LaMP-2N's is ours, LaMP v1's news categorization).
        prompt: the query prompt: a template over the input fields (``{field}``) and ``{labels}``.
        profile_fields: fields every history item must carry (besides ``id``; ``date`` is optional).
        query_fields: history fields whose text BM25 indexes for retrieval.
        answer: the history field a training example answers with.
        history_inputs: how a history item fills ``prompt``: input field -> template over the item's fields.
        history_prompt: a different prompt for history items (a template over their fields), or "" for ``prompt``.
        context: a retrieved history item as the RAG block shows it (template over the item's fields).
        labels: the label set (classification, ratings); for ``labels_from_input`` the fallback.
        labels_from_input: inputs name their own label list (LaMP-2N's categories).
        max_new_tokens: decoding budget; short for labels, longer for text.
        input_format: ``"lamp"`` (official LaMP input strings, parsed by ``input_pattern`` / ``input_marker``)
            or ``"fields"`` (a JSON object of the input fields, or plain text when the prompt has one field).
        input_pattern, input_marker, input_labels: the ``lamp`` format's regexes (named groups = input fields;
            the text after the marker = the one input field; one group = the comma-separated label list).
        official_dir: the directory on the LaMP download server ("" for custom tasks).
        schedule: the Stage-2 schedule (``batch_size``, ``epochs``, ``lr``) of a task without a Table 7 row
            (custom tasks, LongLaMP-2); LaMP tasks use Table 7.
        first_line: answers keep their first non-empty line (LaMP answers are one line and small models ramble
            on); a long-form task sets it false and keeps the whole text.
        answer_chars: a training answer is clipped to this many characters (short answers stay whole; a long-form
            task sets it above its longest answer so the model never learns to stop mid-text).
        alt_descriptions: other wordings of ``description`` by kind (Figure 8's ``paraphrase`` and, where the
            paper gives it, ``imprecise``); ``prisp bench --descriptions`` anchors from them.
        metric_set: the metric set when not the kind's default (``rouge-meteor``); see :attr:`metric`.
        derived_from, derived_inputs, derived_answer: a task whose queries are built from another task's files
            (LongLaMP-2 from LaMP-5: the same users, splits and histories, with input and answer swapped):
            each input field and the answer are templates over the source query's input fields and its gold
            ``output`` (``prisp.data.lamp.load_task_split`` applies them).
        source: the spec file it was read from.
    """

    name: str
    kind: str
    description: str
    prompt: str
    profile_fields: tuple[str, ...]
    query_fields: tuple[str, ...]
    answer: str
    history_inputs: tuple[tuple[str, str], ...]
    history_prompt: str
    context: str
    labels: tuple[str, ...]
    labels_from_input: bool
    max_new_tokens: int
    input_format: str
    input_pattern: str = ""
    input_marker: str = ""
    input_labels: str = ""
    official_dir: str = ""
    schedule: tuple[tuple[str, float], ...] = ()
    answer_chars: int = 600
    first_line: bool = True
    alt_descriptions: tuple[tuple[str, str], ...] = ()
    metric_set: str = ""
    derived_from: str = ""
    derived_inputs: tuple[tuple[str, str], ...] = ()
    derived_answer: str = ""
    source: str = ""
    builtin: bool = field(default=False, compare=False)

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def metric(self) -> str:
        return self.metric_set or METRICS[self.kind]

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The fields of a query input: the prompt's placeholders other than ``labels``, in prompt order."""
        return tuple(name for name in template_fields(self.prompt) if name != "labels")


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` names of a template, in order, each once."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


# ---- reading spec files ---------------------------------------------------------------------------------------
def load_task_file(path: str | Path) -> TaskSpec:
    """Read and validate a task spec file (``.toml`` or ``.json``).

    Raises:
        DataError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read task file {path}: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"task file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    return parse_task(raw, str(path), builtin=path.parent == BUILTIN_DIR)


def parse_task(raw: Any, where: str, builtin: bool = False) -> TaskSpec:
    """A :class:`TaskSpec` from the decoded contents of a spec file; every error names ``where``."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a task spec must be a table/object")
    reader = _Reader(raw, where)
    name = reader.text("name")
    if not _NAME_OK.fullmatch(name):
        raise DataError(f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not builtin and _LAMP_NAME.match(name):
        raise DataError(f"{where}: name {name!r} is a built-in LaMP task's; pick another")
    kind_word = reader.text("kind")
    if kind_word not in KINDS:
        raise DataError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind_word!r}")
    kind = KINDS[kind_word]
    labels = _labels(reader, kind, where)
    input_format = reader.text("input_format", "fields")
    if input_format not in INPUT_FORMATS:
        raise DataError(f"{where}: input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    if input_format == "lamp" and not builtin:
        raise DataError(f"{where}: input_format 'lamp' is for the built-in LaMP tasks; custom tasks use 'fields'")
    metric = reader.text("metric", METRICS[kind])
    if metric not in METRIC_CHOICES[kind]:
        raise DataError(f"{where}: a {kind_word} task is scored with metric "
                        f"{' or '.join(map(repr, METRIC_CHOICES[kind]))}, got {metric!r}")
    prompt = reader.text("prompt")
    inputs = tuple(n for n in _checked_template(prompt, where, "prompt") if n != "labels")
    if not inputs:
        raise DataError(f"{where}: prompt has no {{field}} for the input")
    history = _Reader(reader.table("history"), f"{where} [history]")
    fields = history.names("fields")
    answer = history.text("answer")
    if answer not in fields:
        raise DataError(f"{where} [history]: answer {answer!r} is not one of fields {list(fields)}")
    history_prompt = history.text("prompt", "")
    mapping = history.table("inputs", {})
    if history_prompt:
        _check_uses(history_prompt, fields, f"{where} [history] prompt")
    else:
        missing = [n for n in inputs if n not in mapping and n not in fields]
        if missing:
            raise DataError(f"{where} [history]: the prompt's field(s) {missing} are not history fields; map them "
                            "with [history] inputs = {field = \"{history_field} ...\"}")
        for target, template in mapping.items():
            if target not in inputs or not isinstance(template, str):
                raise DataError(f"{where} [history] inputs: {target!r} must be a prompt field mapped to a template")
            _check_uses(template, fields, f"{where} [history] inputs.{target}")
    history_inputs = tuple((n, mapping.get(n, f"{{{n}}}")) for n in inputs)
    retrieval = history.names("retrieval_fields", tuple(f for f in fields if f != answer) or fields)
    for name_ in retrieval:
        if name_ not in fields:
            raise DataError(f"{where} [history]: retrieval field {name_!r} is not one of fields {list(fields)}")
    context = history.text("context", " ".join(f"{f.replace('_', ' ').capitalize()}: {{{f}}}" for f in fields))
    _check_uses(context, fields, f"{where} [history] context")
    lamp = _Reader(reader.table("input", {}), f"{where} [input]")
    pattern, marker, label_re = lamp.text("pattern", ""), lamp.text("marker", ""), lamp.text("labels", "")
    for regex in (pattern, marker, label_re):
        try:
            re.compile(regex)
        except re.error as exc:
            raise DataError(f"{where} [input]: bad regular expression {regex!r}: {exc}") from None
    max_new_tokens = reader.integer("max_new_tokens", 8 if kind != "generation" else 64, low=1, high=4096)
    answer_chars = reader.integer("answer_chars", 600, low=1, high=100_000)
    first_line = reader.boolean("first_line", True)
    alternatives = reader.table("descriptions", {})
    if not all(isinstance(k, str) and _FIELD_OK.fullmatch(k) and isinstance(v, str) and v.strip()
               for k, v in alternatives.items()):
        raise DataError(f"{where} [descriptions]: each entry must be a name = a non-empty description")
    # A built-in LaMP task's schedule is its Table 7 row; a built-in without one (LongLaMP-2) names its own.
    schedule = _schedule(reader, where) if not builtin or "schedule" in reader.raw else ()
    description, official_dir = reader.text("description"), reader.text("official_dir", "")
    labels_from_input = reader.boolean("labels_from_input", False)
    derived = _Reader(reader.table("derived", {}), f"{where} [derived]")
    derived_from, derived_inputs, derived_answer = "", (), ""
    if derived.raw:
        derived_from = derived.text("from")
        mapping = derived.table("inputs")
        if sorted(mapping) != sorted(inputs) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError(f"{where} [derived] inputs: must map each prompt field {list(inputs)} to a template")
        for target, template in mapping.items():
            _checked_template(template, where, f"[derived] inputs.{target}")
        derived_inputs = tuple((n, mapping[n]) for n in inputs)
        derived_answer = derived.text("answer")
        _checked_template(derived_answer, where, "[derived] answer")
    reader.done(("input", "history", "schedule", "derived", "descriptions"))
    history.done(("inputs",))
    lamp.done(())
    derived.done(("inputs",))
    return TaskSpec(
        name=name, kind=kind, description=description, prompt=prompt, profile_fields=fields,
        query_fields=retrieval, answer=answer, history_inputs=history_inputs, history_prompt=history_prompt,
        context=context, labels=labels, labels_from_input=labels_from_input,
        max_new_tokens=max_new_tokens, input_format=input_format, input_pattern=pattern, input_marker=marker,
        input_labels=label_re, official_dir=official_dir, schedule=schedule, answer_chars=answer_chars,
        first_line=first_line, alt_descriptions=tuple(sorted(alternatives.items())),
        metric_set="" if metric == METRICS[kind] else metric, derived_from=derived_from,
        derived_inputs=derived_inputs, derived_answer=derived_answer, source=where, builtin=builtin,
    )


class _Reader:
    """Typed access to one table of a spec file; remembers which keys were read to refuse unknown ones."""

    def __init__(self, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: must be a table/object")
        self.raw, self.where, self.seen = raw, where, set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                raise DataError(f"{self.where}: missing {key!r}")
            return default
        return self.raw[key]

    def text(self, key: str, default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or (default is None and not value.strip()):
            raise DataError(f"{self.where}: {key!r} must be a non-empty string")
        return value

    def names(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self._get(key, _REQUIRED if default is None else list(default))
        if (not isinstance(value, list) or not value or not all(isinstance(v, str) and _FIELD_OK.fullmatch(v)
                                                                for v in value) or len(set(value)) != len(value)):
            raise DataError(f"{self.where}: {key!r} must be a list of distinct field names (letters, digits, _)")
        return tuple(value)

    def table(self, key: str, default: Any = None) -> dict:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, dict):
            raise DataError(f"{self.where}: {key!r} must be a table/object")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise DataError(f"{self.where}: {key!r} must be an integer in [{low}, {high}], got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise DataError(f"{self.where}: {key!r} must be true or false")
        return value

    def done(self, tables: tuple[str, ...]) -> None:
        unknown = sorted(set(self.raw) - self.seen - set(tables))
        if unknown:
            raise DataError(f"{self.where}: unknown key(s) {', '.join(map(repr, unknown))}")


_REQUIRED = object()
_FIELD_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _checked_template(template: str, where: str, what: str) -> tuple[str, ...]:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{where}: {what} is not a valid template ({exc}); write literal braces as {{{{ }}}}") from None
    names = template_fields(template)
    bad = [n for _, n, spec, conversion in parts if n is not None and (spec or conversion or not _FIELD_OK.fullmatch(n))]
    if bad:
        raise DataError(f"{where}: {what} uses {bad[0]!r}; placeholders are plain field names like {{text}}")
    return names


def _check_uses(template: str, fields: tuple[str, ...], where: str) -> None:
    unknown = [n for n in _checked_template(template, where, "template") if n not in fields]
    if unknown:
        raise DataError(f"{where}: {{{unknown[0]}}} is not a history field ({', '.join(fields)})")


def _labels(reader: _Reader, kind: str, where: str) -> tuple[str, ...]:
    if kind == "regression":
        bounds = reader._get("rating", _REQUIRED)
        if (not isinstance(bounds, list) or len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool)
                                                                        for b in bounds) or bounds[0] >= bounds[1]
                or bounds[1] - bounds[0] > 100):
            raise DataError(f"{where}: 'rating' must be [low, high], integers with low < high (at most 101 values)")
        return tuple(str(v) for v in range(bounds[0], bounds[1] + 1))
    if kind == "classification":
        labels = reader._get("labels", _REQUIRED)
        if (not isinstance(labels, list) or not all(isinstance(v, str) and v.strip() for v in labels)
                or len(set(labels)) != len(labels) or (len(labels) < 2 and not reader.raw.get("labels_from_input"))):
            raise DataError(f"{where}: 'labels' must list at least two distinct non-empty labels")
        return tuple(labels)
    return ()


def _schedule(reader: _Reader, where: str) -> tuple[tuple[str, float], ...]:
    raw = reader.raw.get("schedule", {})
    reader.seen.add("schedule")
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_SCHEDULE):
        raise DataError(f"{where} [schedule]: keys are {', '.join(DEFAULT_SCHEDULE)}")
    merged = {**DEFAULT_SCHEDULE, **raw}
    ok = (isinstance(merged["batch_size"], int) and merged["batch_size"] >= 1 and isinstance(merged["epochs"], int)
          and merged["epochs"] >= 1 and isinstance(merged["lr"], (int, float)) and math.isfinite(merged["lr"])
          and merged["lr"] > 0)
    if not ok:
        raise DataError(f"{where} [schedule]: batch_size and epochs must be integers >= 1, lr a positive number")
    return tuple(merged.items())


# ---- the registry ---------------------------------------------------------------------------------------------
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (load_task_file(path) for path in sorted(BUILTIN_DIR.glob("*.toml")))
}
_CUSTOM: dict[str, TaskSpec] = {}
_BY_PATH: dict[tuple[str, int], TaskSpec] = {}
_SPEC_SUFFIXES = (".toml", ".json")

LAMP1_LABELS = TASKS["LaMP-1"].labels
LAMP2_TAGS = TASKS["LaMP-2"].labels
LAMP2N_OFFICIAL_CATEGORIES = TASKS["LaMP-2N"].labels
LAMP3_LABELS = TASKS["LaMP-3"].labels


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a custom task known by name in this process (loading its file does this; the last one loaded under
    a name is the one the name means)."""
    if spec.name in TASKS:
        raise DataError(f"{spec.source}: name {spec.name!r} is a built-in task's")
    _CUSTOM[spec.name] = spec
    return spec


def is_task_file(name: str) -> bool:
    return str(name).lower().endswith(_SPEC_SUFFIXES)


def normalize_task_name(name: str) -> str:
    """Map ``LaMP_4``, ``lamp-4``, ``LaMP-2N`` ... to the canonical ``LaMP-4`` form; a spec file path to its
    task's name (loading it); a loaded custom task's name to itself.

    Raises:
        DataError: the name is not a task prisp knows.
    """
    return get_task(name).name


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` for a task name in any accepted spelling, or for a spec file path.

    Raises:
        DataError: unknown task (the message lists the known ones), or a spec file that does not validate.
    """
    if isinstance(name, TaskSpec):
        return name
    text = str(name).strip()
    if is_task_file(text):
        # Prompts ask for their task's spec per item: read each file once per process (keyed by its mtime, so
        # an edited file is read again).
        path = Path(text).resolve()
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            key = None
        if key is None or key not in _BY_PATH:
            spec = register_task(load_task_file(text))
            if key is None:
                return spec
            _BY_PATH[key] = spec
        return register_task(_BY_PATH[key])
    match = _LAMP_NAME.match(text)
    canonical = f"LaMP-{match.group(1)}{match.group(2).upper()}" if match else text
    if canonical in TASKS:
        return TASKS[canonical]
    if text in _CUSTOM:
        return _CUSTOM[text]
    raise DataError(f"unknown task {name!r}; expected one of: {', '.join([*TASKS, *_CUSTOM])}, "
                    "or a task spec file (.toml/.json)")


def split_labels(text: str) -> tuple[str, ...]:
    """A comma-separated label list as a tuple (blank entries dropped)."""
    return tuple(label.strip() for label in text.split(",") if label.strip())


def labels_in_input(spec: TaskSpec, text: str) -> tuple[str, ...]:
    """The label list an input names (LaMP-2's tags, LaMP-2N's categories), or ``()``."""
    if not spec.input_labels:
        return ()
    match = re.search(spec.input_labels, text, re.IGNORECASE)
    return split_labels(match.group(1)) if match else ()


def categories_from_input(text: str) -> tuple[str, ...]:
    """The category list a LaMP-2N input names (``categories: [a, b, ...]``), or ``()``."""
    return labels_in_input(TASKS["LaMP-2N"], text)


def label_set(task: str | TaskSpec, inputs: list[str] | None = None) -> tuple[str, ...]:
    """The label set for ``task``; for tasks whose inputs name their labels (LaMP-2N), read from ``inputs``."""
    spec = get_task(task)
    if spec.labels_from_input:
        for text in inputs or []:
            found = labels_in_input(spec, text)
            if found:
                return found
    return spec.labels


_EDGE_PUNCT = " \t\n\"'`*.:;,!"


def snap_to_label(text: str, labels: tuple[str, ...] | list[str]) -> str:
    """Map a model answer to a label when it unambiguously *starts* with one; else return it unchanged.

    Small models answer "1" where LaMP-1's gold is "[1]", or "Politics." for "politics". The official metric
    counts those wrong; this snap (applied to predictions, never inside the metric) only accepts an answer
    whose first token is a label (case-insensitive, a bare digit standing for "[digit]"), and never searches
    further into the text, so a rambling answer that mentions a label later stays wrong.
    """
    if not labels:
        return text
    stripped = text.strip().strip(_EDGE_PUNCT)
    lowered = stripped.lower()
    by_length = sorted(labels, key=len, reverse=True)
    for label in by_length:
        if lowered == label.lower():
            return label
    for label in by_length:
        for form in {label.lower(), label.lower().strip("[]")}:
            if lowered.startswith(form) and not lowered[len(form):len(form) + 1].isalnum():
                return label
    return text

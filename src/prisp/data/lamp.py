"""Loading and validating LaMP files into typed records.

LaMP ships each split as ``{split}_questions.json`` (``[{"id", "input", "profile": [...]}]``) and
``{split}_outputs.json`` (``{"task", "golds": [{"id", "output"}]}``). Every malformed case raises
:class:`~prisp.errors.DataError` naming the file, the record id and the field, so the CLI can print
one line instead of a stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prisp.data.inputs import parse_input
from prisp.data.tasks import TaskSpec, get_task, normalize_task_name
from prisp.errors import DataError
from prisp.files import read_jsonl


@dataclass(frozen=True)
class ProfileItem:
    """One history item of a user: its id, the task's fields and an optional ``YYYY-MM-DD`` date."""

    id: str
    fields: dict[str, str]
    date: str | None = None

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def to_json(self) -> dict[str, str]:
        out = {"id": self.id, **self.fields}
        if self.date is not None:
            out["date"] = self.date
        return out


@dataclass(frozen=True)
class Query:
    """One LaMP question: the input text, the asking user's profile and the gold output (if known)."""

    id: str
    input: str
    profile: tuple[ProfileItem, ...]
    gold: str | None = None


@dataclass
class LampSplit:
    """All queries of one task split, in file order."""

    task: str
    split: str
    queries: list[Query]
    questions_path: Path | None = None
    outputs_path: Path | None = None
    users: dict[str, list[Query]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.users:
            self.users = group_by_user(self.queries)

    @property
    def inputs(self) -> list[str]:
        return [q.input for q in self.queries]

    def users_asking(self, limit: int | None = None) -> dict[str, list[Query]]:
        """Each user's queries among the first ``limit`` of the split (all when None); users with none left out."""
        wanted = {q.id for q in self.queries[:limit]} if limit else None
        asked = {user: [q for q in queries if wanted is None or q.id in wanted]
                 for user, queries in self.users.items()}
        return {user: queries for user, queries in asked.items() if queries}


def group_by_user(queries: list[Query]) -> dict[str, list[Query]]:
    """Group queries whose profiles are identical (LaMP gives one profile per user), keyed by first query id."""
    users: dict[str, list[Query]] = {}
    owner: dict[tuple[str, ...], str] = {}
    for q in queries:
        key = tuple(item.id for item in q.profile) or (f"__query__{q.id}",)
        user_id = owner.setdefault(key, q.id)
        users.setdefault(user_id, []).append(q)
    return users


def read_json(path: Path) -> Any:
    """A JSON document, or a JSONL file (``.jsonl``: one JSON value per non-blank line) as a list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return [record for _, record in read_jsonl(path)]
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _text_field(value: Any, where: str, name: str) -> str:
    # LaMP-3 scores come as strings in the official files but numbers are harmless; anything else is a bug.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def parse_profile_item(raw: Any, task: str, where: str) -> ProfileItem:
    """Validate one profile item against ``task``'s fields."""
    spec = get_task(task)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: profile item must be an object, got {type(raw).__name__}")
    if "id" not in raw:
        raise DataError(f"{where}: profile item is missing field 'id'")
    item_where = f"{where}, profile item {raw['id']!r}"
    fields = {}
    for name in spec.profile_fields:
        if name not in raw:
            raise DataError(f"{item_where}: missing field {name!r} required by {spec.name}")
        fields[name] = _text_field(raw[name], item_where, name)
    date = raw.get("date")
    if date is not None:
        date = _text_field(date, item_where, "date")
    return ProfileItem(id=str(raw["id"]), fields=fields, date=date)


def parse_profile(raw: Any, task: str, where: str) -> tuple[ProfileItem, ...]:
    """Validate a list of profile items (a user's history)."""
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {type(raw).__name__}")
    return tuple(parse_profile_item(item, task, where) for item in raw)


def parse_questions(raw: Any, task: str, path: Path | str) -> list[tuple[str, str, tuple[ProfileItem, ...]]]:
    """Validate a questions document; returns ``(id, input, profile)`` per record."""
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of question records, got {type(raw).__name__}")
    records, seen = [], set()
    for index, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record #{index} must be an object, got {type(rec).__name__}")
        if "id" not in rec:
            raise DataError(f"{path}: record #{index} is missing field 'id'")
        qid = str(rec["id"])
        where = f"{path}: record {qid!r}"
        for name in ("input", "profile"):
            if name not in rec:
                raise DataError(f"{where}: missing field {name!r}")
        if qid in seen:
            raise DataError(f"{where}: duplicate id")
        seen.add(qid)
        records.append((qid, _input_field(rec["input"], task, where), parse_profile(rec["profile"], task, where)))
    return records


def _input_field(value: Any, task: str, where: str) -> str:
    """A query's input as the string it travels as: LaMP inputs are text; a custom task's may be an object of
    its input fields (kept as canonical JSON, read back by ``prisp.data.prompts.parse_input``)."""
    spec = get_task(task)
    if spec.input_format == "fields" and isinstance(value, dict):
        missing = [name for name in spec.input_fields if name not in value]
        if missing:
            raise DataError(f"{where}: input lacks field(s) {missing} required by {spec.name}")
        for name in spec.input_fields:
            _text_field(value[name], where, f"input.{name}")
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return _text_field(value, where, "input")


def _same_task(file_task: str, requested: str) -> bool:
    # Official LaMP v1 files name news categorization (our LaMP-2N) "LaMP_2", after its directory.
    spec = get_task(requested)
    official = normalize_task_name(spec.official_dir.split("/")[0]) if spec.official_dir else spec.name
    return file_task in (requested, official)


def parse_outputs(raw: Any, task: str | None, path: Path | str) -> tuple[str, dict[str, str]]:
    """Validate an outputs document; returns ``(canonical task, {id: output})``.

    Accepts the official spelling ``LaMP_4`` as well as ``LaMP-4``.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object with 'task' and 'golds', got {type(raw).__name__}")
    for name in ("task", "golds"):
        if name not in raw:
            raise DataError(f"{path}: missing field {name!r}")
    try:
        file_task = normalize_task_name(raw["task"])
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if task is not None and not _same_task(file_task, normalize_task_name(task)):
        raise DataError(f"{path}: file is for {raw['task']!r}, but task {normalize_task_name(task)!r} was requested")
    if not isinstance(raw["golds"], list):
        raise DataError(f"{path}: field 'golds' must be a list")
    outputs: dict[str, str] = {}
    for index, rec in enumerate(raw["golds"]):
        if not isinstance(rec, dict) or "id" not in rec or "output" not in rec:
            raise DataError(f"{path}: golds entry #{index} must be an object with 'id' and 'output'")
        qid = str(rec["id"])
        if qid in outputs:
            raise DataError(f"{path}: golds entry {qid!r}: duplicate id")
        outputs[qid] = _text_field(rec["output"], f"{path}: golds entry {qid!r}", "output")
    return file_task, outputs


def load_split(questions_path: Path | str, outputs_path: Path | str | None, task: str,
               split: str = "custom") -> LampSplit:
    """Load and validate one split from explicit file paths.

    Args:
        questions_path: the ``*_questions.json`` file.
        outputs_path: the ``*_outputs.json`` file, or ``None`` for a split without golds (LaMP test).
        task: any accepted spelling of the task name.
        split: a label kept on the result.

    Raises:
        DataError: naming the file, record id and field of the first problem.
    """
    task = normalize_task_name(task)
    questions_path = Path(questions_path)
    records = parse_questions(read_json(questions_path), task, questions_path)
    golds: dict[str, str] = {}
    if outputs_path is not None:
        outputs_path = Path(outputs_path)
        _, golds = parse_outputs(read_json(outputs_path), task, outputs_path)
        for qid, _, _ in records:
            if qid not in golds:
                raise DataError(f"{questions_path}: query {qid!r} has no gold in {outputs_path}")
    queries = [Query(qid, text, profile, golds.get(qid)) for qid, text, profile in records]
    return LampSplit(task, split, queries, questions_path, Path(outputs_path) if outputs_path else None)


def split_paths(data_dir: Path | str, task: str, split: str) -> tuple[Path, Path]:
    """Find ``{split}_questions.json``/``{split}_outputs.json`` under ``data_dir``.

    Accepted layouts: ``DIR/LaMP-4/``, ``DIR/LaMP_4/``, the official ``DIR/LaMP_4/dev/`` and ``DIR`` itself.
    """
    spec = get_task(task)
    root = Path(data_dir)
    underscored = spec.name.replace("-", "_")
    candidates = [root / spec.name, root / underscored, *([root / spec.official_dir / split] if spec.official_dir
                                                          else []), root / underscored / split, root]
    for folder in candidates:
        questions = folder / f"{split}_questions.json"
        if questions.is_file():
            return questions, folder / f"{split}_outputs.json"
    raise DataError(f"no {split}_questions.json for {spec.name} under {root} "
                    f"(looked in {', '.join(str(c) for c in candidates)})")


def load_task_split(data_dir: Path | str, task: str, split: str, require_golds: bool = True) -> LampSplit:
    """Load ``task``/``split`` from a data directory in any accepted layout.

    A derived task (LongLaMP-2) reads its own files where ``prisp data derive`` wrote them (``DIR/<name>/``);
    otherwise it is built from its source task's split in the same directory, whose golds (the derived inputs)
    are therefore required.
    """
    spec = get_task(task)
    if spec.derived_from and not (Path(data_dir) / spec.name / f"{split}_questions.json").is_file():
        return derive_split(spec, load_task_split(data_dir, spec.derived_from, split, require_golds=True))
    questions, outputs = split_paths(data_dir, task, split)
    if not outputs.is_file():
        if require_golds:
            raise DataError(f"file not found: {outputs} (golds for {questions})")
        return load_split(questions, None, task, split)
    return load_split(questions, outputs, task, split)


def load_history(path: Path | str, task: str) -> tuple[ProfileItem, ...]:
    """Load one user's history: a JSON list of items with the task's fields, or a JSONL file of them."""
    path = Path(path)
    return parse_profile(read_json(path), normalize_task_name(task), str(path))


# ---- derived tasks (``[derived]`` in a spec): LongLaMP-2's abstracts from LaMP-5's records -------------------
# The derived split keeps the source's users, query ids, histories and split; only each query's input fields and
# gold are re-made from templates over the source query's parsed input fields and its gold (``{output}``).
def derive_split(spec: TaskSpec, source: LampSplit) -> LampSplit:
    """``source`` (a split of ``spec.derived_from``) as a split of ``spec``.

    Raises:
        DataError: a source query whose input does not parse or has no gold, a template naming a field the
            source does not have, or history items lacking one of ``spec``'s history fields.
    """
    source_spec = get_task(source.task)
    queries = []
    for query in source.queries:
        where = f"{source.questions_path or source.task}: record {query.id!r}"
        parsed = parse_input(source_spec, query.input)
        if not parsed.parsed or query.gold is None:
            raise DataError(f"{where}: {spec.name} is built from {source_spec.name} queries with a parseable input "
                            "and a gold; this one has " + ("no gold" if parsed.parsed else "an unparseable input"))
        values = {**parsed.fields, "output": query.gold}
        inputs = {name: _fill(spec, template, values, where) for name, template in spec.derived_inputs}
        gold = _fill(spec, spec.derived_answer, values, where)
        profile = tuple(_item(spec, item, where) for item in query.profile)
        queries.append(Query(query.id, json.dumps(inputs, ensure_ascii=False, sort_keys=True), profile, gold))
    return LampSplit(spec.name, source.split, queries, source.questions_path, source.outputs_path)


def _fill(spec: TaskSpec, template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except KeyError as exc:
        raise DataError(f"{spec.source} [derived]: {{{exc.args[0]}}} is not a field of {spec.derived_from} "
                        f"queries (have {', '.join(sorted(values))}; at {where})") from None


def _item(spec: TaskSpec, item: ProfileItem, where: str) -> ProfileItem:
    missing = [name for name in spec.profile_fields if name not in item.fields]
    if missing:
        raise DataError(f"{where}, profile item {item.id!r}: {spec.derived_from} history items lack field(s) "
                        f"{missing} that {spec.name} needs")
    return ProfileItem(item.id, {name: item.fields[name] for name in spec.profile_fields}, item.date)


def split_documents(split: LampSplit) -> tuple[list[dict], dict]:
    """A split as the LaMP files' two documents: the questions list and the outputs object."""
    questions = [{"id": q.id, "input": json.loads(q.input) if q.input.startswith("{") else q.input,
                  "profile": [item.to_json() for item in q.profile]} for q in split.queries]
    outputs = {"task": split.task, "golds": [{"id": q.id, "output": q.gold} for q in split.queries]}
    return questions, outputs

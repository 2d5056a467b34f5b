"""Multi-task SNI data for the hypernetwork: typed records, checksum, and (description, example) pairs.

``tasks.jsonl`` (see ``shared/data/sni/README.md``) holds one task per line with its paraphrased
descriptions, its SNI definition and a few real instances. Every description (the definition counts as
one more) gets a row in a description table; a training example is one instance plus the row of a
description drawn at random for it (seeded, and drawn afresh for each epoch).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from prisp.data.examples import Example
from prisp.errors import DataError
from prisp.files import read_jsonl

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SniInstance:
    input: str
    output: str


@dataclass(frozen=True)
class SniTask:
    """One SNI task.

    Attributes:
        name: e.g. ``task1310_amazonreview_rating_classification``.
        split: ``train`` or ``heldout``.
        descriptions: Paraphrased descriptions, then the SNI definition when there is one.
        eval_descriptions: Descriptions reserved for evaluation (may be empty).
        instances: Real input/output pairs.
    """

    name: str
    split: str
    descriptions: tuple[str, ...]
    instances: tuple[SniInstance, ...]
    eval_descriptions: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def eval_description(self) -> str:
        """The description used for held-out metrics: the first reserved one, else the first paraphrase."""
        return self.eval_descriptions[0] if self.eval_descriptions else self.descriptions[0]


@dataclass
class SniData:
    """All tasks of a ``tasks.jsonl`` file, with its sha256."""

    tasks: list[SniTask]
    sha256: str
    path: str = ""

    def split(self, name: str) -> list[SniTask]:
        return [t for t in self.tasks if t.split == name]


@dataclass
class DescribedExample:
    """An instance paired with one description of its task.

    Attributes:
        task: Task name.
        row: Index of the description in the :class:`DescriptionTable`.
        example: The prompt/answer pair (prompt = the instance input alone; the task lives in the LoRA).
    """

    task: str
    row: int
    example: Example


@dataclass
class DescriptionTable:
    """Every description, flat: ``texts[row]`` belongs to task ``tasks[row]``; ``rows[task]`` lists its rows."""

    texts: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, task: str, text: str) -> int:
        self.texts.append(text)
        self.tasks.append(task)
        self.rows.setdefault(task, []).append(len(self.texts) - 1)
        return len(self.texts) - 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _strings(value, where: str, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{where}: {key} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise DataError(f"{where}: {key} is empty")
    return tuple(value)


def parse_task(record, where: str) -> SniTask:
    """Validate one JSON record.

    Raises:
        DataError: One line naming ``where`` and the problem.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("task", "split", "descriptions", "instances"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
    name = record["task"]
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: task must be a non-empty string")
    if record["split"] not in SPLITS:
        raise DataError(f"{where}: split must be one of {SPLITS}, got {record['split']!r}")
    descriptions = _strings(record["descriptions"], where, "descriptions")
    definition = record.get("definition")
    if definition is not None:
        if not isinstance(definition, str):
            raise DataError(f"{where}: definition must be a string or null")
        if definition.strip():
            descriptions += (definition,)
    instances = record["instances"]
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{where}: instances must be a non-empty list")
    parsed = []
    for i, inst in enumerate(instances):
        # An empty output is legitimate (e.g. "no alphabetical elements"); the answer is then just EOS.
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not inst["input"].strip() \
                or not isinstance(inst.get("output"), str):
            raise DataError(f"{where}: instance {i} needs a non-empty string input and a string output")
        parsed.append(SniInstance(input=inst["input"], output=inst["output"]))
    return SniTask(
        name=name, split=record["split"], descriptions=descriptions, instances=tuple(parsed),
        eval_descriptions=_strings(record.get("eval_descriptions") or [], where, "eval_descriptions", True),
        categories=tuple(record.get("categories") or ()), flags=tuple(record.get("flags") or ()),
    )


def load_sni(path: str | os.PathLike) -> SniData:
    """Read and validate ``tasks.jsonl``.

    Raises:
        DataError: Missing file, bad JSON, a malformed record or a duplicate task (one line, with the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SNI task file {path} does not exist (set --data or $PRISP_SNI)")
    tasks: list[SniTask] = []
    seen: set[str] = set()
    for where, record in read_jsonl(path):
        task = parse_task(record, where)
        if task.name in seen:
            raise DataError(f"{where}: duplicate task {task.name}")
        seen.add(task.name)
        tasks.append(task)
    if not tasks:
        raise DataError(f"SNI task file {path} holds no tasks")
    return SniData(tasks=tasks, sha256=file_sha256(path), path=str(path))


def description_table(tasks: list[SniTask]) -> DescriptionTable:
    """All training descriptions of ``tasks`` (paraphrases + definition) and each one's eval description."""
    table = DescriptionTable()
    for task in tasks:
        for text in task.descriptions:
            table.add(task.name, text)
    return table


def described_examples(tasks: list[SniTask], table: DescriptionTable, seed: int) -> list[DescribedExample]:
    """One example per instance, each with a description row drawn at random from its task (seeded)."""
    rng = random.Random(seed)
    out = []
    for task in tasks:
        rows = table.rows[task.name]
        for inst in task.instances:
            out.append(DescribedExample(task=task.name, row=rng.choice(rows),
                                        example=Example(prompt=inst.input, answer=inst.output)))
    return out

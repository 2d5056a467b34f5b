"""The users of a batch: read from a LaMP questions file or a JSON-lines file, one job each.

A broken *file* (not JSON, a record without an id) stops the run with one line. A broken *user*
(a malformed history item, an empty history, an id that cannot name a directory) only marks that
user's job as failed, so one bad record among thousands does not block the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prisp.data.lamp import ProfileItem, Query, group_by_user, parse_profile, read_json
from prisp.data.tasks import label_set, normalize_task_name
from prisp.errors import DataError
from prisp.files import read_jsonl

# Ids become store directories and vLLM adapter names: no separators, no leading dot, bounded length.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,127}$")
# File names a store or an export keeps beside the per-user directories.
RESERVED_IDS = frozenset({"results.jsonl", "lora_modules.txt", "lora_modules.json"})


@dataclass(frozen=True)
class UserJob:
    """One user's personalization job.

    Attributes:
        user_id: the job's key (LaMP: the user's first query id).
        items: the validated history (empty when ``error`` is set).
        error: why the user cannot be personalized at all, found while reading; None if fine.
    """

    user_id: str
    items: tuple[ProfileItem, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class UserSet:
    """All users of a batch plus the task's label set (LaMP-2N reads it from the questions)."""

    task: str
    jobs: list[UserJob]
    labels: tuple[str, ...]
    source: Path


def load_users(path: str | Path, task: str) -> UserSet:
    """Read the users of ``path``: a LaMP questions file (JSON list) or JSON lines of ``{user_id, items}``.

    Raises:
        DataError: the file is missing or structurally broken (one line naming it).
    """
    path = Path(path)
    task = normalize_task_name(task)
    if not path.is_file():
        raise DataError(f"users file not found: {path}")
    if _first_char(path) == "[":
        jobs, inputs = _questions_jobs(read_json(path), task, path)
    else:
        jobs, inputs = _jsonl_jobs(path, task), []
    if not jobs:
        raise DataError(f"{path}: holds no users")
    return UserSet(task, jobs, label_set(task, inputs), path)


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip()[0]
    return ""


def _job(user_id: str, raw_items: Any, task: str, where: str) -> UserJob:
    """Validate one user; problems become the job's error instead of an exception."""
    if not _SAFE_ID.match(user_id) or user_id in RESERVED_IDS:
        return UserJob(user_id, error=f"{where}: user id {user_id!r} cannot name a directory "
                                      "(use letters, digits and . _ @ + -)")
    if not isinstance(raw_items, list):
        return UserJob(user_id, error=f"{where}: the history must be a list of items, got {type(raw_items).__name__}")
    try:
        items = parse_profile(raw_items, task, where)
    except DataError as exc:
        return UserJob(user_id, error=str(exc))
    if not items:
        return UserJob(user_id, error=f"{where}: the user's history is empty; personalization needs at "
                                      "least one item")
    return UserJob(user_id, items)


def _questions_jobs(raw: Any, task: str, path: Path) -> tuple[list[UserJob], list[str]]:
    """Users of a LaMP questions file: queries grouped by identical profiles, keyed by the first query id."""
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of question records, got {type(raw).__name__}")
    good: list[Query] = []
    broken: dict[str, UserJob] = {}
    inputs = []
    for index, rec in enumerate(raw):
        if not isinstance(rec, dict) or "id" not in rec:
            raise DataError(f"{path}: record #{index} must be an object with an 'id'")
        qid = str(rec["id"])
        inputs.append(str(rec.get("input", "")))
        job = _job(qid, rec.get("profile"), task, f"{path}: record {qid!r}")
        if job.error:
            # The same bad profile repeated over a user's queries is one failed user, not many.
            broken.setdefault(json.dumps(rec.get("profile"), sort_keys=True, default=str), job)
        else:
            good.append(Query(qid, inputs[-1], job.items))
    jobs = [UserJob(user_id, queries[0].profile) for user_id, queries in group_by_user(good).items()]
    return jobs + list(broken.values()), inputs


def _jsonl_jobs(path: Path, task: str) -> list[UserJob]:
    """Users of a JSON-lines file, one ``{"user_id": ..., "items": [...]}`` per line."""
    jobs: dict[str, UserJob] = {}
    for where, rec in read_jsonl(path):
        if not isinstance(rec, dict) or "user_id" not in rec:
            raise DataError(f"{where}: expected an object with 'user_id' and 'items'")
        user_id = str(rec["user_id"])
        if user_id in jobs:
            raise DataError(f"{where}: duplicate user_id {user_id!r}")
        jobs[user_id] = _job(user_id, rec.get("items"), task, f"{where} (user {user_id!r})")
    return list(jobs.values())

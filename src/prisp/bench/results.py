"""Benchmark results: one JSON line per (method, variant, task, items, users), appended as each finishes.

A row is identified by its grid cell plus the run's model, protocol and split, so a rerun into the same
directory skips what is done and a different model or protocol adds its own rows beside them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

RESULTS_NAME = "results.jsonl"
KEY_FIELDS = ("model", "protocol", "split", "decode", "schedule", "task", "method", "variant", "items", "users")
# Rows written before label decoding and Stage-2 schedules existed were all free decoding at Table 7's schedule.
KEY_DEFAULTS = {"decode": "free", "schedule": "paper"}


@dataclass(frozen=True)
class Cell:
    """One grid cell: a method under a prompt variant with ``items`` user items and ``users`` target users."""

    task: str
    method: str
    variant: str
    items: int  # 0: the whole history
    users: int | None  # requested target users (None: all)


def row_key(row: dict) -> tuple:
    """The identity of a result row."""
    return tuple(row.get(name, KEY_DEFAULTS.get(name)) for name in KEY_FIELDS)


class ResultStore:
    """The ``results.jsonl`` of a run directory."""

    def __init__(self, out_dir: Path | str):
        self.path = Path(out_dir) / RESULTS_NAME
        self._rows = self._read()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write is redone, not trusted
        return rows

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def has(self, key: tuple) -> bool:
        return any(row_key(row) == key for row in self._rows)

    def append(self, row: dict) -> None:
        """Add a row durably (one line, flushed and synced) unless its key is already present."""
        if self.has(row_key(row)):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash can leave a partial last line; start on a fresh line so the new row stays readable.
        prefix = (
            "\n"
            if self.path.is_file() and self.path.stat().st_size and not _ends_with_newline(self.path)
            else ""
        )
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(prefix + json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._rows.append(row)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def git_revision(start: Path | None = None) -> str | None:
    """The commit checked out in the repository holding ``start`` (read from ``.git``), or None."""
    here = (start or Path(__file__)).resolve()
    for folder in [here, *here.parents]:
        dot_git = folder / ".git"
        if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            dot_git = (
                (folder / text.split(":", 1)[1].strip()).resolve() if text.startswith("gitdir:") else dot_git
            )
        if dot_git.is_dir():
            return _resolve_head(dot_git)
    return None


def _resolve_head(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    common = git_dir / "commondir"
    roots = [git_dir] + ([(git_dir / common.read_text().strip()).resolve()] if common.is_file() else [])
    for root in roots:
        if (root / ref).is_file():
            return (root / ref).read_text().strip()
        packed = root / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(f" {ref}") and not line.startswith("#"):
                    return line.split(" ", 1)[0]
    return None

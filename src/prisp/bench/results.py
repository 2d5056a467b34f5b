"""Benchmark results: one JSON line per (method, variant, task, items, users), appended as each finishes.

A row is identified by its grid cell plus the run's model, protocol and split, so a rerun into the same
directory skips what is done and a different model or protocol adds its own rows beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prisp.files import JsonlLog

RESULTS_NAME = "results.jsonl"
KEY_FIELDS = ("model", "protocol", "split", "decode", "schedule", "task", "method", "variant", "items", "users",
              "source", "description")
# Rows written before label decoding and Stage-2 schedules existed were all free decoding at Table 7's schedule;
# rows before the cross-task analysis all used their own task's sharer pool.
KEY_DEFAULTS = {"decode": "free", "schedule": "paper", "source": "", "description": ""}


@dataclass(frozen=True)
class Cell:
    """One grid cell: a method under a prompt variant with ``items`` user items and ``users`` target users."""

    task: str
    method: str
    variant: str
    items: int  # 0: the whole history
    users: int | None  # requested target users (None: all)
    source: str = ""  # sharer methods: the task whose sharer pool is reused (Figure 7); "": the cell's own task
    description: str = ""  # PRISP-anchored methods: the anchor's description wording (Figure 8); "": the reference


def row_key(row: dict) -> tuple:
    """The identity of a result row."""
    return tuple(row.get(name, KEY_DEFAULTS.get(name)) for name in KEY_FIELDS)


class ResultStore:
    """The ``results.jsonl`` of a run directory (a :class:`prisp.files.JsonlLog`: a row torn by a crash is
    redone, not trusted)."""

    def __init__(self, out_dir: Path | str):
        self._log = JsonlLog(Path(out_dir) / RESULTS_NAME)
        self.path = self._log.path
        self._rows = self._log.records()

    @property
    def rows(self) -> list[dict]:
        return list(self._rows)

    def has(self, key: tuple) -> bool:
        return any(row_key(row) == key for row in self._rows)

    def append(self, row: dict) -> None:
        """Add a row durably (one line, flushed and synced) unless its key is already present."""
        if self.has(row_key(row)):
            return
        self._log.append(row)
        self._rows.append(row)


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

"""Durable files: the one atomic write, the one directory swap, the one append-only JSONL log, and the one
strict reader of JSON-lines input files.

Every writer in prisp goes through here, so the crash guarantees are the same everywhere: a file or
directory is either the old one or the complete new one (temp sibling, fsync, rename, directory fsync),
and a log keeps every complete line while a line torn by a crash is skipped on read and never breaks
the next append.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from prisp.errors import DataError

TMP_PREFIX = ".tmp-"  # temporaries of write_atomic; a store's sweep may delete leftovers by this prefix


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (renames, unlinks); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents as 0700 folders (whatever the umask), each one's entry
    fsynced into its parent so a new folder survives a power cut with what is written into it."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
        fsync_dir(folder.parent)


def write_atomic(path: Path | str, data: bytes | str, private: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix.

    The bytes go to a temporary sibling, are fsynced, renamed over ``path`` (atomic on POSIX), and the
    directory is fsynced so the rename itself survives a power cut.

    Args:
        path: the file to (re)place; missing parent folders are created.
        data: bytes, or text written as UTF-8.
        private: the file is 0600 and new folders 0700 whatever the umask (secrets, users' data);
            otherwise both follow the umask like any other file.
    """
    path = Path(path)
    if private:
        make_private_dirs(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}-{path.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path | str, payload: object, private: bool = False) -> None:
    """``payload`` as indented UTF-8 JSON via :func:`write_atomic`; nothing is written if it does not
    serialise."""
    write_atomic(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n", private=private)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    restored on failure, so readers see the old directory or the new one. The parent is fsynced."""
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)  # only the unique name is wanted; rename needs the target absent
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Persist a file written by other code (a library's save, a streamed download) before renaming it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file below ``directory`` and the directories themselves (before swapping it in)."""
    for folder, _, names in os.walk(directory):
        for name in names:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


class JsonlLog:
    """An append-only log of JSON records, one per line.

    ``append`` writes one whole line and (by default) fsyncs it; a crash can only tear the line being
    written. Readers skip a line that is not a JSON object (the torn one), and the next ``append`` starts
    on a fresh line so it is never glued onto the torn one.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def append(self, record: dict, sync: bool = True) -> None:
        """Add ``record`` as one line; ``sync=False`` skips the fsync (per-step logs that may lose a tail)."""
        line = json.dumps(record, ensure_ascii=False, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            if handle.tell() and not self._ends_with_newline():
                line = "\n" + line
            handle.write(line.encode("utf-8"))
            handle.flush()
            if sync:
                os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def __iter__(self) -> Iterator[dict]:
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # torn by a crash mid-write: redone or dropped, never trusted
                if isinstance(record, dict):
                    yield record

    def records(self) -> list[dict]:
        """Every complete record, in order."""
        return list(self)

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the whole log atomically with ``records`` (e.g. dropping entries past a checkpoint)."""
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records)
        write_atomic(self.path, text)


def read_jsonl(path: Path | str) -> Iterator[tuple[str, object]]:
    """The records of a JSON-lines *input* file, each with its ``file:line`` for error messages; blank lines
    are skipped. Unlike a :class:`JsonlLog` (which a crash may tear and which skips what it cannot read), an
    input file is what its author wrote: a bad line is an error.

    Raises:
        DataError: the file is not UTF-8, or a line is not JSON (naming the file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None

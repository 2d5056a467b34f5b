"""The encrypted per-user adapter store: sealed files under a root directory, metadata in SQLite.

Layout::

    STORE/
      store.sqlite3            users (token hashes, wrapped data keys), adapters (versions, times, counts), meta
      LOCK                     held by the one process that writes (server or rotate-key)
      users/<user_id>/<task>.v<version>.adapter   sealed safetensors (see keys.py)

Envelope encryption: every user has their own random data key, which seals their adapters; the database
keeps it only wrapped by the store key (AES-GCM, bound to store and user id). Rotating the store key re-wraps
these 32-byte keys, never the adapters; deleting a user destroys their data key, so copies of their adapter
files left in backups can no longer be opened, even with the store key.

A save writes the new version's file atomically, then commits the row that points at it, then unlinks
the old file: a crash at any point leaves the previous version loadable, and :meth:`AdapterStore.recover`
sweeps what a crash left behind. The database never holds user text: only ids, counts and times.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from prisp.adapters import LoraWeights
from prisp.errors import AdapterError, PrispError
from prisp.faults import crash_point
from prisp.files import TMP_PREFIX, JsonlLog, fsync_dir, make_private_dirs, write_atomic
from prisp.serve.auth import valid_user_id
from prisp.serve.blobs import adapter_from_bytes, adapter_to_bytes
from prisp.serve.keys import (
    SealError,
    StoreKey,
    data_key_aad,
    generate_key,
    seal,
    slot_aad,
    unseal,
    unwrap_key,
    wrap_key,
)

DB_NAME = "store.sqlite3"
LOCK_NAME = "LOCK"
USERS_DIR = "users"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
    next_version INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS adapters (
    user_id TEXT NOT NULL REFERENCES users(user_id), task TEXT NOT NULL, version INTEGER NOT NULL,
    file TEXT NOT NULL, key_id TEXT NOT NULL, base_model TEXT NOT NULL, strategy TEXT NOT NULL,
    items INTEGER NOT NULL, total_items INTEGER NOT NULL, updates INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (user_id, task));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, task TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, adapter_version INTEGER, error TEXT);
"""
def batch_ledger_path(root: Path) -> Path:
    """Where ``prisp personalize-batch`` keeps its log for the store at ``root`` (beside it, not inside)."""
    return root.parent / f"{root.name}.batch" / "results.jsonl"


JOB_FIELDS = ("job_id", "user_id", "task", "kind", "status", "created_at", "started_at", "finished_at",
              "adapter_version", "error")


class UnknownUserError(PrispError):
    """The user does not exist (never created, or deleted)."""


class VersionConflictError(PrispError):
    """The adapter changed between reading it and saving its successor."""


@dataclass(frozen=True)
class AdapterRecord:
    """Metadata of a user's current adapter for one task (no user text, by design)."""

    user_id: str
    task: str
    version: int
    file: str  # relative to the store root
    key_id: str
    base_model: str
    strategy: str
    items: int  # history items the latest training used
    total_items: int  # items over all trainings of this adapter (personalize + updates)
    updates: int  # continual updates since the last full personalization
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SaveRequest:
    """What to record beside a new adapter version."""

    user_id: str
    task: str
    base_model: str
    strategy: str
    items: int
    continues: int | None = None  # the version an update started from; None for a fresh personalization


class AdapterStore:
    """Users, token hashes and sealed adapters under one root. Thread-safe (one lock per store)."""

    def __init__(self, root: Path, key: StoreKey, *, writer: bool = True, rotating_to: str | None = None):
        """Open (creating if needed) the store at ``root``.

        Args:
            root: Store directory.
            key: The key the store is sealed with.
            writer: Take the exclusive ``LOCK`` and sweep crash leftovers (server, rotate-key); readers
                (export) skip both.
            rotating_to: Key id of an interrupted rotation that this open is allowed to resume.

        Raises:
            PrispError: Wrong key, interrupted rotation, store in use, or not a store directory.
        """
        self.root = Path(root)
        self.key = key
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        if writer:
            self._prepare_root()
            self._take_lock()
        elif not (self.root / DB_NAME).is_file():
            raise PrispError(f"{self.root} is not a prisp store (no {DB_NAME})")
        if writer:  # created private before SQLite opens it: its -wal and -shm files take the same mode
            os.close(os.open(self.root / DB_NAME, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.root / DB_NAME, 0o600)
        self._db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Deleted rows are overwritten with zeros, not left in free pages (erasure means erasure).
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(SCHEMA)
            self._add_columns()
            self.store_id = self._check_key(rotating_to)
            self._data_keys: dict[str, StoreKey] = {}
            if writer:
                self.recover()
                if rotating_to is None:
                    self._migrate_to_data_keys()
        except BaseException:
            self.close()  # a refused open must not keep the lock
            raise

    # ---- opening ----------------------------------------------------------------------------------------
    def _prepare_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise PrispError(f"store {self.root} exists and is not a directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / DB_NAME).exists():
            raise PrispError(f"store {self.root} is a non-empty directory without {DB_NAME}; pick an empty "
                             "or new directory")
        make_private_dirs(self.root / USERS_DIR)
        os.chmod(self.root, 0o700)  # an existing (e.g. pre-created, empty) root is made private too

    def _take_lock(self) -> None:
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PrispError(f"store {self.root} is in use by another prisp process (a server or "
                             "rotate-key); stop it first") from None
        self._lock_fd = fd

    def _add_columns(self) -> None:
        """Columns newer than a store's schema (stores written before envelope encryption)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(users)")}
        for column in ("data_key BLOB", "wrap_key_id TEXT"):
            if column.split()[0] not in have:
                self._db.execute(f"ALTER TABLE users ADD COLUMN {column}")

    def _check_key(self, rotating_to: str | None) -> str:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            store_id = uuid.uuid4().hex
            with self._transaction() as db:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("store_id", store_id),
                                                                   ("key_id", self.key.key_id)])
            return store_id
        if meta["key_id"] != self.key.key_id:
            raise PrispError(f"the store key (id {self.key.key_id}) does not open store {self.root} "
                             f"(sealed with key id {meta['key_id']})")
        pending = meta.get("rotating_to")
        if pending and pending != rotating_to:
            raise PrispError(f"store {self.root} has an interrupted key rotation to key id {pending}; rerun "
                             "`prisp serve rotate-key` with the same old and new keys to finish it")
        return meta["store_id"]

    def close(self) -> None:
        """Close the database and release the lock."""
        with self._lock:
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _transaction(self):
        return _Transaction(self._db)

    # ---- users ------------------------------------------------------------------------------------------
    def create_user(self, user_id: str, token_hash: str) -> None:
        """Record a new user by id and token hash."""
        if not valid_user_id(user_id):
            raise PrispError(f"invalid user id {user_id!r}")
        data_key = generate_key()
        wrapped = wrap_key(self.key, data_key, data_key_aad(self.store_id, user_id))
        with self._lock, self._transaction() as db:
            db.execute("INSERT INTO users (user_id, token_hash, created_at, data_key, wrap_key_id) VALUES "
                       "(?, ?, ?, ?, ?)", (user_id, token_hash, time.time(), wrapped, self.key.key_id))
            self._data_keys[user_id] = data_key

    def _data_key(self, user_id: str) -> StoreKey:
        """The user's data key, unwrapped with the store key (kept in memory while the store is open).

        Raises:
            UnknownUserError: no such user.
            SealError: a data key wrapped by another key (an unfinished rotation) or altered (fail closed).
        """
        with self._lock:
            if user_id in self._data_keys:
                return self._data_keys[user_id]
            row = self._db.execute("SELECT data_key, wrap_key_id FROM users WHERE user_id = ?",
                                   (user_id,)).fetchone()
            if row is None or row[0] is None:
                raise UnknownUserError(f"user {user_id} does not exist or has no data key")
            if row[1] != self.key.key_id:
                raise SealError(f"the data key of user {user_id} is wrapped with key id {row[1]}, not the "
                                "current key; finish `prisp serve rotate-key`")
            key = unwrap_key(self.key, row[0], data_key_aad(self.store_id, user_id), f"data key of {user_id}")
            self._data_keys[user_id] = key
            return key

    def token_hash(self, user_id: str) -> str | None:
        """The stored token hash of ``user_id``, or None for an unknown user."""
        with self._lock:
            row = self._db.execute("SELECT token_hash FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row[0] if row else None

    def user_for_token_hash(self, token_hash: str) -> str | None:
        """The user whose token hashes to ``token_hash``, or None."""
        with self._lock:
            row = self._db.execute("SELECT user_id FROM users WHERE token_hash = ?", (token_hash,)).fetchone()
        return row[0] if row else None

    def users(self) -> list[tuple[str, float]]:
        """Every user id with its creation time, oldest first (for the admin listing; no tokens)."""
        rows = self._db.execute("SELECT user_id, created_at FROM users ORDER BY created_at, user_id").fetchall()
        return [(row[0], float(row[1])) for row in rows]

    def size_of(self, record: AdapterRecord) -> int:
        """Bytes of a stored (sealed) adapter file; 0 when it is missing."""
        try:
            return (self.root / record.file).stat().st_size
        except OSError:
            return 0

    def user_exists(self, user_id: str) -> bool:
        """Whether ``user_id`` is a current user."""
        return self.token_hash(user_id) is not None

    # ---- job records (no items: only what GET /v1/jobs/{id} reports) -----------------------------------------
    def save_job(self, record: dict) -> None:
        """Insert or replace one job's record (the keys of ``JOB_FIELDS``)."""
        with self._lock, self._transaction() as db:
            db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(JOB_FIELDS)}) VALUES "
                       f"({', '.join('?' for _ in JOB_FIELDS)})", tuple(record[name] for name in JOB_FIELDS))

    def job_records(self) -> list[dict]:
        """Every kept job record, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs ORDER BY created_at").fetchall()
        return [dict(zip(JOB_FIELDS, row)) for row in rows]

    def prune_jobs(self, finished_before: float) -> int:
        """Drop the records of jobs that finished before ``finished_before`` (a timestamp)."""
        with self._lock, self._transaction() as db:
            return db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                              (finished_before,)).rowcount

    def fail_unfinished_jobs(self, reason: str) -> int:
        """Mark every queued or running job failed with ``reason`` (at start: their process is gone)."""
        with self._lock, self._transaction() as db:
            return db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? "
                              "WHERE status IN ('queued', 'running')", (reason, time.time())).rowcount

    def delete_user(self, user_id: str) -> bool:
        """Remove a user's rows and directory; False when there was no such user.

        Rows go first: a crash before the files are gone leaves unreferenced files, which
        :meth:`recover` removes, never a row pointing at nothing.
        """
        with self._lock:
            with self._transaction() as db:
                db.execute("DELETE FROM adapters WHERE user_id = ?", (user_id,))
                db.execute("DELETE FROM jobs WHERE user_id = ?", (user_id,))
                # The row holds the user's wrapped data key: deleting it is crypto-erasure of every copy of
                # their adapters (secure_delete zeroes the freed page; the checkpoint below clears the WAL).
                existed = db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount > 0
            self._data_keys.pop(user_id, None)
            crash_point("delete:rows-deleted")
            self._remove_user_dir(user_id)
            self._checkpoint()
            self._purge_ledger(user_id)
        return existed

    def _purge_ledger(self, user_id: str) -> None:
        """Drop the user's lines from a batch ledger beside the store (ids, job keys, timings of their runs)."""
        ledger = JsonlLog(batch_ledger_path(self.root))
        if ledger.path.is_file():
            records = ledger.records()
            kept = [r for r in records if r.get("user_id") != user_id]
            if len(kept) != len(records):
                ledger.rewrite(kept)

    def delete_adapters(self, user_id: str) -> int:
        """Remove every adapter of a user but keep the account; returns how many were removed."""
        with self._lock:
            records = self.adapters(user_id)
            with self._transaction() as db:
                db.execute("DELETE FROM adapters WHERE user_id = ?", (user_id,))
            self._remove_user_dir(user_id)
            self._checkpoint()
        return len(records)

    def _checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it, so old page images are gone too."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _remove_user_dir(self, user_id: str) -> None:
        if valid_user_id(user_id):  # never let a malformed id steer rmtree
            shutil.rmtree(self.root / USERS_DIR / user_id, ignore_errors=True)
            fsync_dir(self.root / USERS_DIR)

    # ---- adapters ---------------------------------------------------------------------------------------
    def adapters(self, user_id: str) -> list[AdapterRecord]:
        """The user's current adapters, by task."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE user_id = ? ORDER BY task",
                                    (user_id,)).fetchall()
        return [AdapterRecord(*row) for row in rows]

    def current(self, user_id: str, task: str) -> AdapterRecord | None:
        """The user's current adapter for ``task``, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE user_id = ? AND task = ?",
                                   (user_id, task)).fetchone()
        return AdapterRecord(*row) if row else None

    def save(self, request: SaveRequest, weights: LoraWeights) -> AdapterRecord:
        """Seal and store ``weights`` as the user's new current adapter for the task.

        Raises:
            UnknownUserError: The user does not exist (e.g. deleted while a job ran).
            VersionConflictError: ``request.continues`` is not the current version any more.
        """
        data = adapter_to_bytes(weights)
        with self._lock:
            row = self._db.execute("SELECT next_version FROM users WHERE user_id = ?",
                                   (request.user_id,)).fetchone()
            if row is None:
                raise UnknownUserError(f"user {request.user_id} does not exist")
            old = self.current(request.user_id, request.task)
            if request.continues is not None and (old is None or old.version != request.continues):
                now = old.version if old else None
                raise VersionConflictError(f"adapter for {request.task} changed while updating (started from "
                                           f"version {request.continues}, now {now})")
            data_key = self._data_key(request.user_id)
            record = self._new_record(request, old, version=row[0], key_id=data_key.key_id)
            aad = slot_aad(self.store_id, request.user_id, request.task, record.version)
            write_atomic(self.root / record.file, seal(data_key, data, aad), private=True)
            crash_point("save:file-written")
            with self._transaction() as db:
                db.execute("UPDATE users SET next_version = ? WHERE user_id = ?", (record.version + 1,
                                                                                   request.user_id))
                db.execute(f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES ({_MARKS})", _values(record))
            crash_point("save:row-committed")
            if old is not None and old.file != record.file:
                (self.root / old.file).unlink(missing_ok=True)
                fsync_dir((self.root / old.file).parent)
        return record

    def _new_record(self, request: SaveRequest, old: AdapterRecord | None, version: int,
                    key_id: str) -> AdapterRecord:
        now = time.time()
        continued = request.continues is not None and old is not None
        return AdapterRecord(
            user_id=request.user_id, task=request.task, version=version,
            file=f"{USERS_DIR}/{request.user_id}/{request.task}.v{version}.adapter", key_id=key_id,
            base_model=request.base_model, strategy=request.strategy, items=request.items,
            total_items=request.items + (old.total_items if continued else 0),
            updates=(old.updates + 1) if continued else 0,
            created_at=old.created_at if old else now, updated_at=now,
        )

    def load(self, record: AdapterRecord) -> LoraWeights:
        """Decrypt and parse a stored adapter in memory.

        Raises:
            SealError: The file is missing, altered, moved from another slot or sealed with another key.
        """
        what = f"adapter of user {record.user_id} for {record.task} (version {record.version})"
        try:
            key = self._data_key(record.user_id)
        except UnknownUserError:
            key = None
        if key is None or record.key_id != key.key_id:
            if record.key_id != self.key.key_id:  # neither the user's data key nor a legacy store-key seal
                raise SealError(f"{what} is sealed with key id {record.key_id}, which this store key cannot "
                                "open; finish `prisp serve rotate-key`")
            key = self.key  # written before envelope encryption; a writer open migrates it
        try:
            blob = (self.root / record.file).read_bytes()
        except OSError:
            raise SealError(f"{what} is missing from the store; refusing to serve it") from None
        aad = slot_aad(self.store_id, record.user_id, record.task, record.version)
        try:
            return adapter_from_bytes(unseal(key, blob, aad, what), what)
        except SealError:
            raise
        except AdapterError as exc:  # authentic bytes that do not parse: still never served
            raise SealError(str(exc)) from None

    # ---- maintenance ------------------------------------------------------------------------------------
    def recover(self) -> list[Path]:
        """Remove what a crash can leave behind: temporary files, unreferenced versions, deleted users.

        Returns:
            The paths removed.
        """
        removed: list[Path] = []
        with self._lock:
            referenced = {row[0] for row in self._db.execute("SELECT file FROM adapters")}
            users = {row[0] for row in self._db.execute("SELECT user_id FROM users")}
            for user_dir in sorted((self.root / USERS_DIR).iterdir()):
                if user_dir.name not in users:
                    shutil.rmtree(user_dir, ignore_errors=True)
                    removed.append(user_dir)
                    continue
                for path in sorted(user_dir.iterdir()):
                    relative = f"{USERS_DIR}/{user_dir.name}/{path.name}"
                    if path.name.startswith(TMP_PREFIX) or relative not in referenced:
                        path.unlink(missing_ok=True)
                        removed.append(path)
        return removed

    def rotate_to(self, new_key: StoreKey) -> int:
        """Re-wrap every user's data key under ``new_key`` (adapters are not touched); resumable.

        Each user's row changes in its own transaction, so a rotation killed at any point leaves every user
        under the old or the new key (recorded per user); the store's key id moves last.

        Returns:
            How many data keys this call re-wrapped.
        """
        with self._lock:
            with self._transaction() as db:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('rotating_to', ?)", (new_key.key_id,))
            done = 0
            rows = self._db.execute("SELECT user_id, data_key, wrap_key_id FROM users WHERE data_key IS NOT NULL "
                                    "AND wrap_key_id != ?", (new_key.key_id,)).fetchall()
            for user_id, wrapped, wrap_key_id in rows:
                aad = data_key_aad(self.store_id, user_id)
                if wrap_key_id != self.key.key_id:
                    raise SealError(f"the data key of user {user_id} is wrapped with key id {wrap_key_id}, "
                                    "neither the old nor the new key")
                data_key = unwrap_key(self.key, wrapped, aad, f"data key of {user_id}")
                with self._transaction() as db:
                    db.execute("UPDATE users SET data_key = ?, wrap_key_id = ? WHERE user_id = ?",
                               (wrap_key(new_key, data_key, aad), new_key.key_id, user_id))
                done += 1
                crash_point("rotate:one-rewrapped")
            with self._transaction() as db:
                db.execute("UPDATE meta SET value = ? WHERE key = 'key_id'", (new_key.key_id,))
                db.execute("DELETE FROM meta WHERE key = 'rotating_to'")
            self._checkpoint()  # the old wrappings leave the write-ahead log too
            self.key = new_key
        return done

    def _migrate_to_data_keys(self) -> int:
        """Give users of a store written before envelope encryption a data key and re-seal their adapters under
        it, one atomic file at a time (resumable: a file already re-sealed is recognised). Returns the adapters
        re-sealed."""
        with self._lock:
            for (user_id,) in self._db.execute("SELECT user_id FROM users WHERE data_key IS NULL").fetchall():
                data_key = generate_key()
                with self._transaction() as db:
                    db.execute("UPDATE users SET data_key = ?, wrap_key_id = ? WHERE user_id = ?",
                               (wrap_key(self.key, data_key, data_key_aad(self.store_id, user_id)),
                                self.key.key_id, user_id))
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE key_id = ?", (self.key.key_id,))
            legacy = [AdapterRecord(*row) for row in rows.fetchall()]
            for record in legacy:
                data_key = self._data_key(record.user_id)
                self._reseal(record, self.key, data_key)
                with self._transaction() as db:
                    db.execute("UPDATE adapters SET key_id = ? WHERE user_id = ? AND task = ?",
                               (data_key.key_id, record.user_id, record.task))
        return len(legacy)

    def _reseal(self, record: AdapterRecord, old_key: StoreKey, new_key: StoreKey) -> None:
        aad = slot_aad(self.store_id, record.user_id, record.task, record.version)
        blob = (self.root / record.file).read_bytes()
        try:
            plain = unseal(old_key, blob, aad, record.file)
        except SealError:
            # Killed between this file's rename and its row update: already under the new key.
            unseal(new_key, blob, aad, record.file)
            return
        write_atomic(self.root / record.file, seal(new_key, plain, aad), private=True)


def finish_rotation(root: Path, previous: StoreKey, key: StoreKey) -> int | None:
    """Finish a key rotation from ``previous`` to ``key`` that was interrupted in the store at ``root``.

    Returns:
        The data keys re-wrapped now, or None when no rotation from ``previous`` to ``key`` is pending.
    """
    db = sqlite3.connect(Path(root) / DB_NAME)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:
        return None
    finally:
        db.close()
    if meta.get("key_id") != previous.key_id or meta.get("rotating_to") != key.key_id:
        return None
    with AdapterStore(Path(root), previous, rotating_to=key.key_id) as store:
        return store.rotate_to(key)


_FIELDS = list(AdapterRecord.__dataclass_fields__)
_COLUMNS = ", ".join(_FIELDS)
_MARKS = ", ".join("?" for _ in _FIELDS)


def _values(record: AdapterRecord) -> tuple:
    return tuple(getattr(record, name) for name in _FIELDS)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")

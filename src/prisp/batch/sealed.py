"""Batch output into the serving layer's encrypted adapter store, through its public API only.

The encrypted store (:mod:`prisp.serve.store`) knows the users the server issued (``u_<hex>`` ids with
bearer tokens) and keeps one current, sealed adapter per (user, task). It has no room for a batch's
job keys, so the batch keeps its log beside the store, in ``STORE.batch/results.jsonl``; each "done"
line names the job key and the adapter version it produced. A user counts as finished when the
store's current version for the task is still the version logged for the same job key, so an
adapter replaced through the HTTP API since (a continual update) is personalized again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prisp.adapters import LoraWeights
from prisp.batch.sink import AdapterSink, DirectoryStore, StoredAdapter
from prisp.errors import PrispError

_LOCATION = re.compile(r"/v(?P<version>\d+)$")


def is_sealed_store(root: str | os.PathLike) -> bool:
    """Whether ``root`` is an encrypted serving store (it has the store's database)."""
    return (Path(root) / "store.sqlite3").is_file()


def open_sealed_store(root: str | os.PathLike, task: str | None, key_file: str | os.PathLike | None,
                      writer: bool) -> SealedStoreSink:
    """Open the encrypted store at ``root`` for ``task``; the key comes from ``key_file`` or the environment."""
    from prisp.serve.keys import load_key

    if task is None:
        raise PrispError(f"{root} is an encrypted store, which keeps adapters per task: pass --task")
    return SealedStoreSink(root, load_key(Path(key_file) if key_file else None), task, writer)


class SealedStoreSink:
    """An :class:`~prisp.batch.sink.AdapterSink` and ``AdapterSource`` over :class:`prisp.serve.AdapterStore`.

    Args:
        root: the encrypted store directory.
        key: its :class:`prisp.serve.StoreKey`.
        task: the task whose adapters this batch writes or exports.
        writer: take the store's lock (a batch run); False for export, which only reads.
    """

    def __init__(self, root: str | os.PathLike, key, task: str, writer: bool = True) -> None:
        from prisp.serve.store import AdapterStore

        self.root = Path(root)
        self.task = task
        from prisp.serve.store import batch_ledger_path

        self.ledger_store = DirectoryStore(batch_ledger_path(self.root).parent)
        # A writer open fails with one line while a server holds the store: they must not both write.
        self.store = AdapterStore(self.root, key, writer=writer)
        self._ledger = self._read_ledger()

    @property
    def log_path(self) -> Path:
        return self.ledger_store.log_path

    def _read_ledger(self) -> dict[str, tuple[str, int]]:
        """``{user_id: (job key, adapter version)}`` from the "done" lines of earlier runs."""
        ledger = {}
        for record in self.ledger_store.read_log():
            match = _LOCATION.search(str(record.get("adapter", "")))
            if record.get("status") == "done" and record.get("job_key") and match:
                ledger[record["user_id"]] = (record["job_key"], int(match["version"]))
        return ledger

    def finished_key(self, user_id: str) -> str | None:
        entry = self._ledger.get(user_id)
        record = self.store.current(user_id, self.task) if entry else None
        return entry[0] if record is not None and record.version == entry[1] else None

    def put(self, user_id: str, weights: LoraWeights, base_model_name: str, report: dict) -> str:
        """Seal the adapter as the user's current one for the task.

        Raises:
            UnknownUserError: the user was never created by the server (ids are issued there).
        """
        from prisp.serve.store import SaveRequest

        request = SaveRequest(user_id=user_id, task=self.task, base_model=base_model_name,
                              strategy=str(report.get("strategy", "prisp")), items=len(report.get("items_used", [])))
        record = self.store.save(request, weights)
        self._ledger[user_id] = (report["job_key"], record.version)
        return f"{self.root}#{user_id}/{self.task}/v{record.version}"

    def log(self, record: dict) -> None:
        self.ledger_store.log(record)

    def user_ids(self) -> list[str]:
        """Users a batch personalized whose adapter for the task is still in the store."""
        return sorted(u for u in self._ledger if self.store.current(u, self.task) is not None)

    def get(self, user_id: str) -> StoredAdapter:
        record = self.store.current(user_id, self.task)
        if record is None:
            raise PrispError(f"store {self.root} has no {self.task} adapter for user {user_id!r}")
        return StoredAdapter(user_id, self.store.load(record), record.base_model,
                             {"version": record.version, "strategy": record.strategy})

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SealedStoreSink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_store(root: str | os.PathLike, task: str | None = None, key_file: str | os.PathLike | None = None,
               writer: bool = True) -> AdapterSink:
    """The store at ``root``: the serving layer's encrypted store when ``root`` is one, else a directory store.

    Args:
        root: store directory (created on the first write when it does not exist).
        task: the batch's task (an encrypted store keeps one adapter per user *and task*).
        key_file: the encrypted store's key file (default: ``$PRISP_STORE_KEY``); unused otherwise.
        writer: open the encrypted store for writing (takes its lock) rather than for export.

    Raises:
        PrispError: an encrypted store without a task or key, or one a server holds open.
    """
    if is_sealed_store(root):
        return open_sealed_store(root, task, key_file, writer)
    return DirectoryStore(root)

"""Where a batch puts its adapters: the ``AdapterSink`` interface and the plain directory store.

Layout of a :class:`DirectoryStore` (``STORE``)::

    STORE/<user_id>/adapter/adapter_config.json      a plain peft LoRA (bridge folded)
    STORE/<user_id>/adapter/adapter_model.safetensors
    STORE/<user_id>/adapter/personalization.json     the report, with the job key
    STORE/results.jsonl                              one line per run header and per user outcome

The interface is small on purpose, so the encrypted adapter store of the serving layer can take
the directory store's place without the batch runner changing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from prisp.adapters import CONFIG_NAME, LoraWeights, load_adapter
from prisp.errors import AdapterError, DataError
from prisp.files import JsonlLog
from prisp.personalize.cache import REPORT_NAME, save_personalized

LOG_NAME = "results.jsonl"


@dataclass(frozen=True)
class StoredAdapter:
    """One finished user read back from a store."""

    user_id: str
    weights: LoraWeights
    base_model_name: str
    report: dict


@runtime_checkable
class AdapterSink(Protocol):
    """What the batch runner needs from a store (single writer: only the driver process calls it)."""

    def finished_key(self, user_id: str) -> str | None:
        """The job key of the user's stored adapter, or None when the user has none."""

    def put(self, user_id: str, weights: LoraWeights, base_model_name: str, report: dict) -> str:
        """Store a finished user's adapter and report atomically; returns where it went."""

    def log(self, record: dict) -> None:
        """Append one record to the run log."""

    def close(self) -> None:
        """Release the store (locks, connections)."""


@runtime_checkable
class AdapterSource(Protocol):
    """What an exporter needs from a store."""

    def user_ids(self) -> list[str]:
        """Users with a finished adapter, sorted."""

    def get(self, user_id: str) -> StoredAdapter:
        """A finished user's adapter and report."""


class DirectoryStore:
    """A plain directory of per-user peft adapters plus a JSONL log (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def adapter_dir(self, user_id: str) -> Path:
        return self.root / user_id / "adapter"

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    def _report(self, user_id: str) -> dict | None:
        path = self.adapter_dir(user_id) / REPORT_NAME
        if not path.is_file() or not (path.parent / CONFIG_NAME).is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged report means "not finished": the user is simply redone

    def finished_key(self, user_id: str) -> str | None:
        report = self._report(user_id)
        return report.get("job_key") if report else None

    def put(self, user_id: str, weights: LoraWeights, base_model_name: str, report: dict) -> str:
        if user_id == LOG_NAME or "/" in user_id or user_id.startswith("."):
            raise AdapterError(f"user id {user_id!r} cannot name a directory in store {self.root}")
        out = save_personalized(weights, self.adapter_dir(user_id), base_model_name, report)
        return str(out)

    def log(self, record: dict) -> None:
        JsonlLog(self.log_path).append({"time": round(time.time(), 3), **record})

    def user_ids(self) -> list[str]:
        if not self.root.is_dir():
            raise DataError(f"adapter store {self.root} does not exist")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._report(p.name) is not None)

    def get(self, user_id: str) -> StoredAdapter:
        report = self._report(user_id)
        if report is None:
            raise AdapterError(f"store {self.root} has no finished adapter for user {user_id!r}")
        weights = load_adapter(self.adapter_dir(user_id))
        config = json.loads((self.adapter_dir(user_id) / CONFIG_NAME).read_text(encoding="utf-8"))
        return StoredAdapter(user_id, weights, str(config.get("base_model_name_or_path") or ""), report)

    def close(self) -> None:
        pass  # nothing held between calls

    def __enter__(self) -> DirectoryStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read_log(self) -> Iterator[dict]:
        """Records of ``results.jsonl`` in order; a torn last line (crash mid-write) is skipped."""
        return iter(JsonlLog(self.log_path))

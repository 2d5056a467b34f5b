"""Batch personalization of many users (local process pool or Ray) and export for vLLM serving.

Names are imported lazily so that ``prisp --help`` (which imports :mod:`prisp.batch.cli`) does not pay
for torch, transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backend": "prisp.batch.backends",
    "LocalBackend": "prisp.batch.backends",
    "RayBackend": "prisp.batch.backends",
    "make_backend": "prisp.batch.backends",
    "BACKENDS": "prisp.batch.config",
    "BatchConfig": "prisp.batch.config",
    "WorkerPlan": "prisp.batch.config",
    "available_cores": "prisp.batch.config",
    "user_seed": "prisp.batch.config",
    "ExportResult": "prisp.batch.export",
    "export_vllm": "prisp.batch.export",
    "BatchSummary": "prisp.batch.runner",
    "job_key": "prisp.batch.runner",
    "run_batch": "prisp.batch.runner",
    "SealedStoreSink": "prisp.batch.sealed",
    "is_sealed_store": "prisp.batch.sealed",
    "AdapterSink": "prisp.batch.sink",
    "AdapterSource": "prisp.batch.sink",
    "DirectoryStore": "prisp.batch.sink",
    "StoredAdapter": "prisp.batch.sink",
    "open_store": "prisp.batch.sealed",
    "UserJob": "prisp.batch.users",
    "UserSet": "prisp.batch.users",
    "load_users": "prisp.batch.users",
    "Assignment": "prisp.batch.worker",
    "UserOutcome": "prisp.batch.worker",
    "WorkerContext": "prisp.batch.worker",
    "WorkerSpec": "prisp.batch.worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prisp.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Serving personalized adapters: encrypted per-user store, HTTP API, per-user isolation.

Names are imported lazily so that ``prisp --help`` (which imports :mod:`prisp.serve.cli`) does not
pay for FastAPI, torch or cryptography.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "prisp.serve.app",
    "ServeConfig": "prisp.serve.config",
    "ServeLimits": "prisp.serve.config",
    "parse_anchor_option": "prisp.serve.config",
    "AdapterStore": "prisp.serve.store",
    "AdapterRecord": "prisp.serve.store",
    "SaveRequest": "prisp.serve.store",
    "StoreKey": "prisp.serve.keys",
    "SealError": "prisp.serve.keys",
    "generate_key": "prisp.serve.keys",
    "load_key": "prisp.serve.keys",
    "PrispService": "prisp.serve.service",
    "serve_app": "prisp.serve.cli",
}

__all__ = [
    "AdapterRecord",
    "AdapterStore",
    "PrispService",
    "SaveRequest",
    "SealError",
    "ServeConfig",
    "ServeLimits",
    "StoreKey",
    "create_app",
    "generate_key",
    "load_key",
    "parse_anchor_option",
    "serve_app",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prisp.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

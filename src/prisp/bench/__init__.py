"""The benchmark harness: the paper's method x variant x task grid -> results.jsonl -> report.md and figures.

Exports are imported lazily so that ``prisp.bench.cli`` (imported by the CLI at start-up) stays free of
torch/transformers until the command runs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ANCHOR_PROVIDERS": "prisp.bench.anchors",
    "Anchor": "prisp.bench.anchors",
    "AnchorProvider": "prisp.bench.anchors",
    "AnchorRequest": "prisp.bench.anchors",
    "TASK_DESCRIPTIONS": "prisp.bench.anchors",
    "hypernet_anchor": "prisp.bench.anchors",
    "PROFILES": "prisp.bench.config",
    "PROTOCOLS": "prisp.bench.config",
    "BenchConfig": "prisp.bench.config",
    "profile_config": "prisp.bench.config",
    "BENCH_METHODS": "prisp.bench.methods",
    "DEFAULT_METHODS": "prisp.bench.methods",
    "VARIANTS": "prisp.bench.methods",
    "BenchMethod": "prisp.bench.methods",
    "write_report": "prisp.bench.report",
    "ResultStore": "prisp.bench.results",
    "BenchOutcome": "prisp.bench.runner",
    "grid": "prisp.bench.runner",
    "run_bench": "prisp.bench.runner",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (lazy exports, as in prisp.hypernet)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prisp.bench' has no attribute {name!r}")

"""Where data is read from when no path is given: decided here, once, for every command and benchmark.

An explicit ``--data``/``--sni`` always wins. Otherwise ``$PRISP_DATA`` (LaMP-format directory) and
``$PRISP_SNI`` (the hypernetwork's ``tasks.jsonl``); otherwise the benchmark and hypernetwork training
look for the shared data beside the working directory (``../shared/data/...``, the layout of a checkout next
to ``shared/``), and every other command uses the small sample shipped inside the package. Paths are never
derived from where the package is installed, so an installed wheel behaves like an editable checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SHARED_DATA = Path("..") / "shared" / "data"


def default_data_dir(benchmark: bool = False, sample_if_missing: bool = False) -> Path:
    """The LaMP data directory to use: ``$PRISP_DATA``; else ``../shared/data/lamp-offline`` for the
    benchmark (``benchmark=True``), the packaged sample for everything else.

    ``sample_if_missing``: a benchmark that can also run small (its tests do) takes the packaged sample
    when the shared data is not there, instead of failing to find it.
    """
    if os.environ.get("PRISP_DATA"):
        return Path(os.environ["PRISP_DATA"])
    if not benchmark:
        return SAMPLE_DIR
    shared = SHARED_DATA / "lamp-offline"
    return SAMPLE_DIR if sample_if_missing and not shared.is_dir() else shared


def default_sni_file() -> Path:
    """The hypernetwork's training data: ``$PRISP_SNI``, else ``../shared/data/sni/tasks.jsonl``."""
    return Path(os.environ.get("PRISP_SNI") or SHARED_DATA / "sni" / "tasks.jsonl")

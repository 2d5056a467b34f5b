"""What every prisp command shares: one-line errors and the runtime set-up of torch/transformers.

Kept apart from ``prisp.cli`` so sub-apps (serve, hypernet, batch) can use it without importing the main app.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import typer

from prisp.errors import PrispError

EXIT_USER_ERROR = 2


def friendly(command: Callable) -> Callable:
    """Turn a :class:`PrispError` into one line on stderr and exit code 2 (no stack trace)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PrispError as exc:
            typer.echo(f"prisp: error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and warnings; prisp prints its own status lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def set_threads(threads: Optional[int]) -> None:
    """Apply ``--threads`` or ``$PRISP_THREADS`` (unset: torch's default)."""
    import torch

    threads = threads or int(os.environ.get("PRISP_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)

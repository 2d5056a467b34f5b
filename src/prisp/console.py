"""What every prisp command shares: one-line errors and the runtime set-up of torch/transformers.

Kept apart from ``prisp.cli`` so sub-apps (serve, hypernet, batch) can use it without importing the main app.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

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


SCHEDULE_HELP = "Stage-2 schedule: paper (Table 7) or tuned (searched on train users; bench/results/schedule_search.md)."
THREADS_HELP = ("torch CPU threads: a number, or 'auto' for every core this process may use "
                "[default: $PRISP_THREADS, else auto].")


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def resolve_threads(value: str | int | None) -> int:
    """The thread count ``--threads`` asks for: a positive number, or ``auto`` (every usable core).

    None falls back to ``$PRISP_THREADS`` and then to ``auto``: a process alone on the machine should use all of
    it, while pools and tests that share the cores pass their share explicitly.

    Raises:
        PrispError: neither a positive integer nor ``auto``.
    """
    if value is None:
        value = os.environ.get("PRISP_THREADS") or "auto"
    text = str(value).strip().lower()
    if text == "auto":
        return available_cores()
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise PrispError(f"--threads must be a positive integer or 'auto', got {value!r}")
    return threads


def set_threads(value: str | int | None) -> int:
    """Apply ``--threads`` (see :func:`resolve_threads`) to torch; returns the count now in force."""
    import torch

    threads = resolve_threads(value)
    torch.set_num_threads(threads)
    return threads

"""Named crash points for the kill tests (``tests/test_kill.py``, ``bench/reliability.py``).

``crash_point(name)`` does nothing unless ``$PRISP_FAULT`` names it; then the process SIGKILLs itself right
there, exactly as a power cut or the OOM killer would stop it at that line. Never set it in production.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "PRISP_FAULT"
# The points, in the order an operation reaches them (the names the harness may ask for).
POINTS = (
    "save:file-written",  # a new adapter version's file is on disk, its row not yet committed
    "save:row-committed",  # the row points at the new file, the old version's file not yet removed
    "delete:rows-deleted",  # a user's rows (and data key) are gone, their files not yet removed
    "job:running",  # a personalization job has started training
    "rotate:one-rewrapped",  # key rotation has re-wrapped the first user's data key
)


def crash_point(name: str) -> None:
    """Die here if ``$PRISP_FAULT`` is ``name`` (a kill test's chosen point)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

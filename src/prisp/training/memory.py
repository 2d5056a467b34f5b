"""Peak memory over a block of work, measured one way for every method (the loop, sharers, PriME's search):
resident set size sampled by a daemon thread, the process's high-water mark, and CUDA's peak statistics."""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch


def current_rss_mb() -> float | None:
    """Resident set size now, from /proc (Linux); None where unavailable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryMonitor:
    """Peak memory over a block: sampled RSS in a daemon thread, CUDA peak stats."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.baseline = self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prisp-rss-sampler", daemon=True)

    def sample(self) -> None:
        rss = current_rss_mb()
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemoryMonitor:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = current_rss_mb()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, float | None]:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cuda = self.device.type == "cuda"
        return {
            "peak_rss_mb": self.peak,
            "peak_rss_delta_mb": None if self.peak is None else self.peak - self.baseline,
            # ru_maxrss is in bytes on macOS, KiB on Linux.
            "process_peak_rss_mb": maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10,
            "peak_cuda_mb": torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None,
        }

"""Memory of an export: resident set size at stage boundaries, and handing freed memory back.

Figures come from the kernel (``/proc/self/status``: VmRSS now, VmHWM the peak so far), the
same numbers ``getrusage`` reports as ``ru_maxrss``; elsewhere only the peak is known.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS so far) of this process in MB (MiB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
        return peak_mb, peak_mb


class StageMemory:
    """``mark(stage)`` at the end of each stage; ``summary()`` -> {stage: {rss_mb, peak_mb}}."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    def mark(self, stage: str) -> None:
        rss, peak = rss_mb()
        self.stages[stage] = {"rss_mb": round(rss, 1), "peak_mb": round(peak, 1)}

    def summary(self) -> dict:
        return {k: dict(v) for k, v in self.stages.items()}


def release_memory(collect: bool = True) -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), after collecting garbage."""
    if collect:  # ~0.1 s with torch loaded: once per stage, not once per piece
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass

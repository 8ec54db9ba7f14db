"""Memory of an export: resident set size at stage boundaries, and handing freed memory back.

The figures are ``tinyv.engine.memory.rss_mb``'s: the kernel's RSS now and the peak so far.
"""
from __future__ import annotations

import ctypes
import gc

from tinyv.engine.memory import rss_mb


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

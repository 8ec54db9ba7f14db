"""This process's resident memory (RSS) in MiB, as the kernel reports it."""
from __future__ import annotations

import sys


def rss_mb() -> tuple[float, float]:
    """(RSS now, peak RSS so far) in MiB.

    Both come from one read of ``/proc/self/status`` (VmRSS, VmHWM), so the first never exceeds
    the second (``getrusage`` is read through other counters and can lag VmRSS by a few pages).
    Where there is no ``/proc``, ``getrusage``'s peak stands in for both.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmHWM:")))
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource  # not on Windows: imported only where /proc is missing

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
        return peak_mb, peak_mb


def peak_rss_mb() -> float:
    """The most this process has held resident so far, in MiB."""
    return rss_mb()[1]

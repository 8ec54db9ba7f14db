"""Memory figures of this process (for the bench, the export summary and each answer's timings)."""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024

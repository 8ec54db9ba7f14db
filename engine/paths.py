"""Where tinyv keeps its files, and whether it can write there."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """tinyv's cache folder: $TINYV_CACHE, else $XDG_CACHE_HOME/tinyv, else ~/.cache/tinyv."""
    if os.environ.get("TINYV_CACHE"):
        return os.environ["TINYV_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinyv")


def folder_problem(folder: str) -> str | None:
    """Why files cannot be written under ``folder`` (None if they can), creating nothing: the
    nearest part of the path that exists must be a writable folder."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None

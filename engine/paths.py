"""Where tinyv keeps its files."""
import os


def cache_dir() -> str:
    """tinyv's cache folder: $TINYV_CACHE, else $XDG_CACHE_HOME/tinyv, else ~/.cache/tinyv."""
    if os.environ.get("TINYV_CACHE"):
        return os.environ["TINYV_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinyv")

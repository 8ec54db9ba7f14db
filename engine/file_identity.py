"""The sha256 of a file's bytes, hashed once and remembered while the file is unchanged.

The image-embedding cache files embeddings under the vision graph that made them. Naming the graph
by the sha256 *written in the manifest* let an altered ``vision.onnx`` of the same size file wrong
embeddings that the genuine bundle then reused; hashing gigabytes at every start is too slow. So the
bytes are hashed once and the result kept in a small stamp beside the cache, with the file's
(device, inode, size, mtime_ns, ctime_ns). Any write to the file changes its mtime and ctime (ctime
cannot be set back from user space, unlike mtime), and a replacement has a new inode, so a stamp
that still matches means the bytes are the ones hashed; anything else is hashed again.

Two guards keep a stamp from vouching for bytes it never saw (git's "racily clean" problem): the file
is stat-ed before and after hashing and the stamp is written only if nothing changed, and not while
the file's last change is within ``SETTLE_NS`` of now (a write within the same timestamp tick would
leave mtime and ctime as they were).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

SETTLE_NS = 2_000_000_000  # coarser than any file system's timestamp tick (FAT: 2 s)
_CHUNK = 1 << 22


def _identity(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _stamp_path(stamps: str, path: str) -> str:
    return os.path.join(stamps, hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json")


def read_stamp(stamp: str) -> dict | None:
    """A small JSON record written by ``write_stamp``; None if missing or damaged."""
    try:
        with open(stamp, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None  # none yet, or damaged: hash again


def write_stamp(stamp: str, data: dict) -> None:
    """Write the record atomically; one that cannot be written only costs a re-hash next time."""
    try:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(stamp), prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, stamp)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError:
        pass  # a stamp that cannot be written only means hashing again next time


def file_sha256(path: str, stamps: str | None = None) -> str:
    """sha256 of the file's bytes; with a ``stamps`` folder, read from a stamp that still matches
    the file, else hashed (and stamped when the file is settled)."""
    path = os.path.realpath(path)
    stamp = _stamp_path(stamps, path) if stamps else None
    before = _identity(os.stat(path))
    if stamp:
        known = read_stamp(stamp)
        if known and known.get("path") == path and {k: known.get(k) for k in before} == before:
            return known["sha256"]
    digest = _hash(path)
    after = _identity(os.stat(path))
    settled = time.time_ns() - max(after["mtime_ns"], after["ctime_ns"]) >= SETTLE_NS
    if stamp and after == before and settled:
        write_stamp(stamp, {"path": path, **after, "sha256": digest})
    return digest

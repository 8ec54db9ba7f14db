"""Image-embedding cache: image content -> embeddings, in memory (LRU) and on disk.

The key is the sha256 of the image's bytes (or of a PIL image's pixels), the vision graph's
identity (the sha256 of the bytes that run: ``file_identity.py``) and the pre-processing version,
so asking about the same photo again runs no vision work, and a different or altered bundle, or
another pre-processing, never reuses stale embeddings.

Disk entries are safetensors files carrying a checksum of their data, written to a temporary file
and renamed (atomic): a reader in another process sees a whole entry or none, and a corrupted or
truncated entry, or one of the wrong shape, is detected, dropped and recomputed. The folder is
kept under a size bound by removing the least recently used entries. A folder that cannot be used
is reported once (``report``) and the cache then lives in memory only.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from tinyv.engine.paths import folder_problem

PREPROCESS_VERSION = "blip2-eval-bicubic-v2"  # v2: 16-bit and float images scaled, not clipped
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MEMORY_ENTRIES = 64


def image_key(image, namespace: str) -> str:
    """Content hash of ``image`` (path, bytes or PIL image) within ``namespace``."""
    h = hashlib.sha256()
    h.update(f"{namespace}\0{PREPROCESS_VERSION}\0".encode())
    if isinstance(image, (bytes, bytearray)):
        h.update(b"bytes\0")
        h.update(image)
    elif isinstance(image, (str, os.PathLike)):
        from tinyv.engine.image import check_image

        check_image(image)  # a clear error for a missing, unreadable or too large file before hashing
        h.update(b"bytes\0")
        with open(image, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    else:
        from tinyv.engine.image import open_image

        img = open_image(image)
        h.update(f"pil\0{img.mode}\0{img.size}\0".encode())
        h.update(img.tobytes())
    return h.hexdigest()


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class EmbeddingCache:
    def __init__(self, folder: str | None, max_bytes: int = DEFAULT_MAX_BYTES, memory_entries: int = DEFAULT_MEMORY_ENTRIES,
                 report: Callable[[str], None] | None = None):
        """``folder=None``: memory only. ``report(line)`` is told once if the folder cannot be used
        (default: a RuntimeWarning)."""
        self.report = report or _warn
        self._write_failed = False
        problem = folder_problem(folder) if folder else None
        if problem:
            self.report(f"tinyv: the image cache {folder} cannot be used ({problem}); embeddings are kept in "
                        "memory only (set TINYV_CACHE to a writable folder)")
            folder = None
        self.folder = folder
        self.max_bytes = max_bytes
        self.memory_entries = memory_entries
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    # -- public ----------------------------------------------------------------------------------
    @property
    def stamp_folder(self) -> str | None:
        """Where file hashes are remembered (``file_identity.py``); None for a memory-only cache."""
        return os.path.join(self.folder, "files") if self.folder else None

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The entry, or None; one not of ``shape`` (float32) counts as damaged: dropped, None."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits["memory"] += 1
                return self._memory[key]
        t = self._read(key)
        if t is not None and shape is not None and (tuple(t.shape) != tuple(shape) or t.dtype != torch.float32):
            self.drop(key)  # well-formed but not what this model makes
            t = None
        if t is not None:
            self.hits["disk"] += 1
            self._remember(key, t)
            return t
        self.misses += 1
        return None

    def drop(self, key: str) -> None:
        """Forget one entry (memory and disk)."""
        with self._lock:
            self._memory.pop(key, None)
        if self.folder:
            try:
                os.remove(self._path(key))
            except OSError:
                pass

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float().contiguous()
        self._remember(key, value)
        self._write(key, value)

    # -- memory ----------------------------------------------------------------------------------
    def _remember(self, key: str, value: torch.Tensor) -> None:
        with self._lock:
            self._memory[key] = value
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_entries:
                self._memory.popitem(last=False)

    # -- disk ------------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], f"{key}.safetensors")

    def _read(self, key: str) -> torch.Tensor | None:
        if not self.folder:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            from safetensors.torch import load

            t = load(data)["embeds"]
            want = _metadata(data).get("sha256")
            if want != hashlib.sha256(t.numpy().tobytes()).hexdigest():
                raise ValueError("checksum mismatch")
        except Exception:  # corrupted or truncated entry: drop it, the caller recomputes
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # least-recently-used order for eviction
        except OSError:
            pass
        return t

    def _write(self, key: str, value: torch.Tensor) -> None:
        if not self.folder:
            return
        from safetensors.torch import save

        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            digest = hashlib.sha256(value.numpy().tobytes()).hexdigest()
            blob = save({"embeds": value}, metadata={"sha256": digest, "preprocess": PREPROCESS_VERSION})
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            self._evict()
        except OSError as e:  # a cache that cannot be written (read-only, full disk) is only a slower cache
            if not self._write_failed:
                self._write_failed = True
                self.report(f"tinyv: cannot write to the image cache {self.folder} ({e.strerror or e}); "
                            "embeddings are not saved for next time")

    def _evict(self) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in sorted(entries, key=lambda e: e[2]):
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)
                total -= size
            except OSError:
                pass

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, last use) of every disk entry."""
        out = []
        if not self.folder or not os.path.isdir(self.folder):
            return out
        for root, _, files in os.walk(self.folder):
            for name in files:
                if name.endswith(".safetensors") and not name.startswith(".tmp-"):
                    p = os.path.join(root, name)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    out.append((p, st.st_size, st.st_mtime))
        return out

    def info(self) -> dict:
        entries = self.entries()
        return {"folder": self.folder, "entries": len(entries), "bytes": sum(s for _, s, _ in entries),
                "max_bytes": self.max_bytes, "memory_entries": len(self._memory)}

    def clear(self) -> int:
        """Remove every entry (memory and disk); returns how many disk entries went."""
        with self._lock:
            self._memory.clear()
        n = 0
        for path, _, _ in self.entries():
            try:
                os.remove(path)
                n += 1
            except OSError:
                pass
        return n


def _metadata(blob: bytes) -> dict:
    import json
    import struct

    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {}) or {}


def default_cache_folder() -> str:
    from tinyv.engine.paths import cache_dir

    return os.path.join(cache_dir(), "embeddings")

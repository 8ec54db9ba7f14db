"""The image-embedding cache: keys, memory LRU, disk bound, corruption, atomicity, processes."""
import multiprocessing as mp
import os
import time

import pytest
import torch

import tinyv.engine.cache as cache_mod
from tinyv import TinyVError
from tinyv.engine.cache import EmbeddingCache, image_key


def _t(i, n=64):
    return torch.arange(n, dtype=torch.float32).view(1, 4, n // 4) * 0.5 + i


def _files(folder):
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files]
    return out


def _temps(folder):
    return [p for p in _files(folder) if os.path.basename(p).startswith(".tmp-")]


def _key(i):
    return f"{i:02x}" + "ab" * 31  # 64 hex chars like a sha256, spread over subfolders


# -- hits and misses -----------------------------------------------------------------------------

def test_hits_and_misses_memory_then_disk(tmp_path):
    c = EmbeddingCache(str(tmp_path / "emb"))
    assert c.get(_key(1)) is None and c.misses == 1
    c.put(_key(1), _t(1))
    assert torch.equal(c.get(_key(1)), _t(1)) and c.hits == {"memory": 1, "disk": 0}
    fresh = EmbeddingCache(str(tmp_path / "emb"))
    assert torch.equal(fresh.get(_key(1)), _t(1)) and fresh.hits == {"memory": 0, "disk": 1}
    assert torch.equal(fresh.get(_key(1)), _t(1)) and fresh.hits == {"memory": 1, "disk": 1}  # now remembered
    assert fresh.get(_key(2)) is None and fresh.misses == 1
    # stored as fp32 whatever came in; bf16 in, fp32 out
    c.put(_key(3), _t(3).to(torch.bfloat16))
    assert EmbeddingCache(str(tmp_path / "emb")).get(_key(3)).dtype == torch.float32


def test_memory_only_cache(tmp_path):
    c = EmbeddingCache(None)
    c.put(_key(1), _t(1))
    assert torch.equal(c.get(_key(1)), _t(1))
    assert c.entries() == [] and c.info()["entries"] == 0 and c.info()["memory_entries"] == 1
    c.drop(_key(1))
    assert c.get(_key(1)) is None


def test_memory_lru_bound(tmp_path):
    c = EmbeddingCache(None, memory_entries=3)
    for i in range(3):
        c.put(_key(i), _t(i))
    assert c.get(_key(0)) is not None  # 0 is now the most recent; 1 the least
    c.put(_key(3), _t(3))
    assert len(c._memory) == 3
    assert c.get(_key(1)) is None
    assert all(c.get(_key(i)) is not None for i in (0, 2, 3))
    # with a folder, what fell out of memory is still on disk
    d = EmbeddingCache(str(tmp_path / "emb"), memory_entries=2)
    for i in range(4):
        d.put(_key(i), _t(i))
    assert len(d._memory) == 2 and d.info()["entries"] == 4
    assert torch.equal(d.get(_key(0)), _t(0)) and d.hits["disk"] == 1


def test_disk_bound_evicts_least_recently_used(tmp_path):
    folder = str(tmp_path / "emb")
    c = EmbeddingCache(folder)
    c.put(_key(0), _t(0))
    size = c.entries()[0][1]
    c = EmbeddingCache(folder, max_bytes=3 * size + size // 2)  # room for three entries
    for i in (1, 2):
        c.put(_key(i), _t(i))
    # make the order explicit (file times can be coarser than this test is fast): 0 oldest
    now = time.time()
    for i, age in ((0, 300), (1, 200), (2, 100)):
        os.utime(c._path(_key(i)), (now - age, now - age))
    # reading 0 from disk (a fresh cache: not in memory) makes it the most recently used
    assert torch.equal(EmbeddingCache(folder).get(_key(0)), _t(0))
    c.put(_key(3), _t(3))  # over the bound: the least recently used (1) goes
    kept = {os.path.basename(p)[:64] for p, _, _ in c.entries()}
    assert kept == {_key(0), _key(2), _key(3)}
    assert c.info()["bytes"] <= c.max_bytes
    assert EmbeddingCache(folder).get(_key(1)) is None
    # one entry bigger than the whole bound does not stay
    small = EmbeddingCache(str(tmp_path / "small"), max_bytes=10)
    small.put(_key(9), _t(9))
    assert small.entries() == [] and torch.equal(small.get(_key(9)), _t(9))  # memory still has it


@pytest.mark.parametrize("damage", ["flip data", "flip header", "truncate", "empty"])
def test_corrupted_entry_detected_removed_and_restored(tmp_path, damage):
    folder = str(tmp_path / "emb")
    c = EmbeddingCache(folder)
    c.put(_key(5), _t(5))
    path = c._path(_key(5))
    data = bytearray(open(path, "rb").read())
    if damage == "flip data":
        data[-9] ^= 0x40  # inside the tensor bytes: only the checksum sees it
    elif damage == "flip header":
        data[12] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 17]
    else:
        data = b""
    open(path, "wb").write(bytes(data))
    fresh = EmbeddingCache(folder)
    assert fresh.get(_key(5)) is None
    assert fresh.misses == 1 and fresh.hits == {"memory": 0, "disk": 0}
    assert not os.path.exists(path)
    fresh.put(_key(5), _t(5))
    assert torch.equal(EmbeddingCache(folder).get(_key(5)), _t(5))


def test_writes_are_atomic_no_temp_files(tmp_path, monkeypatch):
    folder = str(tmp_path / "emb")
    c = EmbeddingCache(folder)
    for i in range(10):
        c.put(_key(i), _t(i))
    c.put(_key(3), _t(30))  # overwrite
    assert _temps(folder) == []
    assert all(p.endswith(".safetensors") for p in _files(folder)) and len(_files(folder)) == 10
    assert torch.equal(EmbeddingCache(folder).get(_key(3)), _t(30))
    # a write that fails half-way leaves the old entry and no temp file
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    c.report = lambda line: None  # what it says: test_unwritable_folder_is_only_a_slower_cache
    c.put(_key(4), _t(40))  # no exception: the cache is only a cache
    monkeypatch.undo()
    assert _temps(folder) == []
    assert torch.equal(EmbeddingCache(folder).get(_key(4)), _t(4))


# -- several processes ---------------------------------------------------------------------------

def _worker(folder, wid, rounds, barrier, results):
    """Write shared keys (same value in every process) and private ones, read everything back."""
    import torch

    from tinyv.engine.cache import EmbeddingCache

    bad = []
    barrier.wait()  # all four start together (torch is imported by then)
    for r in range(rounds):
        c = EmbeddingCache(folder, memory_entries=1)  # mostly disk reads
        for i in range(8):
            c.put(_key(i), _t(i))
            c.put(_key(100 + wid * 10 + i % 4), _t(1000 + wid * 10 + i % 4))
            k = (i + wid + r) % 8
            got = EmbeddingCache(folder).get(_key(k))
            if got is not None and not torch.equal(got, _t(k)):
                bad.append((r, i))
    results.put((wid, bad))


def test_four_processes_share_one_folder(tmp_path):
    folder = str(tmp_path / "emb")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(folder, w, 4, barrier, results)) for w in range(4)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert got == {0: [], 1: [], 2: [], 3: []}  # no reader ever saw a wrong or partial entry
    c = EmbeddingCache(folder)
    for i in range(8):
        assert torch.equal(c.get(_key(i)), _t(i))
    for w in range(4):
        for j in range(4):
            assert torch.equal(c.get(_key(100 + w * 10 + j)), _t(1000 + w * 10 + j))
    assert c.hits["disk"] == 8 + 16 and c.misses == 0
    assert _temps(folder) == [] and c.info()["entries"] == 24


# -- keys ----------------------------------------------------------------------------------------

def test_image_key(scene, scene_path, tmp_path, monkeypatch):
    data = open(scene_path, "rb").read()
    k = image_key(scene_path, "ns1")
    assert len(k) == 64
    assert image_key(data, "ns1") == k == image_key(bytearray(data), "ns1")
    import pathlib

    assert image_key(pathlib.Path(scene_path), "ns1") == k
    copy = tmp_path / "copy.png"
    copy.write_bytes(data)
    assert image_key(str(copy), "ns1") == k  # content, not name
    assert image_key(scene_path, "ns2") != k
    assert image_key(data + b"\0", "ns1") != k
    pil = image_key(scene, "ns1")
    assert pil != k and pil == image_key(scene.copy(), "ns1") and pil != image_key(scene, "ns2")
    assert image_key(scene.convert("RGBA"), "ns1") != pil
    monkeypatch.setattr(cache_mod, "PREPROCESS_VERSION", "other-v2")
    assert image_key(scene_path, "ns1") != k and image_key(scene, "ns1") != pil
    monkeypatch.undo()
    with pytest.raises(TinyVError, match="image not found"):
        image_key(str(tmp_path / "none.png"), "ns1")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(TinyVError, match="cannot read"):
        image_key(str(bad), "ns1")


# -- unwritable folder, clear, info --------------------------------------------------------------

def test_unwritable_folder_is_only_a_slower_cache(tmp_path, monkeypatch):
    # mode bits do not stop root (CI runs as root), so the refusal comes from the file system call
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    said = []
    c = EmbeddingCache(str(tmp_path / "emb"), report=said.append)
    c.put(_key(1), _t(1))  # does not raise
    c.put(_key(3), _t(3))
    assert len(said) == 1 and "cannot write to the image cache" in said[0]  # said once
    assert torch.equal(c.get(_key(1)), _t(1)) and c.hits["memory"] == 1
    assert not (tmp_path / "emb").exists() and c.entries() == []
    monkeypatch.undo()
    # a full disk: the folder exists but the write fails half way; nothing is left behind
    monkeypatch.setattr(os, "replace", refuse)
    c = EmbeddingCache(str(tmp_path / "full"), report=said.append)
    c.put(_key(1), _t(1))
    assert torch.equal(c.get(_key(1)), _t(1)) and c.entries() == []
    assert [n for _, _, ns in os.walk(tmp_path / "full") for n in ns] == []  # no temporary file left
    monkeypatch.undo()
    # a "folder" that is a file is said at once, root or not; the cache is then memory only
    f = tmp_path / "a-file"
    f.write_text("x")
    said.clear()
    c = EmbeddingCache(str(f), report=said.append)
    assert len(said) == 1 and "is a file" in said[0] and c.folder is None
    c.put(_key(2), _t(2))
    assert torch.equal(c.get(_key(2)), _t(2))
    assert c.entries() == [] and c.info()["entries"] == 0 and c.clear() == 0
    assert EmbeddingCache(str(f), report=said.append).get(_key(2)) is None


def test_clear_and_info(tmp_path):
    folder = str(tmp_path / "emb")
    c = EmbeddingCache(folder, max_bytes=1 << 20)
    info = c.info()
    assert info == {"folder": folder, "entries": 0, "bytes": 0, "max_bytes": 1 << 20, "memory_entries": 0}
    for i in range(5):
        c.put(_key(i), _t(i))
    info = c.info()
    assert info["entries"] == 5 and info["memory_entries"] == 5
    assert info["bytes"] == sum(os.path.getsize(p) for p in _files(folder)) > 5 * 64 * 4
    assert c.clear() == 5
    assert c.info()["entries"] == 0 and c.info()["memory_entries"] == 0 and c.info()["bytes"] == 0
    assert all(c.get(_key(i)) is None for i in range(5)) and c.misses == 5
    c.drop(_key(0))  # dropping what is not there is fine

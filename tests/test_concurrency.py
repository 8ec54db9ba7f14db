"""The engine's concurrency model (engine/worker.py): streams advanced from any thread or event
loop, many threads on one engine, streams closed or dropped, callers that give up waiting, and
engines with their own thread counts side by side."""
import asyncio
import gc
import threading

import pytest
import torch

import tinyv.engine.generate as generate_mod
from tinyv import TinyVError
from tinyv.engine.engine import Engine

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_torch_thread")

HANG_GUARD_S = 120  # a join that outlives this is a hang, not a slow machine


@pytest.fixture(scope="module")
def e4(tiny_bundle):
    return Engine.load(tiny_bundle(4), cache_dir=None)


def _tokens(steps):
    return [s.token for s in steps]


def _in_thread(fn):
    """fn() on a new thread; its result (or its exception, re-raised here)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), "the call hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


class GatedSampler:
    """A greedy sampler that counts its calls and, at call number ``gate_at``, waits for ``open``:
    it holds the engine's worker at a known point, whatever the machine's speed."""

    def __init__(self, gate_at: int):
        self.calls, self.gate_at, self.open = 0, gate_at, threading.Event()

    def install(self, monkeypatch):
        self.monkeypatch, self.original = monkeypatch, generate_mod.make_sampler
        monkeypatch.setattr(generate_mod, "make_sampler", lambda *a, **k: self)

    def uninstall(self):
        """Later calls sample as usual (the job in progress keeps this sampler)."""
        self.monkeypatch.setattr(generate_mod, "make_sampler", self.original)

    def __call__(self, logits, history):
        self.calls += 1
        if self.calls == self.gate_at:
            assert self.open.wait(HANG_GUARD_S)
        return int(torch.argmax(logits))


def test_stream_advanced_through_asyncio_to_thread(e4, scene):
    plain = _tokens(e4.stream(scene, max_new_tokens=12))

    async def consume():
        it = e4.stream(scene, max_new_tokens=12)
        got = []
        while (step := await asyncio.to_thread(next, it, None)) is not None:
            got.append(step.token)
        return got

    assert asyncio.run(consume()) == plain
    assert _tokens(e4.stream(scene, max_new_tokens=12)) == plain  # the engine serves the next call


def test_each_step_on_a_different_thread(e4, scene):
    plain = _tokens(e4.stream(scene, max_new_tokens=10))
    it = e4.stream(scene, max_new_tokens=10)
    got, threads = [], []

    def step():
        threads.append(threading.current_thread())  # kept alive, so each is a distinct object
        return next(it, None)

    while (s := _in_thread(step)) is not None:
        got.append(s.token)
    assert got == plain and len({id(t) for t in threads}) == len(plain) + 1


def test_four_threads_three_rounds_on_one_engine(e4, scene, other_image):
    jobs = [(scene, None), (other_image, None), (scene, "how many shapes?"), (other_image, "what colour?")]
    expected = [_tokens(e4.stream(img, q, max_new_tokens=8)) for img, q in jobs]
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            for r in range(3):
                barrier.wait(HANG_GUARD_S)
                img, q = jobs[(i + r) % 4]  # every round, each thread asks another question
                results[(i, r)] = (_tokens(e4.stream(img, q, max_new_tokens=8)), (i + r) % 4)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(HANG_GUARD_S)
    assert not errors and len(results) == 12
    assert all(tokens == expected[j] for tokens, j in results.values())


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_stream_closed_or_dropped_after_one_step_frees_the_engine(e4, scene, other_image, monkeypatch, how):
    expected = _tokens(e4.stream(other_image, max_new_tokens=5))
    gate = GatedSampler(gate_at=2)
    gate.install(monkeypatch)
    stream = e4.stream(scene, max_new_tokens=1000)
    assert next(stream).token is not None
    if how == "close":
        stream.close()
    else:
        del stream
        gc.collect()
    gate.open.set()
    gate.uninstall()
    assert _in_thread(lambda: _tokens(e4.stream(other_image, max_new_tokens=5))) == expected
    assert gate.calls == 2  # the abandoned answer stopped right after the token in progress


def test_a_waiting_caller_with_a_timeout_gets_a_clear_error(e4, scene, other_image, monkeypatch):
    expected = _tokens(e4.stream(other_image, max_new_tokens=5))
    gate = GatedSampler(gate_at=1)
    gate.install(monkeypatch)
    busy = e4.stream(scene, max_new_tokens=3)  # holds the worker at its first token
    with pytest.raises(TinyVError, match="busy"):
        list(e4.stream(other_image, max_new_tokens=5, timeout=0.2))
    with pytest.raises(TinyVError, match="busy"):
        e4.encode_image(other_image, timeout=0.2)
    waiting = e4.stream(other_image, max_new_tokens=5)
    waiting.close()  # a caller that gives up by closing: its job never runs
    assert list(waiting) == []
    gate.open.set()
    assert len(list(busy)) == 3
    gate.uninstall()
    assert _tokens(e4.stream(other_image, max_new_tokens=5, timeout=HANG_GUARD_S)) == expected


def test_callers_are_served_in_arrival_order(e4, scene, monkeypatch):
    gate = GatedSampler(gate_at=1)
    gate.install(monkeypatch)
    first = e4.stream(scene, max_new_tokens=2)
    order = []
    later = [e4._worker.stream(lambda stop, i=i: iter([order.append(i)])) for i in range(5)]
    gate.open.set()
    list(first)
    for s in later:
        list(s)
    assert order == [0, 1, 2, 3, 4]


def test_two_engines_with_different_thread_counts(tiny_bundle, scene, other_image):
    one = Engine.load(tiny_bundle(4), threads=1, cache_dir=None)
    two = Engine.load(tiny_bundle(8), threads=2, cache_dir=None)
    expected = {"one": _tokens(one.stream(scene, max_new_tokens=10)),
                "two": _tokens(two.stream(other_image, max_new_tokens=10))}
    caller_threads = torch.get_num_threads()
    out, errors = {}, []

    def work(name, engine, image):
        try:
            for _ in range(3):
                out.setdefault(name, []).append(_tokens(engine.stream(image, max_new_tokens=10)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=a) for a in (("one", one, scene), ("two", two, other_image))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(HANG_GUARD_S)
    assert not errors and out == {k: [v] * 3 for k, v in expected.items()}
    # each engine's work runs with its own thread count (torch's on one where the kernels run the
    # Linears on theirs); the caller's is untouched
    assert one.run(torch.get_num_threads) == 1 and two.run(torch.get_num_threads) == (two.llm_torch_threads or 2)
    assert torch.get_num_threads() == caller_threads
    if one.kernels is not None:
        assert (one.kernels.threads, two.kernels.threads) == (1, 2)


def test_a_closed_engine_refuses_new_work(tiny_bundle, scene):
    engine = Engine.load(tiny_bundle(4), cache_dir=None)
    with engine:
        assert _tokens(engine.stream(scene, max_new_tokens=2))
    with pytest.raises(TinyVError, match="closed"):
        engine.stream(scene, max_new_tokens=2)


def test_an_engine_keeps_the_thread_count_it_was_loaded_with(tiny_bundle):
    """Torch gives a new thread whatever count any thread set last: an engine loaded with the
    default must keep the count of its loading thread, whatever is set afterwards elsewhere."""
    before = torch.get_num_threads()
    engine = Engine.load(tiny_bundle(4), cache_dir=None)
    _in_thread(lambda: torch.set_num_threads(before + 2))  # some other thread changes its count
    assert engine.threads == before and engine.run(torch.get_num_threads) == before
    if engine.kernels is not None:
        assert engine.kernels.threads == before
    torch.set_num_threads(before)  # leave the global default as it was for the next thread

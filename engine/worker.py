"""The engine's concurrency model: one worker thread owns the model and runs its jobs in order.

Every piece of model work (encoding an image, answering a question) is a job on the engine's
worker: the model, its KV caches, the vision session and the compiled kernels' thread pool are only
ever touched by that one thread, so nothing in them needs a lock, and torch's per-thread settings
(its intra-op thread count) belong to the engine, not to whichever thread called it.

A caller gets a :class:`Stream` at once. Its steps are produced on the worker and handed over
through a queue, so any thread may advance it — one after another, through
``asyncio.to_thread``, or from a different thread at each step. Callers waiting for a busy engine
are served in arrival order and may give up: with ``timeout`` (a ``TinyVError`` says the engine
was busy) or by closing the stream. A stream that is closed, or dropped and garbage-collected,
stops its job after the token in progress, and the next job starts.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

from tinyv.errors import TinyVError

_END = object()  # the job has no more steps


class _Failure:
    """An exception raised by the job, re-raised in the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class _Channel:
    """What the job and its consumer share (the job never holds the consumer's handle, so dropping
    the handle lets it be collected and close the channel)."""

    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()
        self.started = threading.Event()

    def run(self, make_steps: Callable[[Callable[[], bool]], Iterator]) -> None:
        """On the worker: produce the steps until they end or the consumer closes the stream."""
        self.started.set()
        try:
            if self.closed.is_set():
                return
            steps = make_steps(self.closed.is_set)
            try:
                for step in steps:
                    self.items.put(step)
                    if self.closed.is_set():
                        break
            finally:
                close = getattr(steps, "close", None)
                if close is not None:
                    close()  # run the job's clean-up (e.g. thread settings) here, on the worker
        except BaseException as e:  # handed to the consumer, who raises it
            self.items.put(_Failure(e))
        finally:
            self.items.put(_END)


class Stream:
    """The steps of one job, produced on the engine's worker; iterate it from any thread.

    ``close()`` (or leaving a ``with`` block, or dropping the last reference) stops the job.
    """

    def __init__(self, executor: ThreadPoolExecutor, make_steps, timeout: float | None):
        self._channel = _Channel()
        self._timeout = timeout
        self._done = False
        self._lock = threading.Lock()  # one consumer at a time, whichever thread it is on
        self._future = executor.submit(self._channel.run, make_steps)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self):
        with self._lock:
            if self._done:
                raise StopIteration
            item = self._next_item()
            if item is _END or isinstance(item, _Failure):
                self._done = True
                if item is _END:
                    raise StopIteration
                raise item.error
            return item

    def _next_item(self):
        if self._channel.started.is_set() or self._timeout is None:
            return self._channel.items.get()
        try:
            return self._channel.items.get(timeout=self._timeout)
        except queue.Empty:
            pass
        if self._future.cancel():  # still waiting for the engine: give up, nothing ran
            self._channel.closed.set()
            return _Failure(TinyVError(f"the engine was busy with other requests for {self._timeout:g} s; "
                                       "try again, or pass a longer timeout"))
        return self._channel.items.get()  # it started just now

    def close(self) -> None:
        """Stop the job (after the token in progress) or withdraw it if it has not started."""
        self._channel.closed.set()
        if self._future.cancel():
            self._channel.items.put(_END)  # nothing will run: wake a consumer waiting on another thread

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if hasattr(self, "_future"):  # not when __init__ failed before submitting
            self.close()


class Worker:
    """A single thread that runs an engine's jobs in arrival order.

    ``setup()`` runs on that thread before its first job (per-thread settings such as torch's
    thread count)."""

    def __init__(self, name: str, setup: Callable[[], None] | None = None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=setup)
        self._closed = False

    def stream(self, make_steps: Callable[[Callable[[], bool]], Iterator], timeout: float | None = None) -> Stream:
        """Queue a job; ``make_steps(should_stop)`` is called on the worker and its items streamed."""
        if self._closed:
            raise TinyVError("this engine is closed; load it again")
        return Stream(self._executor, make_steps, timeout)

    def submit(self, fn: Callable[[], object]) -> Future:
        """Queue ``fn()`` after the jobs before it, without waiting; its result (or exception) is
        the Future's. For a job that hands out its own results (the batch scheduler's loop)."""
        if self._closed:
            raise TinyVError("this engine is closed; load it again")
        return self._executor.submit(fn)

    def call(self, fn: Callable[[], object], timeout: float | None = None):
        """Run ``fn()`` on the worker and return its result (``timeout``: as for a stream)."""
        with self.stream(lambda should_stop: iter((fn(),)), timeout) as s:
            return next(s)

    def close(self) -> None:
        """No new jobs; those queued still run. The thread ends when they are done."""
        self._closed = True
        self._executor.shutdown(wait=False)

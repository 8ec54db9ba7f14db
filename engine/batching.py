"""Continuous batching on an engine's worker: answers that arrive while others are being decoded
join them, and each decode step runs the next token of every active answer as one pass
(``PhiForCausalLM.decode_batch``), so the weights are read once per step for all of them.

``Batcher.submit`` may be called from any thread; it returns a :class:`BatchStream` at once. One
job on the engine's worker (``Engine.submit``) runs the loop while there is work:

1. admit waiting requests, up to ``max_batch`` active answers; each is prefilled on its own (the
   image from the embedding cache or the vision graph, the text-before-image + image from the
   prefix cache, then its own tokens) — the other answers pause meanwhile;
2. sample every active answer's next token and hand its text to its stream (the rules of
   ``generate.AnswerText``: stop strings, eos, the token limit);
3. one batched decode step for the answers still going.

A stream that is closed (its client went away) leaves the batch before the next step, so it costs
at most the token in progress. The loop ends when nothing is active or waiting, and the next
request starts it again; other work queued on the engine meanwhile runs when it ends. Greedy
answers are the very tokens ``Engine.stream`` gives: the same prefill, the same rules, and a
fused batched step whose every row is computed exactly as alone.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from tinyv.engine.generate import (AnswerText, GenerationOptions, GenerationStep, Started, finish_figures,
                                   start_answer, torch_threads)
from tinyv.errors import TinyVError

DEFAULT_MAX_BATCH = 8
# KV positions a new answer's cache gets beyond its prompt; it grows (doubling) as the answer goes,
# so a request for a long answer that stops early does not hold memory for all of it
INITIAL_ROOM = 64

_END = object()  # the answer has no more steps


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Channel:
    """What an answer's producer (the loop) and its consumer share. The loop never holds the
    consumer's handle, so a dropped handle is collected and closes the channel."""

    def __init__(self):
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()
        self.wake = None  # set by an async consumer: called after each item (on the worker)
        self.ended = False  # set before the end is handed over: a consumer that saw it sees this

    def put(self, item) -> None:
        self.items.put(item)
        wake = self.wake
        if wake is not None:
            wake()

    def end(self, last: GenerationStep | None = None) -> None:
        """Hand over the last step (if any) and the end."""
        self.ended = True
        if last is not None:
            self.items.put(last)
        self.put(_END)

    def fail(self, error: BaseException) -> None:
        self.put(_Failure(error))
        self.end()


class BatchStream:
    """One answer's steps (``GenerationStep``; ``timings`` on the last), produced by the batch loop.

    Iterate it from any thread, or ``async for`` it in an event loop (the loop is woken for each
    step; no thread waits). ``close()`` (or dropping it) takes the answer out of the batch before
    the next decode step."""

    def __init__(self, channel: _Channel):
        self._channel = channel
        self._event: asyncio.Event | None = None
        self._done = False
        self._held = None  # an end or failure met by ready(), handed out by the next read

    def _unwrap(self, item, stop):
        if item is _END:
            self._done = True
            raise stop
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def __iter__(self) -> "BatchStream":
        return self

    def _get(self, block: bool):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return self._channel.items.get() if block else self._channel.items.get_nowait()

    def __next__(self) -> GenerationStep:
        if self._done:
            raise StopIteration
        return self._unwrap(self._get(True), StopIteration)

    def ready(self) -> list[GenerationStep]:
        """The steps already produced, without waiting (a consumer that fell behind sends them
        as one piece); an end or error among them is left for the next read."""
        steps = []
        while not self._done and self._held is None:
            try:
                item = self._get(False)
            except queue.Empty:
                break
            if item is _END or isinstance(item, _Failure):
                self._held = item
            else:
                steps.append(item)
        return steps

    def __aiter__(self) -> "BatchStream":
        return self

    async def __anext__(self) -> GenerationStep:
        if self._done:
            raise StopAsyncIteration
        if self._event is None:
            loop, event = asyncio.get_running_loop(), asyncio.Event()
            self._event = event

            def wake():
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the event loop has closed: nobody is listening
                    pass

            self._channel.wake = wake
        while True:
            try:
                item = self._get(False)
            except queue.Empty:
                await self._event.wait()
                self._event.clear()
                continue
            return self._unwrap(item, StopAsyncIteration)

    @property
    def closed(self) -> bool:
        return self._channel.closed.is_set()

    def close(self) -> None:
        """Stop the answer (it leaves the batch before the next step) or withdraw it if waiting."""
        self._channel.closed.set()

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if hasattr(self, "_channel"):
            self.close()


@dataclass
class _Request:
    image: object
    before: str
    after: str
    options: GenerationOptions
    stop_strings: tuple[str, ...]
    stop_at_eos: bool
    channel: _Channel = field(default_factory=_Channel)


@dataclass
class _Answer:
    """An active answer in the batch (touched only on the worker)."""

    request: _Request
    start: Started
    sampler: object
    text: AnswerText
    logits: torch.Tensor  # [vocab] for the next token
    token: int | None = None  # the last sampled token, fed to the next step

    @property
    def channel(self) -> _Channel:
        return self.request.channel


class Batcher:
    """Answers on one engine, decoded together in batches of up to ``max_batch``."""

    def __init__(self, engine, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise TinyVError(f"the batch size must be at least 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Channel] = []  # the channels of the loop's answers, for stats and close()
        self._running = False
        self._closed = False
        self.steps = 0  # batched decode steps run
        self.stepped_tokens = 0  # tokens those steps computed (steps × batch sizes)

    def submit(self, image, question: str | None = None, *, task: str = "caption", prompt: str | None = None,
               stop_strings=(), ignore_eos: bool = False, **options) -> BatchStream:
        """Queue an answer (arguments as ``Engine.stream``; ``stop_strings`` end it besides the
        model's own; ``ignore_eos``: neither eos nor the model's stop strings end it, only the
        token limit and ``stop_strings`` — for measuring speed) and return its stream at once.
        Errors in the arguments are raised here; errors met on the worker (e.g. a prompt over the
        context) are raised by the stream."""
        opts = GenerationOptions(**options)
        e = self.engine
        before, after = e.prompt_format.split(question, task, prompt)
        own = () if ignore_eos else tuple(e.prompt_format.stop_strings)
        stops = own + tuple(s for s in stop_strings if s)
        request = _Request(image, before, after, opts, stops, not ignore_eos)
        with self._lock:
            if self._closed:
                raise TinyVError("this server is shutting down; try again later")
            self._waiting.append(request)
            start, self._running = not self._running, True
        if start:
            try:
                e.submit(self._run)
            except BaseException:
                with self._lock:
                    self._running = False
                    self._waiting.remove(request)
                raise
        return BatchStream(request.channel)

    def stats(self) -> dict:
        """Answers being decoded and waiting for a place in the batch."""
        with self._lock:
            active = sum(not c.ended for c in self._active)
            return {"active": active, "waiting": len(self._waiting), "max_batch": self.max_batch}

    def close(self) -> None:
        """No new answers; those waiting or running are stopped (their streams end)."""
        with self._lock:
            self._closed = True
            channels = [r.channel for r in self._waiting] + list(self._active)
        for c in channels:
            c.closed.set()

    # -- the loop, on the engine's worker ---------------------------------------------------------------
    def _run(self) -> None:
        answers: list[_Answer] = []
        try:
            while True:
                with self._lock:
                    admitted = []
                    while self._waiting and len(answers) + len(admitted) < self.max_batch:
                        admitted.append(self._waiting.popleft())
                    if not answers and not admitted:
                        self._running = False
                        self._active = []
                        return
                    self._active = [a.channel for a in answers] + [r.channel for r in admitted]
                for request in admitted:
                    answer = self._start(request)
                    if answer is not None:
                        answers.append(answer)
                with torch_threads(self.engine.llm_torch_threads):
                    answers = self._sample(answers)
                    if answers:
                        answers = self._step(answers)
        except BaseException as error:  # a bug, not a request's fault: end every answer with it
            with self._lock:
                self._running = False
                self._active = []
                waiting = list(self._waiting)
                self._waiting.clear()
            for c in [a.channel for a in answers] + [r.channel for r in waiting]:
                c.fail(error)
            raise

    def _start(self, request: _Request) -> _Answer | None:
        """Prefill one request; None if its stream was closed meanwhile or it failed (its stream
        then raises the error)."""
        if request.channel.closed.is_set():
            request.channel.end()
            return None
        e = self.engine
        try:
            ids = e.tokenizer.encode(request.after)
            prefix, timings = e._prefix(request.image, request.before, len(ids) + INITIAL_ROOM)
            start = start_answer(e.phi, e.tokenizer, prefix, ids, request.options.max_new_tokens, timings,
                                 room=INITIAL_ROOM)
        except Exception as error:  # noqa: BLE001 - handed to that request's consumer
            request.channel.fail(error)
            return None
        text = AnswerText(e.tokenizer, request.stop_strings, start.max_new_tokens, request.stop_at_eos)
        return _Answer(request, start, request.options.sampler(), text, start.logits)

    def _sample(self, answers: list[_Answer]) -> list[_Answer]:
        """Every answer's next token and text; the answers that go on to the next step."""
        going = []
        for a in answers:
            if a.channel.closed.is_set():  # its client is gone: out before the next step
                a.channel.end()
                continue
            with torch.inference_mode():
                token = a.sampler(a.logits, a.text.tokens)
            delta, finish = a.text.push(token, a.channel.closed.is_set)
            if finish is not None:
                figures = finish_figures(a.start.figures, len(a.text.tokens), a.start.t_first)
                a.channel.end(GenerationStep(delta, token, finish, figures))
                continue
            a.channel.put(GenerationStep(delta, token))
            a.token = token
            going.append(a)
        return going

    def _step(self, answers: list[_Answer]) -> list[_Answer]:
        """One batched decode step: each answer's logits for its next token."""
        phi = self.engine.phi
        limit = phi.cfg.max_positions
        positions = [a.start.length + len(a.text.tokens) - 1 for a in answers]
        caches = [a.start.cache for a in answers]
        for pos, cache in zip(positions, caches):
            if pos >= cache.max_len:
                cache.ensure(min(limit, max(pos + 1, 2 * cache.max_len)))
        try:
            with torch.inference_mode():
                embeds = phi.embed(torch.tensor([[a.token] for a in answers], dtype=torch.long))
                logits = phi.decode_batch(embeds, positions, caches)
        except Exception as error:  # noqa: BLE001 - these answers end with it; the loop goes on
            for a in answers:
                a.channel.fail(error)
            return []
        self.steps += 1
        self.stepped_tokens += len(answers)
        for a, row in zip(answers, logits):
            a.logits = row
        return answers

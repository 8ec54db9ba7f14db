"""The one generation loop: prompt embeddings -> prefill -> sampled tokens streamed as text.

Both front ends call :func:`generate`: the bundle engine (``Engine.stream``, on its worker
thread) and the fp32 reference model (``TinyGPTV.stream``). A prompt is the text before the
image, the image's embeddings and the text after it; the part up to and including the image is
the *prefix*, whose KV cache a :class:`Prefix` keeps so that further questions about the same
image prefill only their own tokens.
"""
from __future__ import annotations

import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

import torch

from tinyv.engine.memory import peak_rss_mb
from tinyv.engine.phi import KVCache, PhiForCausalLM
from tinyv.engine.prompts import STOP_STRINGS, cut_at_stop, held_back, split_prompt
from tinyv.engine.sampling import check_sampling, make_sampler
from tinyv.engine.tokenizer import StreamDecoder, Tokenizer
from tinyv.errors import TinyVError

DEFAULT_MAX_NEW_TOKENS = 100
FINISH_REASONS = ("stop", "eos", "length", "cancelled")


@dataclass(frozen=True)
class GenerationOptions:
    """How many tokens and how they are chosen; the one set of defaults of every front end."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool = True
    temperature: float = 0.6
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise TinyVError(f"max_new_tokens must be a whole number, at least 1; got {self.max_new_tokens!r}")
        if not isinstance(self.greedy, bool):
            raise TinyVError(f"greedy must be True or False; got {self.greedy!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise TinyVError(f"seed must be a whole number or None; got {self.seed!r}")
        check_sampling(self.temperature, self.top_p, self.repetition_penalty)  # at the call, not on the worker

    @classmethod
    def from_options(cls, options: dict) -> "GenerationOptions":
        """From keyword options as a caller gives them; a name that is no option is a TinyVError."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TinyVError(f"unknown option {', '.join(map(str, unknown))}; the options are "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**options)

    def sampler(self):
        return make_sampler(self.greedy, self.temperature, self.top_p, self.repetition_penalty, self.seed)


@dataclass
class GenerationStep:
    """One streamed piece of the answer. ``timings`` is set on the last one only."""

    text: str
    token: int | None
    finish_reason: str | None = None  # one of FINISH_REASONS, on the last step
    timings: dict | None = field(default=None)


@dataclass
class Prefix:
    """The KV cache of a prompt's text-before-image + image, and the logits after it."""

    cache: KVCache
    length: int
    logits: torch.Tensor  # [vocab] at the last prefix position
    prefill_s: float = 0.0  # time its prefill took
    fresh: bool = True  # not yet used by an answer (whose figures then count its prefill)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def build_prompt_embeds(phi: PhiForCausalLM, tok: Tokenizer, prompt: str, image_embeds: torch.Tensor) -> torch.Tensor:
    """Each text segment tokenized on its own (no BOS), image embeddings between: [1, L, hidden]."""
    before, after = split_prompt(prompt)
    return torch.cat([prefix_embeds(phi, tok, before, image_embeds), embed_text(phi, tok, after)], dim=1)


def embed_text(phi: PhiForCausalLM, tok: Tokenizer, text: str) -> torch.Tensor:
    return embed_ids(phi, tok.encode(text))


def embed_ids(phi: PhiForCausalLM, ids: list[int]) -> torch.Tensor:
    """Token embeddings [1, len(ids), hidden]."""
    return phi.embed(torch.tensor([ids], dtype=torch.long))


def prefix_embeds(phi: PhiForCausalLM, tok: Tokenizer, before: str, image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.cat([embed_text(phi, tok, before), image_embeds.float()], dim=1)


@torch.inference_mode()
def prefill(phi: PhiForCausalLM, embeds: torch.Tensor, cache: KVCache | None, pos: int = 0) -> torch.Tensor:
    """Run embeds [1, S, hidden] at positions pos..pos+S-1; logits [vocab] of the last one."""
    return phi.logits(phi(embeds, pos, cache)[0, -1])


@torch.inference_mode()
def decode_one(phi: PhiForCausalLM, token: int, pos: int, cache: KVCache) -> torch.Tensor:
    """One token at position ``pos`` against the cache; logits [vocab] for the next (one fused C
    call for a quantized model on the compiled kernels: ``PhiForCausalLM.decode``)."""
    return phi.decode(phi.embed(torch.tensor([[token]], dtype=torch.long)), pos, cache)


@torch.inference_mode()
def prefill_prefix(phi: PhiForCausalLM, tok: Tokenizer, before: str, image_embeds: torch.Tensor,
                   room: int = 0) -> Prefix:
    """Prefill text-before-image + image into a new cache with ``room`` more positions after it."""
    t0 = time.perf_counter()
    embeds = prefix_embeds(phi, tok, before, image_embeds)
    n = embeds.shape[1]
    cache = phi.new_cache(max(n, min(n + room, phi.cfg.max_positions)))
    logits = prefill(phi, embeds, cache, 0)
    return Prefix(cache, n, logits, time.perf_counter() - t0)


@contextmanager
def torch_threads(n: int | None):
    """Torch's intra-op thread count for the calling thread while inside (None: unchanged)."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@dataclass
class Started:
    """An answer after its prompt is prefilled: the cache, the logits for its first token."""

    cache: KVCache
    logits: torch.Tensor  # [vocab]
    length: int  # prompt positions (image included); the first new token goes here
    max_new_tokens: int  # what the request asked, cut to the context left
    figures: dict  # the timings and counts so far (completed as the answer runs)
    t_first: float  # perf_counter() when the first token's logits were ready


def start_answer(phi: PhiForCausalLM, tokenizer: Tokenizer, prefix: Prefix, ids: list[int], max_new_tokens: int,
                 timings: dict | None = None, room: int | None = None) -> Started:
    """Prefill the question's tokens ``ids`` after ``prefix`` (in its cache, which the answer then
    owns). The cache gets room for the answer: all of it, or ``room`` positions (the caller grows
    it as the answer goes, e.g. a long default answer that usually stops early)."""
    limit = phi.cfg.max_positions
    reused, prefix.fresh = not prefix.fresh, False
    t0 = time.perf_counter()
    L = prefix.length + len(ids)
    if L >= limit:
        raise TinyVError(f"the prompt is {L} tokens (image included) but the model's context is {limit}; "
                         "shorten the question")
    max_new = min(max_new_tokens, limit - L)
    cache = prefix.cache
    cache.truncate(prefix.length)  # forget an earlier question and answer on this prefix
    cache.ensure(L + (max_new if room is None else min(max_new, room)))
    logits = prefill(phi, embed_ids(phi, ids), cache, prefix.length) if ids else prefix.logits
    t_first = time.perf_counter()
    prefilled = len(ids) + (0 if reused else prefix.length)
    prefill_s = (t_first - t0) + (0.0 if reused else prefix.prefill_s)
    figures = {"image_ms": 0.0, **(timings or {}), "prefix_reused": reused, "prefix_tokens": prefix.length,
               "prompt_tokens": L, "prefilled_tokens": prefilled, "prefill_tok_s": prefilled / max(prefill_s, 1e-9)}
    figures["ttft_ms"] = prefill_s * 1000 + figures["image_ms"]
    return Started(cache, logits, L, max_new, figures, t_first)


def finish_figures(figures: dict, new_tokens: int, t_first: float) -> dict:
    """``figures`` completed at the end of an answer of ``new_tokens`` tokens."""
    t_end = time.perf_counter()
    n_decode = new_tokens - 1
    figures.update({
        "new_tokens": new_tokens,
        "decode_tok_s": n_decode / (t_end - t_first) if n_decode > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "total_ms": figures["ttft_ms"] + (t_end - t_first) * 1000,
    })
    return figures


class AnswerText:
    """Sampled tokens -> the text to stream: a stop string ends the answer and is cut off (text
    that could be the start of one is held back until it is known not to be), eos ends it, and so
    does the token limit. Constant work per token."""

    def __init__(self, tokenizer: Tokenizer, stop_strings, max_new_tokens: int, stop_at_eos: bool = True):
        self.decoder = StreamDecoder(tokenizer)
        self.eos_id = tokenizer.eos_id if stop_at_eos else None
        self.stop_strings, self.max_new_tokens = tuple(stop_strings), max_new_tokens
        self.tokens: list[int] = []
        self._pending = ""  # decoded, not yet streamed: it could be the start of a stop string

    def push(self, token: int, should_stop: Callable[[], bool] | None = None) -> tuple[str, str | None]:
        """The text to stream after ``token``, and the finish reason if it ends the answer
        (``should_stop()``, asked last, ends it as "cancelled")."""
        self.tokens.append(token)
        if token == self.eos_id:
            delta, self._pending = self._pending, ""  # flush what was held back
            return delta, "eos"
        # only the held-back tail and the new piece can hold a stop string
        text, stopped = self._pending + self.decoder.push(token), False
        if self.stop_strings:
            text, stopped = cut_at_stop(text, self.stop_strings)
        finish = None
        if stopped:
            finish = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            finish = "length"
        elif should_stop is not None and should_stop():
            finish = "cancelled"
        delta = text if finish or not self.stop_strings else text[: len(text) - held_back(text, self.stop_strings)]
        self._pending = text[len(delta):]
        return delta, finish


def generate(
    phi: PhiForCausalLM,
    tokenizer: Tokenizer,
    before: str,
    image_embeds: torch.Tensor,
    after: str,
    options: GenerationOptions = GenerationOptions(),
    *,
    prefix: Prefix | None = None,
    stop_strings=STOP_STRINGS,
    should_stop: Callable[[], bool] | None = None,
    llm_torch_threads: int | None = None,
    timings: dict | None = None,
) -> Iterator[GenerationStep]:
    """Stream the answer to ``before <image> after`` as ``GenerationStep`` records.

    ``prefix`` (from :func:`prefill_prefix` on the same ``before`` and image) is used instead of
    prefilling them: only ``after`` is prefilled. ``should_stop()`` is asked after every token (finish "cancelled").
    ``llm_torch_threads`` sets torch's thread count while the LLM runs (the quantized kernels keep
    their own threads, and a spinning OpenMP pool between their calls takes the cores they need). ``timings``
    from the caller (e.g. ``image_ms``) are completed and put on the last step.
    """
    ids = tokenizer.encode(after)
    with torch_threads(llm_torch_threads):
        if prefix is None:
            prefix = prefill_prefix(phi, tokenizer, before, image_embeds, room=len(ids) + options.max_new_tokens)
        start = start_answer(phi, tokenizer, prefix, ids, options.max_new_tokens, timings)
        yield from _decode(phi, tokenizer, start, options.sampler(), stop_strings, should_stop)


def _decode(phi, tokenizer, start: Started, sampler, stop_strings, should_stop) -> Iterator[GenerationStep]:
    """Sample from the first token's logits on until a stop string, eos, the limit or ``should_stop``."""
    answer = AnswerText(tokenizer, stop_strings, start.max_new_tokens)
    logits, finish = start.logits, None
    # no inference mode around the loop: a generator suspended at ``yield`` inside one would leave
    # it switched on in the caller (autograd off for the rest of the thread if the stream is dropped)
    while True:
        with torch.inference_mode():
            token = sampler(logits, answer.tokens)
        delta, finish = answer.push(token, should_stop)
        if finish is not None:
            break
        yield GenerationStep(delta, token)
        logits = decode_one(phi, token, start.length + len(answer.tokens) - 1, start.cache)
    yield GenerationStep(delta, token, finish, finish_figures(start.figures, len(answer.tokens), start.t_first))

"""Prefill, decode and the streaming loop shared by the fp32 model and the bundle engine."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from tinyv.engine.memory import peak_rss_mb
from tinyv.engine.phi import KVCache, PhiForCausalLM
from tinyv.engine.prompts import STOP_STRINGS, cut_at_stop, held_back, split_prompt
from tinyv.engine.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStep:
    """One streamed piece of the answer. ``timings`` is set on the last one only."""

    text: str
    token: int | None
    finish_reason: str | None = None  # "stop" (### seen), "eos", "length", "cancelled"
    timings: dict | None = field(default=None)


def build_prompt_embeds(phi: PhiForCausalLM, tok: Tokenizer, prompt: str, image_embeds: torch.Tensor) -> torch.Tensor:
    """Each text segment tokenized on its own (no BOS), image embeddings between: [1, L, hidden]."""
    before, after = split_prompt(prompt)
    parts = [
        phi.embed(torch.tensor([tok.encode(before)], dtype=torch.long)),
        image_embeds.float(),
        phi.embed(torch.tensor([tok.encode(after)], dtype=torch.long)),
    ]
    return torch.cat(parts, dim=1)


@torch.inference_mode()
def prefill(phi: PhiForCausalLM, embeds: torch.Tensor, cache: KVCache | None, pos: int = 0) -> torch.Tensor:
    """Run embeds [1, S, hidden] at positions pos..pos+S-1; logits [vocab] of the last one."""
    return phi.logits(phi(embeds, pos, cache)[0, -1])


@contextmanager
def decode_threads():
    """The quantized kernels keep every thread; torch's own (tiny, M = 1) ops run on one, so its
    spinning OpenMP workers do not take the cores from the kernels' threads."""
    from tinyv.kernels import native

    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    prev = native.pin_threads(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        native.pin_threads(prev)


@torch.inference_mode()
def decode_one(phi: PhiForCausalLM, token: int, pos: int, cache: KVCache) -> torch.Tensor:
    """One token at position ``pos`` against the cache; logits [vocab] for the next."""
    with decode_threads():
        emb = phi.embed(torch.tensor([[token]], dtype=torch.long))
        return phi.logits(phi(emb, pos, cache)[0, -1])


def stream_tokens(
    phi: PhiForCausalLM,
    tokenizer: Tokenizer,
    cache: KVCache,
    first_logits: torch.Tensor,
    start_pos: int,
    max_new_tokens: int,
    sampler,
    stop_strings=STOP_STRINGS,
    stop_event=None,
    timings: dict | None = None,
) -> Iterator[GenerationStep]:
    """Sample from ``first_logits`` on and stream text deltas until a stop string, eos or the limit.

    ``start_pos`` is the position of the first new token. Text that could be the start of a stop
    string is held back until it is known not to be one. ``timings`` (image/prefill figures
    measured by the caller, with ``t0`` and ``t_first``) are completed and put on the last step.
    """
    decoder = StreamDecoder(tokenizer)
    generated: list[int] = []
    emitted = ""
    logits = first_logits
    finish = None
    delta, token = "", None
    t_first = time.perf_counter() if timings is None else timings.get("_t_first", time.perf_counter())
    # no inference mode around the loop: a generator suspended at ``yield`` inside one would leave
    # it switched on in the caller (autograd off for the rest of the thread if the stream is dropped)
    while finish is None:
        with torch.inference_mode():
            token = sampler(logits, generated)
        generated.append(token)
        if token == tokenizer.eos_id:
            finish = "eos"
            delta = decoder.text[len(emitted):]  # flush what was held back
        else:
            decoder.push(token)
            text, stopped = cut_at_stop(decoder.text, stop_strings)
            if stopped:
                finish = "stop"
            elif len(generated) >= max_new_tokens:
                finish = "length"
            elif stop_event is not None and stop_event.is_set():
                finish = "cancelled"
            safe = text if finish else text[: len(text) - held_back(text, stop_strings)]
            delta = safe[len(emitted):] if safe.startswith(emitted) else ""
        emitted += delta
        if finish is None:
            yield GenerationStep(delta, token)
            logits = decode_one(phi, token, start_pos + len(generated) - 1, cache)
    t_end = time.perf_counter()
    n_decode = len(generated) - 1
    out = {k: v for k, v in (timings or {}).items() if not k.startswith("_")}
    out.update({
        "new_tokens": len(generated),
        "decode_tok_s": n_decode / (t_end - t_first) if n_decode > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
    })
    if timings and "_t0" in timings:
        out["total_ms"] = (t_end - timings["_t0"]) * 1000
    yield GenerationStep(delta, token, finish, out)

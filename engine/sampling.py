"""Token choice: greedy or sampled with temperature, top-p and repetition penalty.

Samplers are closures made outside the model: ``sampler(logits [V], history ids) -> id``.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from tinyv.errors import TinyVError

Sampler = Callable[[torch.Tensor, Sequence[int]], int]


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' rule: seen tokens' logits divided by penalty if > 0, multiplied if < 0."""
    if penalty == 1.0 or not history:
        return logits
    idx = torch.tensor(sorted(set(history)), dtype=torch.long)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)
    remove[-1] = False
    out = logits.clone()
    out[order[remove]] = float("-inf")
    return out


def check_sampling(temperature: float, top_p: float, repetition_penalty: float) -> None:
    """A ``TinyVError`` for options out of range or not numbers (before any work is queued)."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise TinyVError(f"{name} must be a finite number; got {value!r}")
    if temperature < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise TinyVError(
            "sampling options out of range: temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0"
        )


def make_sampler(
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> Sampler:
    check_sampling(temperature, top_p, repetition_penalty)
    if temperature == 0:
        greedy = True
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())

    def sample(logits: torch.Tensor, history: Sequence[int]) -> int:
        logits = apply_repetition_penalty(logits.float(), history, repetition_penalty)
        if greedy:
            return int(torch.argmax(logits))
        logits = top_p_filter(logits / temperature, top_p)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample

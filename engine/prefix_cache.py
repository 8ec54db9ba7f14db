"""Recently used prompt prefixes with their KV, so a new question about an image already seen
prefills only its own tokens (``Engine.stream`` and ``tinyv ask`` too, not only a ``session``).

A prefix is the text before the image and the image's embeddings; its entry is keyed by the
image's content key (which names the bundle's vision graph) and that text (the template). Each
engine has its own cache, so another bundle never meets these entries. Entries keep exactly the
positions of the prefix, in the working cache's dtype (fp16 on the fused quantized path, else fp32:
a reused prefix gives the very tokens a fresh run gives), and the cache is bounded by bytes, least
recently used first out. Touched only on the engine's worker.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from tinyv.engine.generate import Prefix
from tinyv.engine.phi import PhiForCausalLM

DEFAULT_MAX_BYTES = 256 << 20  # a full-size Phi-2 prefix (~48 positions) is ~31 MB in fp32, ~16 MB in fp16


@dataclass
class StoredPrefix:
    k: torch.Tensor  # [layers, 1, heads, P, head_dim]
    v: torch.Tensor
    logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.logits))

    def restore(self, phi: PhiForCausalLM, room: int) -> Prefix:
        """A working prefix: a new KV cache holding these positions, with ``room`` more after them."""
        n = self.k.shape[3]
        cache = phi.new_cache(min(n + room, phi.cfg.max_positions))
        cache.k[:, :, :, :n] = self.k
        cache.v[:, :, :, :n] = self.v
        cache.length = n
        return Prefix(cache, n, self.logits, fresh=False)


class PrefixCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, StoredPrefix] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> StoredPrefix | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, prefix: Prefix) -> None:
        """Keep a copy of ``prefix``'s positions (the working cache goes on to hold an answer)."""
        n = prefix.length
        entry = StoredPrefix(prefix.cache.k[:, :, :, :n].clone(), prefix.cache.v[:, :, :, :n].clone(),
                             prefix.logits.clone())
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

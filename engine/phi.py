"""Phi-2 as modified by TinyGPT-V, with a preallocated KV cache (SPEC §1, details 10–13).

Differences from stock Phi-2 that change outputs: per-head q/k LayerNorm applied before the
partial rotary embedding (always, whatever ``qk_layernorm`` says), and an RMSNorm on the attention
branch of the parallel block: ``out = x + post_layernorm(attn(h)) + mlp(h)`` with
``h = input_layernorm(x)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinyv.engine.config import PhiConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class KVCache:
    """Preallocated keys and values for every layer: ``k``/``v`` are [L, B, H, max_len, D].

    ``dtype`` float16 halves it (the quantized engine's cache; attention reads it in fp32); the
    fp32 reference model keeps float32."""

    def __init__(self, cfg: PhiConfig, max_len: int, batch: int = 1, dtype=torch.float32, device=None):
        shape = (cfg.layers, batch, cfg.heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, H, S, D] at positions pos..pos+S-1; return all keys/values so far."""
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def ensure(self, capacity: int) -> None:
        """Grow to hold ``capacity`` positions, keeping the ones filled so far."""
        if capacity <= self.max_len:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:3] + (capacity,) + old.shape[4:])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)
        self.max_len = capacity

    def truncate(self, length: int) -> None:
        """Forget positions >= length (the cached prefix stays valid)."""
        self.length = min(self.length, length)


class Rotary(nn.Module):
    """NeoX ``rotate_half`` rotary on the first ``rotary_dim`` dims of each head."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, pos: int, length: int, device=None):
        t = torch.arange(pos, pos + length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, rotary_dim]
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        # output rows laid out per head as [H, 3, D]: q, k, v interleaved (SPEC §1.10)
        self.query_key_value = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.q_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.eps)
        self.k_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.eps)

    def forward(self, x, rotary: Rotary, cos, sin, pos: int, cache: KVCache | None, layer: int):
        q, k, v = self._heads(x)
        return self.dense(self._attend(q, k, v, rotary, cos, sin, pos, cache, layer))

    def forward_batch(self, x, rotary: Rotary, rope: list, positions: list[int], caches: list[KVCache], layer: int):
        """x [M, 1, hidden]: row i is one token of sequence i, at ``positions[i]`` with cos/sin
        ``rope[i]`` over ``caches[i]``. The projections run once over all rows; attention per
        sequence, over its own cache."""
        q, k, v = self._heads(x)
        outs = [self._attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], rotary, *rope[i], positions[i], caches[i], layer)
                for i in range(x.shape[0])]
        return self.dense(torch.cat(outs))

    def _heads(self, x):
        """q, k, v [B, H, S, D] from x [B, S, hidden] (q and k LayerNormed, not yet rotated)."""
        B, S, _ = x.shape
        qkv = self.query_key_value(x).view(B, S, self.heads, 3, self.head_dim)
        q = self.q_layernorm(qkv[..., 0, :]).transpose(1, 2)  # [B, H, S, D]
        k = self.k_layernorm(qkv[..., 1, :]).transpose(1, 2)
        v = qkv[..., 2, :].transpose(1, 2)
        return q, k, v

    def _attend(self, q, k, v, rotary: Rotary, cos, sin, pos: int, cache: KVCache | None, layer: int):
        """Rotary, the cache, causal softmax attention: [B, S, hidden] before ``dense``."""
        B, _, S, _ = q.shape
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # an fp16 cache is read in fp32
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)  # [B, H, S, T]
        T = k.shape[2]
        if S > 1:
            # query i sits at absolute position pos + i and sees keys 0..pos + i
            qi = torch.arange(pos, pos + S, device=q.device).unsqueeze(1)
            kj = torch.arange(T, device=q.device).unsqueeze(0)
            scores = scores.masked_fill(kj > qi, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(B, S, -1)


class MLP(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.fc1, "forward_gelu", None)  # a quantized fc1 applies it in its kernel
        h = fused(x) if fused is not None else F.gelu(self.fc1(x), approximate="tanh")  # gelu_new
        return self.fc2(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rotary, cos, sin, pos, cache, layer):
        h = self.input_layernorm(x)
        attn = self.post_layernorm(self.self_attn(h, rotary, cos, sin, pos, cache, layer))
        return attn + self.mlp(h) + x

    def forward_batch(self, x, rotary, rope, positions, caches, layer):
        """One token each of M sequences, x [M, 1, hidden] (see ``Attention.forward_batch``)."""
        h = self.input_layernorm(x)
        attn = self.post_layernorm(self.self_attn.forward_batch(h, rotary, rope, positions, caches, layer))
        return attn + self.mlp(h) + x


class PhiForCausalLM(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)
        self.rotary = Rotary(cfg)
        self.kv_dtype = torch.float32  # of the caches new_cache makes
        # a fused one-token step (kernels/decoder.py's FusedDecoder, set by engine/llm.py), or None
        self.decoder = None

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` (a streaming subclass materializes it on demand)."""
        return self.layers[i]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, S, hidden] in fp32 (a bundle stores the table in fp16)."""
        return self.embed_tokens(ids).float()

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        p = self.final_layernorm.weight  # fp32 in every form of the model (quantized too)
        return KVCache(self.cfg, max_len or self.cfg.max_positions, batch, dtype=self.kv_dtype, device=p.device)

    def _check_room(self, pos: int, S: int, cache: KVCache | None) -> None:
        if pos + S > self.cfg.max_positions or (cache is not None and pos + S > cache.max_len):
            limit = self.cfg.max_positions if cache is None else min(cache.max_len, self.cfg.max_positions)
            raise ValueError(f"sequence of {pos + S} positions exceeds the context length {limit}")

    def decode(self, embeds: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits [vocab] after one token's embeds [1, 1, hidden] at ``pos`` (cache filled below it):
        the fused step when the model has one, else forward + lm_head."""
        if self.decoder is None or cache.k.shape[1] != 1:
            return self.logits(self(embeds, pos, cache)[0, -1])
        self._check_room(pos, 1, cache)
        logits = self.decoder.step(embeds, pos, cache.k, cache.v)
        cache.length = pos + 1
        return logits

    def decode_batch(self, embeds: torch.Tensor, positions: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Logits [M, vocab] after one token each of M independent sequences: embeds [M, 1, hidden],
        sequence i at ``positions[i]`` over ``caches[i]`` (batch 1, filled below it). Every Linear
        runs once over the M rows, so a step reads the weights once for all of them; attention runs
        per sequence over its own cache. On the fused step each row's logits are exactly those
        :meth:`decode` gives for that sequence alone."""
        M = embeds.shape[0]
        if len(positions) != M or len(caches) != M:
            raise ValueError(f"{M} token embeddings for {len(positions)} positions and {len(caches)} caches")
        for pos, cache in zip(positions, caches):
            self._check_room(pos, 1, cache)
        if self.decoder is not None and all(c.k.shape[1] == 1 for c in caches):
            logits = self.decoder.step_batch(embeds.reshape(M, -1), positions, [c.k for c in caches],
                                             [c.v for c in caches])
        else:
            rope = [tuple(t.to(embeds.dtype) for t in self.rotary.cos_sin(p, 1, device=embeds.device))
                    for p in positions]
            x = embeds
            for i in range(self.cfg.layers):
                x = self.layer(i).forward_batch(x, self.rotary, rope, positions, caches, i)
            logits = self.logits(self.final_layernorm(x)[:, -1])
        for pos, cache in zip(positions, caches):
            cache.length = pos + 1
        return logits

    def forward(self, embeds: torch.Tensor, pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states after ``final_layernorm`` for embeds [B, S, hidden] at positions pos..pos+S-1."""
        S = embeds.shape[1]
        self._check_room(pos, S, cache)
        cos, sin = self.rotary.cos_sin(pos, S, device=embeds.device)
        cos, sin = cos.to(embeds.dtype), sin.to(embeds.dtype)
        x = embeds
        for i in range(self.cfg.layers):
            x = self.layer(i)(x, self.rotary, cos, sin, pos, cache, i)
        if cache is not None:
            cache.length = pos + S
        return self.final_layernorm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

"""One decoded token as one CUDA graph replay (the GPU's counterpart of the CPU's fused step).

In eager PyTorch a token of Phi-2 is ~75 small kernels per layer, ~2400 in all: on a GPU the
token's time is their launch cost, not the 1.5 GB of weights it reads. ``static_decode_step`` is
the same step with static shapes — the query attends over the whole cache with the positions
after ``pos`` masked, the new K/V are written with ``index_copy_`` and rotary angles gathered
by index — so it can be captured once per KV cache and replayed for every token.

``CapturedDecode.first_step`` runs the eager step, captures, replays the same position and keeps
the graph only if its logits match the eager ones; a failed capture (e.g. LLM.int8()'s outlier
check syncs with the host) or a mismatch leaves the model on the eager step.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

# a replay must give the eager step's logits to this fraction of their largest magnitude
MATCH_TOLERANCE = 1e-2


def static_decode_step(phi, x: torch.Tensor, pos: torch.Tensor, cache, cos_all: torch.Tensor,
                       sin_all: torch.Tensor) -> torch.Tensor:
    """Logits [vocab] (on the device, fp32) after embeds ``x`` [1, 1, hidden] at position ``pos``
    (a 1-element long tensor on the device); writes that position's K/V into ``cache``.

    Numerically the eager step (``engine/phi.py``): the keys after ``pos`` get zero weight.
    """
    cfg = phi.cfg
    heads, dim = cfg.heads, cfg.head_dim
    cos, sin = cos_all.index_select(0, pos), sin_all.index_select(0, pos)  # [1, rotary_dim]
    later = torch.arange(cache.max_len, device=x.device) > pos  # [T]: positions not yet written
    for i, layer in enumerate(phi.layers):
        attn_mod = layer.self_attn
        h = layer.input_layernorm(x)
        qkv = attn_mod.query_key_value(h).view(1, 1, heads, 3, dim)
        q = attn_mod.q_layernorm(qkv[..., 0, :]).transpose(1, 2)  # [1, H, 1, D]
        k = attn_mod.k_layernorm(qkv[..., 1, :]).transpose(1, 2)
        v = qkv[..., 2, :].transpose(1, 2)
        q, k = phi.rotary.apply(q, cos, sin), phi.rotary.apply(k, cos, sin)
        keys, values = cache.k[i], cache.v[i]  # [1, H, T, D]
        keys.index_copy_(2, pos, k.to(keys.dtype))
        values.index_copy_(2, pos, v.to(values.dtype))
        scores = torch.matmul(q, keys.to(q.dtype).transpose(2, 3)) / math.sqrt(dim)  # [1, H, 1, T]
        scores = scores.masked_fill(later, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = attn_mod.dense(torch.matmul(probs, values.to(q.dtype)).transpose(1, 2).reshape(1, 1, -1))
        x = layer.post_layernorm(out) + layer.mlp(h) + x
    return phi.lm_head(phi.final_layernorm(x)[0, -1]).float()


class CapturedDecode:
    """The decode step of one KV cache, captured; ``step`` replays it."""

    def __init__(self, phi, cache):
        device = phi.device
        # a weak reference: a finished answer's cache is freed (the graph is then never replayed)
        self.phi, self.cache = phi, weakref.ref(cache)
        self.key = (cache.k.data_ptr(), cache.max_len)  # a grown cache is a new one
        self.x = torch.zeros(1, 1, phi.cfg.hidden, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.cos, self.sin = phi.rotary.cos_sin(0, cache.max_len, device=device)
        self.graph = None
        self.logits = None

    def capture(self, embeds: torch.Tensor, pos: int) -> None:
        """Warm up (cuBLAS handles, lazy library state) on a side stream, then capture. Both write
        position ``pos``'s K/V, which the caller's eager step has just written the same way."""
        self.x.copy_(embeds)
        self.pos.fill_(pos)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                static_decode_step(self.phi, self.x, self.pos, self.cache(), self.cos, self.sin)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = static_decode_step(self.phi, self.x, self.pos, self.cache(), self.cos, self.sin)
        self.graph = graph

    def step(self, embeds: torch.Tensor, pos: int) -> torch.Tensor:
        """CPU fp32 logits after ``embeds`` (CPU, [1, 1, hidden]) at ``pos``."""
        self.x.copy_(embeds)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits.cpu()

    def matches(self, reference: torch.Tensor, embeds: torch.Tensor, pos: int) -> bool:
        """Whether a replay at ``pos`` gives the eager step's logits ``reference``."""
        got = self.step(embeds, pos)
        return bool(torch.isfinite(got).all()) and \
            (got - reference).abs().max().item() <= MATCH_TOLERANCE * reference.abs().max().item()

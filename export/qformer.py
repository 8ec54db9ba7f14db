"""BLIP-2's Q-Former (BERT-base), the query side TinyGPT-V runs (SPEC §1, details 4, 6, 7).

Module names mirror the checkpoint's ``Qformer.bert.encoder.layer.N.*`` so the key table stays a
prefix rename.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinyv.engine.config import QFormerConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        out = scores.softmax(dim=-1) @ v
        B, H, N, D = out.shape
        return out.transpose(1, 2).reshape(B, N, H * D)


class Output(nn.Module):
    """dense -> LayerNorm(h + residual): BertSelfOutput / BertOutput."""

    def __init__(self, cfg: QFormerConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = SelfAttention(cfg, kv_width)
        self.output = Output(cfg, cfg.hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, kv), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT "gelu" is the exact erf form


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden)
        self.has_cross = index % cfg.cross_attention_freq == 0
        if self.has_cross:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = Output(cfg, cfg.intermediate)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)
        if self.has_cross:
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    """Learned queries attend to image tokens: [B, T, encoder_width] -> [B, num_queries, hidden].

    The image attention mask is all ones, so it is left out; queries get no position embeddings.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden))
        self.layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)  # embeddings.LayerNorm
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(self.query_tokens.expand(image_tokens.shape[0], -1, -1))
        for layer in self.layer:
            x = layer(x, image_tokens)
        return x

"""``QuantLinear``: a drop-in for ``nn.Linear`` over the stored quantized weights.

This is the straightforward torch path (dequantize a block of rows, matmul, next block): exact
with respect to the stored format and lean on memory. Faster kernels replace ``forward`` later
without changing what it computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyv.kernels.quant import QuantConfig, dequantize, unpack_int4

ROW_BLOCK = 2048  # rows dequantized at a time: bounds the fp32 transient (2048 x 10240 x 4 B = 84 MB)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, stored: dict, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        for name, t in stored.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def weight_rows(self, start: int, end: int) -> torch.Tensor:
        """fp32 rows start..end of the weight."""
        if self.cfg.bits == 16:
            return self.weight[start:end].float()
        q = self.qweight[start:end]
        if self.cfg.bits == 4:
            q = unpack_int4(q, self.cfg.group_size)
        return dequantize(q, self.scales[start:end], self.cfg.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features <= ROW_BLOCK:
            return F.linear(x, self.weight_rows(0, self.out_features), self.bias)
        outs = []
        for s in range(0, self.out_features, ROW_BLOCK):
            e = min(s + ROW_BLOCK, self.out_features)
            outs.append(F.linear(x, self.weight_rows(s, e), None if self.bias is None else self.bias[s:e]))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.cfg.bits}, group={self.cfg.group_size}"

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "bias")

"""``QuantLinear``: a drop-in for ``nn.Linear`` over the stored quantized weights.

Two paths compute it, chosen once when the layer is built. Given a ``Kernels`` object
(``kernels/native.py``), the compiled kernels quantize the activations to int8 per group and run
integer dot products straight over the stored weights — what the engine uses; for long 8-bit
prefills on CPUs with bf16 units (``Kernels.bf16_prefill_rows``) the layer dequantizes a block of
rows to bf16 and lets torch's bf16 matmul run instead. Without one (or at 16 bits), the torch path
(dequantize a block of rows, matmul, next block) is exact with respect to the stored format: the
reference, and the fallback when the kernels are not available.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyv.kernels.native import Kernels
from tinyv.kernels.quant import X16, QuantConfig, dequantize_weight, unpack_x16

ROW_BLOCK = 2048  # rows dequantized at a time: bounds the fp32 transient (2048 x 10240 x 4 B = 84 MB)


class QuantLinear(nn.Module):
    """``stored``: the weight as the bundle stores it (``qweight`` + ``scales``, or fp16 ``weight``
    at 16 bits), used in place. ``kernels``: the compiled kernels to run on, or None for the torch
    path; the route is fixed here, so a layer never changes path under a running engine."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, stored: dict, bias: torch.Tensor | None,
                 kernels: Kernels | None = None, x16: bool = False):
        super().__init__()
        if x16 and (kernels is None or not kernels.x16 or cfg.bits != 4):
            raise ValueError("the x16 layout is the int4 layout of kernels that run it")
        self.x16 = x16  # the int4 weight given is in the kernels' x16 layout (Kernels.pack_x16)
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        for name, t in stored.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        # the int kernels take 4- and 8-bit codes; fp16 weights always go through torch
        self.kernels = kernels if cfg.bits != 16 else None
        # from this many rows an 8-bit layer runs as a bf16 matmul (None: never)
        self.bf16_rows = self.kernels.bf16_prefill_rows if self.kernels is not None and cfg.bits == 8 else None

    def weight_rows(self, start: int, end: int) -> torch.Tensor:
        """fp32 rows start..end of the weight."""
        if self.x16:  # whole 16-row blocks back to the stored form, then the rows asked for
            b0, b1 = start // X16 * X16, -(-end // X16) * X16
            qweight, scales = unpack_x16(self.qweight[b0:b1], self.scales[b0:b1], self.cfg.group_size)
            w = dequantize_weight({"qweight": qweight, "scales": scales}, self.cfg)
            return w[start - b0 : end - b0]
        names = ("weight",) if self.cfg.bits == 16 else ("qweight", "scales")
        return dequantize_weight({n: getattr(self, n)[start:end] for n in names}, self.cfg)

    def native(self) -> bool:
        """Whether the compiled kernels compute this layer (fixed at construction)."""
        return self.kernels is not None

    def _bf16(self, x: torch.Tensor) -> bool:
        return self.bf16_rows is not None and x.numel() // self.in_features >= self.bf16_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return self.reference_forward(x)
        if self._bf16(x):
            return self.bf16_forward(x)
        return self.kernels.qgemm(x, self.qweight, self.scales, self.cfg.bits, self.cfg.group_size, self.bias,
                                  x16=self.x16)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu_tanh(self(x))``, with the GELU in the kernel's epilogue (no extra pass)."""
        if self.kernels is None:
            return F.gelu(self.reference_forward(x), approximate="tanh")
        if self._bf16(x):
            return F.gelu(self.bf16_forward(x), approximate="tanh")
        return self.kernels.qgemm(x, self.qweight, self.scales, self.cfg.bits, self.cfg.group_size, self.bias,
                                  gelu=True, x16=self.x16)

    def bf16_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: weight blocks dequantized to bf16, a bf16 matmul (fp32 accumulation in
        oneDNN), fp32 out; the bias added in fp32."""
        y = self._blocked_linear(x.to(torch.bfloat16), torch.bfloat16, None).float()
        return y if self.bias is None else y + self.bias

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path: dequantize ROW_BLOCK rows at a time to fp32 and matmul."""
        return self._blocked_linear(x, torch.float32, self.bias)

    def _blocked_linear(self, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` over ROW_BLOCK weight rows at a time, dequantized to ``dtype`` (bounds the transient)."""
        outs = []
        for s in range(0, self.out_features, ROW_BLOCK):
            e = min(s + ROW_BLOCK, self.out_features)
            outs.append(F.linear(x, self.weight_rows(s, e).to(dtype), None if bias is None else bias[s:e]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        route = "torch" if self.kernels is None else self.kernels.isa + (" x16" if self.x16 else "")
        return (f"in={self.in_features}, out={self.out_features}, bits={self.cfg.bits}, group={self.cfg.group_size}, "
                f"route={route}")

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "bias")

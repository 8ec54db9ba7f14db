"""Group-wise weight quantization: a config, then pure primitives (no modules, no I/O).

Formats (per output row, groups of ``group_size`` consecutive input columns, one fp16 scale each):

* int4 — llama.cpp Q4_0 rule: ``d = m / -8`` with ``m`` the group's value of largest magnitude
  (sign kept), ``q = clamp(round(w / d), -8, 7)``. Stored packed, two per byte as ``q + 8``;
  within a group byte ``j`` holds element ``j`` (low nibble) and ``j + group/2`` (high nibble),
  Q4_0's order, so a SIMD loop splits a loaded block into its two halves with one mask and one
  shift. g32: 4.5 bits per weight.
* int8 — symmetric ``d = absmax / 127``, ``q = round(w / d)`` in [-127, 127]. g32: 8.5 bits.
* 16 — no quantization, fp16 weights (the reference for the other two).

Weights stay row-major [N, K]: decoding streams each row's bytes and scales once per token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from tinyv.errors import TinyVError

BITS = (4, 8, 16)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 32

    def __post_init__(self):
        if self.bits not in BITS:
            raise TinyVError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise TinyVError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def scheme(self) -> str:
        return {4: "q4_0", 8: "q8_sym", 16: "fp16"}[self.bits]

    def bits_per_weight(self) -> float:
        return 16.0 if self.bits == 16 else self.bits + 16 / self.group_size

    def to_dict(self) -> dict:
        return {**asdict(self), "scheme": self.scheme, "scale_dtype": "float16", "layout": "row-major [N, K]",
                "int4_packing": "q+8, byte j of a group = element j (low nibble) | element j+g/2 (high nibble)"}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]))


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input width {k} is not a multiple of the group size {group_size}")
    return w.reshape(n, k // group_size, group_size)


def choose_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """fp16 scales [N, K/g] for a weight [N, K] (see the module docstring for the rules)."""
    g = _groups(w.float(), group_size)
    if bits == 4:
        idx = g.abs().argmax(-1, keepdim=True)
        d = g.gather(-1, idx).squeeze(-1) / -8.0
    elif bits == 8:
        d = g.abs().amax(-1) / 127.0
    else:
        raise ValueError(f"no scales for {bits} bits")
    d16 = d.to(torch.float16)
    # a group of zeros (or one whose scale underflows fp16) gets scale 0; quantize maps it to 0
    return d16


def quantize(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes int8 [N, K]: int4 in [-8, 7], int8 in [-127, 127]."""
    g = _groups(w.float(), group_size)
    d = scales.float().unsqueeze(-1)
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    lo, hi = (-8, 7) if bits == 4 else (-127, 127)
    q = torch.clamp(torch.round(g * inv), lo, hi)
    return q.reshape(w.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 [N, K] from codes int8 [N, K] and fp16 scales [N, K/g]."""
    g = _groups(q, group_size).float() * scales.float().unsqueeze(-1)
    return g.reshape(q.shape)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 codes in [-8, 7], [N, K] -> uint8 [N, K/2] in Q4_0 nibble order."""
    n, k = q.shape
    u = (_groups(q, group_size).to(torch.int16) + 8).to(torch.uint8)  # [N, K/g, g]
    half = group_size // 2
    packed = u[..., :half] | (u[..., half:] << 4)
    return packed.reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [N, K/2] -> int8 codes [N, K] (inverse of pack_int4)."""
    n, k2 = packed.shape
    p = packed.reshape(n, (2 * k2) // group_size, group_size // 2)
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.cat([lo, hi], dim=-1).reshape(n, 2 * k2)


X16 = 16  # output columns per block of the x16 layout


def unpack_x16(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored int4 form (``qweight`` [N, K/2] in Q4_0 order, ``scales`` [N, K/g]) of a weight
    the kernels repacked to their x16 layout (``kernels/csrc/kernels_x16.h``): per block
    of 16 rows, per group and 8-element piece, 64 bytes whose lane ``l`` (4 bytes) holds row
    ``16b + l``'s elements ``8p .. 8p+3`` (low nibbles) and ``8p+4 .. 8p+7`` (high); scales
    ``[K/g, 16]`` per block."""
    n, k2 = packed.shape
    k, g = 2 * k2, group_size
    ng, pieces = k // g, g // 8
    b = packed.reshape(n // X16, ng, pieces, X16, 4)
    lo, hi = (b & 0x0F).to(torch.int8) - 8, (b >> 4).to(torch.int8) - 8
    codes = torch.cat([lo, hi], dim=-1)  # [blocks, ng, pieces, 16, 8]: element 8p + j of group g
    codes = codes.permute(0, 3, 1, 2, 4).reshape(n, k)
    stored_scales = scales.reshape(n // X16, ng, X16).permute(0, 2, 1).reshape(n, ng)
    return pack_int4(codes, g), stored_scales.contiguous()


def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """The stored form of one Linear weight: {'qweight', 'scales'} (or {'weight'} at 16 bits)."""
    if cfg.bits == 16:
        return {"weight": w.to(torch.float16).contiguous()}
    scales = choose_scales(w, cfg.bits, cfg.group_size)
    q = quantize(w, scales, cfg.bits, cfg.group_size)
    qweight = pack_int4(q, cfg.group_size) if cfg.bits == 4 else q
    return {"qweight": qweight.contiguous(), "scales": scales.contiguous()}


def dequantize_weight(stored: dict[str, torch.Tensor], cfg: QuantConfig) -> torch.Tensor:
    """fp32 [N, K] from the stored form (inverse of quantize_weight up to rounding)."""
    if cfg.bits == 16:
        return stored["weight"].float()
    q = stored["qweight"]
    if cfg.bits == 4:
        q = unpack_int4(q, cfg.group_size)
    return dequantize(q, stored["scales"], cfg.group_size)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref, approx = ref.double(), approx.double()
    return sqnr_from_sums(ref.pow(2).sum().item(), (ref - approx).pow(2).sum().item())


def sqnr_from_sums(signal: float, noise: float) -> float:
    """``sqnr_db`` from its two float64 sums, Σ ref² and Σ (ref − approx)², which a caller may
    accumulate over blocks of a weight too large to compare at once."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)

"""The bundle's quantized Linear weights in bitsandbytes' formats: pure tensor functions.

bitsandbytes has no layer for the bundle's own formats (int4 Q4_0 / int8 with an fp16 scale per
group of 32-128), so each weight is dequantized and requantized — the conversion's error is
measured against the bundle's dequantized weight, not the fp32 original, which the bundle no
longer holds:

* 4 bits -> NF4 (``Linear4bit``), one block per bundle group. bitsandbytes scales a block by its
  absmax; here each block's scale is instead the best of ``NF4_SCALE_FACTORS`` x absmax (least
  squared error against the bundle's values): on Gaussian weights that lifts the SQNR against the
  bundle from 20.3 to 22.0 dB at g32 (the bundle itself is 21.3 dB from fp32). The packed codes
  and absmax are exactly what ``bitsandbytes.functional.quantize_4bit`` writes, so its kernels
  (CUDA gemv/gemm, CPU) read them unchanged.
* 8 bits -> ``Linear8bitLt`` (LLM.int8()): int8 per output row with an fp32 absmax per row, from
  ``bitsandbytes.functional.int8_vectorwise_quant`` — 41.5 dB against the bundle's g32 int8.

Work is done ``ROW_ELEMS`` weights at a time, on the device the weights go to.
"""
from __future__ import annotations

import torch

from tinyv.kernels.quant import QuantConfig, dequantize_weight, sqnr_from_sums

NF4_SCALE_FACTORS = tuple(0.8 + 0.2 * i / 15 for i in range(16))  # 1.0 last: bitsandbytes' own scale
ROW_ELEMS = 1 << 22  # weights converted at a time: bounds the transients (fp32 plus the search's copies)


def bundle_rows(stored: dict[str, torch.Tensor], qcfg: QuantConfig, start: int, end: int,
                device: torch.device) -> torch.Tensor:
    """fp32 rows start..end of a bundle Linear's weight, dequantized on ``device``."""
    return dequantize_weight({n: t[start:end].to(device) for n, t in stored.items()}, qcfg)


def row_blocks(rows: int, cols: int):
    """(start, end) row ranges of at most ROW_ELEMS weights (at least one row each)."""
    step = max(1, ROW_ELEMS // cols)
    for s in range(0, rows, step):
        yield s, min(s + step, rows)


def nf4_quantize(w: torch.Tensor, blocksize: int, code: torch.Tensor,
                 factors=NF4_SCALE_FACTORS) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``w`` [N, K] (K a multiple of ``blocksize``), packed as bitsandbytes packs them
    (flat row-major, two per byte, the first element in the high nibble: uint8 [N*K/2, 1]), and
    the fp32 scale (``absmax``) of each block of ``blocksize`` consecutive weights.

    ``code``: bitsandbytes' 16 NF4 values, ascending. With ``factors=(1.0,)`` this is exactly
    ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")``.
    """
    blocks = w.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1, keepdim=True)
    code = code.to(blocks.device, torch.float32)
    bounds = (code[1:] + code[:-1]) / 2
    best_err = best_idx = best_scale = None
    for f in factors:
        scale = absmax * f
        # bitsandbytes' rounding: x * (1 / absmax), clamped, to the nearest code value
        idx = torch.bucketize(torch.clamp(blocks * (1.0 / scale.clamp(min=1e-38)), -1, 1), bounds, out_int32=True)
        err = (code[idx] * scale - blocks).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_idx, best_scale = err, idx, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_idx = torch.where(better, idx, best_idx)
            best_scale = torch.where(better, scale, best_scale)
    q = best_idx.reshape(-1).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    return packed, best_scale.reshape(-1).contiguous()


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor,
                   shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [N, K] from ``nf4_quantize``'s output, in torch (the check the conversion is tested by
    against bitsandbytes' own ``dequantize_4bit``)."""
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=-1).reshape(-1).long()
    values = code.to(packed.device, torch.float32)[idx].reshape(-1, blocksize) * absmax.float().unsqueeze(-1)
    return values.reshape(shape)


def convert_nf4(stored: dict[str, torch.Tensor], qcfg: QuantConfig, shape: tuple[int, int], blocksize: int,
                code: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A 4-bit bundle Linear as (packed NF4 codes, absmax, SQNR in dB against the bundle's weight)."""
    n, k = shape
    packed, absmax, signal, noise = [], [], 0.0, 0.0
    for s, e in row_blocks(n, k):
        w = bundle_rows(stored, qcfg, s, e, device)
        p, a = nf4_quantize(w, blocksize, code)
        back = nf4_dequantize(p, a, blocksize, code, w.shape)
        signal += w.double().pow(2).sum().item()
        noise += (w.double() - back.double()).pow(2).sum().item()
        packed.append(p)
        absmax.append(a)
    return torch.cat(packed), torch.cat(absmax), sqnr_from_sums(signal, noise)


def convert_int8_rows(stored: dict[str, torch.Tensor], qcfg: QuantConfig, shape: tuple[int, int],
                      device: torch.device, rowwise_quant) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An 8-bit bundle Linear as LLM.int8()'s (int8 rows CB [N, K], fp32 row absmax SCB [N], SQNR
    in dB against the bundle's weight). ``rowwise_quant``: bitsandbytes'
    ``functional.int8_vectorwise_quant`` (it quantizes the fp16 weight)."""
    n, k = shape
    cb, scb, signal, noise = [], [], 0.0, 0.0
    for s, e in row_blocks(n, k):
        w = bundle_rows(stored, qcfg, s, e, device)
        c, sc, _ = rowwise_quant(w.to(torch.float16))
        back = c.float() * (sc.float() / 127.0).unsqueeze(-1)
        signal += w.double().pow(2).sum().item()
        noise += (w.double() - back.double()).pow(2).sum().item()
        cb.append(c)
        scb.append(sc.float())
    return torch.cat(cb), torch.cat(scb), sqnr_from_sums(signal, noise)

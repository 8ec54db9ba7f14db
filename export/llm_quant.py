"""Phi-2's bundle tensors, quantized tensor by tensor as they are read, with each Linear's SQNR.

Every Linear weight (query_key_value, dense, fc1, fc2, lm_head) is stored in the bundle's
quantized form; embeddings are fp16, biases and norms fp32.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from tinyv.engine.llm import LAYER_LINEARS, linear_names
from tinyv.kernels.quant import QuantConfig, dequantize_weight, quantize_weight, sqnr_from_sums

BLOCK_ELEMS = 1 << 22  # weights quantized this many at a time; lm_head whole cost ~5 GB of temporaries


def quantize_llm(weights, cfg, qcfg: QuantConfig, progress: Callable[[str, int, int], None] | None = None):
    """Bundle tensors of the LLM and the SQNR (dB) of every quantized Linear, streamed.

    ``weights`` is a ``PhiWeights``: each tensor is read, converted and let go before the next.
    """
    linears = set(linear_names(cfg.phi))
    tensors: dict[str, torch.Tensor] = {}
    sqnr: dict[str, float] = {}
    for n, target in enumerate(weights.targets, 1):
        name = target[len("phi."):]
        t = weights.get(target)
        if name.endswith(".weight") and name[: -len(".weight")] in linears:
            lin = name[: -len(".weight")]
            stored, sqnr[lin] = quantize_rows(t, qcfg)
            tensors.update({f"{lin}.{k}": v for k, v in stored.items()})
        elif name == "embed_tokens.weight":
            tensors[name] = t.to(torch.float16, copy=True).contiguous()  # a copy: no view pins the source file
        else:
            tensors[name] = t.float().contiguous().clone()
        del t
        if progress:
            progress("quantize", n, len(weights.targets))
    return tensors, sqnr


def quantize_rows(w: torch.Tensor, qcfg: QuantConfig) -> tuple[dict[str, torch.Tensor], float]:
    """``quantize_weight(w)`` and its ``sqnr_db``, a block of rows (``BLOCK_ELEMS`` weights) at a time.

    Rows are quantized independently, so the stored tensors are those of the whole weight; the
    SQNR's two sums are accumulated in float64 over the blocks, as ``sqnr_db`` sums them.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    signal = noise = 0.0
    for rows in w.split(max(1, BLOCK_ELEMS // w.shape[1])):
        ref = rows.float()
        stored = quantize_weight(ref, qcfg)
        err = ref.double() - dequantize_weight(stored, qcfg).double()
        noise += err.pow(2).sum().item()
        signal += ref.double().pow(2).sum().item()
        for k, v in stored.items():
            parts.setdefault(k, []).append(v)
        del ref, stored, err
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}, sqnr_from_sums(signal, noise)


def sqnr_summary(sqnr: dict[str, float]) -> dict:
    """The manifest's ``quality.sqnr_db``: min, mean, the five worst layers, means by kind, all."""
    finite = [v for v in sqnr.values() if math.isfinite(v)]
    worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:5]
    by_kind = {}
    for kind in LAYER_LINEARS + ("lm_head",):
        vals = [v for k, v in sqnr.items() if k.endswith(kind) and math.isfinite(v)]
        if vals:
            by_kind[kind] = round(sum(vals) / len(vals), 2)
    return {
        "min": min(finite) if finite else float("inf"),
        "mean": sum(finite) / len(finite) if finite else float("inf"),
        "worst": [{"layer": k, "db": round(v, 2)} for k, v in worst],
        "mean_by_kind": by_kind,
        "per_layer": {k: round(v, 3) for k, v in sqnr.items()},
    }

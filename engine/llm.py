"""The bundle's LLM: TinyGPT-V's Phi-2 with quantized Linear layers (module swap, same forward).

Bundle tensor names are the model's minus ``phi.``; a Linear's ``weight`` is stored as
``qweight`` + ``scales`` (int4 / int8) or as fp16 ``weight`` (16 bits). Embeddings are fp16,
norms and biases fp32.

On the compiled kernels at 4/8 bits a decoded token is one fused C call (``FusedDecoder``) over
an fp16 KV cache; prefill stays on the per-layer path. ``TINYV_DECODE=unfused`` turns that off
(per-layer decode, fp32 cache: the previous path, for comparisons).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from tinyv.engine.config import PhiConfig
from tinyv.errors import TinyVError
from tinyv.engine.phi import PhiForCausalLM, Rotary
from tinyv.kernels.decoder import DecoderDims, FusedDecoder
from tinyv.kernels.linear import QuantLinear
from tinyv.kernels.native import Kernels
from tinyv.kernels.quant import X16, QuantConfig

LAYER_LINEARS = ("self_attn.query_key_value", "self_attn.dense", "mlp.fc1", "mlp.fc2")


def linear_names(cfg: PhiConfig) -> list[str]:
    """Every quantized Linear, as bundle names (``layers.0.mlp.fc1``, …, ``lm_head``)."""
    return [f"layers.{i}.{n}" for i in range(cfg.layers) for n in LAYER_LINEARS] + ["lm_head"]


def stored_keys(name: str, qcfg: QuantConfig) -> tuple[str, ...]:
    return (f"{name}.weight",) if qcfg.bits == 16 else (f"{name}.qweight", f"{name}.scales")


def build_quant_phi(cfg: PhiConfig, tensors: Mapping[str, torch.Tensor], qcfg: QuantConfig,
                    kernels: Kernels | None = None, release_stored: bool = False) -> PhiForCausalLM:
    """A ``PhiForCausalLM`` whose Linears are ``QuantLinear`` over ``tensors`` (not copied), all
    running on ``kernels`` (None: the torch path).

    Where the kernels run int4 in their x16 layout (AVX-512 VNNI), every int4 Linear is repacked
    to it in new memory. ``release_stored``: the caller gives up ``tensors``' int4 weights (the
    engine's private mapping of the bundle): their pages go back to the system as each is
    repacked, so the weights stay resident once; else ``tensors`` are left as they were."""
    with torch.device("meta"):
        phi = PhiForCausalLM(cfg)
    used = set()
    x16 = (kernels is not None and kernels.x16 and qcfg.bits == 4
           and all(phi.get_submodule(n).out_features % X16 == 0 for n in linear_names(cfg)))

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise TinyVError(f"the bundle's LLM weights lack {key}: re-export the bundle")
        used.add(key)
        return tensors[key]

    for name in linear_names(cfg):
        old = phi.get_submodule(name)
        stored = {k.rsplit(".", 1)[1]: take(k) for k in stored_keys(name, qcfg)}
        if x16:
            stored = _repacked(name, stored, (old.out_features, old.in_features), kernels, qcfg, release_stored)
        new = QuantLinear(old.in_features, old.out_features, qcfg, stored, take(f"{name}.bias"), kernels=kernels,
                          x16=x16)
        parent, _, attr = name.rpartition(".")
        setattr(phi.get_submodule(parent) if parent else phi, attr, new)
    for key, param in list(phi.named_parameters()):
        *path, attr = key.split(".")
        t = take(key)
        if tuple(t.shape) != tuple(param.shape):
            raise TinyVError(f"the bundle's {key} has shape {list(t.shape)}, expected {list(param.shape)}")
        phi.get_submodule(".".join(path))._parameters[attr] = nn.Parameter(t, requires_grad=False)
    extra = set(tensors) - used
    if extra:
        raise TinyVError(f"the bundle's LLM weights hold tensors tinyv does not know: {sorted(extra)[:5]}")
    phi.rotary = Rotary(cfg)
    if kernels is not None and qcfg.bits in (4, 8) and decode_setting() == "fused":
        phi.decoder = fused_decoder(phi, qcfg, kernels)
        phi.kv_dtype = torch.float16  # the fused step reads and writes it directly
    return phi.eval()


def _repacked(name: str, stored: dict, shape: tuple[int, int], kernels: Kernels, qcfg: QuantConfig,
              release_source: bool) -> dict:
    """``stored`` (qweight, scales) of the Linear ``name`` [out, in] in the kernels' x16 layout, in
    new tensors; with ``release_source`` the stored tensors' pages go back to the system. The
    shapes are checked first (the C repack trusts them)."""
    qweight, scales = stored["qweight"], stored["scales"]
    n, k = shape
    want = {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, k // qcfg.group_size), torch.float16)}
    for key, t in (("qweight", qweight), ("scales", scales)):
        if (tuple(t.shape), t.dtype) != want[key]:
            raise TinyVError(f"the bundle's {name}.{key} is {list(t.shape)} {t.dtype}, expected "
                             f"{list(want[key][0])} {want[key][1]}: re-export the bundle")
    release = release_source and qweight.is_contiguous() and scales.is_contiguous()
    qweight, scales = kernels.pack_x16(qweight.contiguous(), scales.contiguous(), qcfg.group_size, release)
    return {"qweight": qweight, "scales": scales}


def decode_setting() -> str:
    """``TINYV_DECODE``: ``fused`` (default) or ``unfused``; anything else is a ``TinyVError``."""
    raw = os.environ.get("TINYV_DECODE", "fused")
    choice = raw.strip().lower() or "fused"
    if choice not in ("fused", "unfused"):
        raise TinyVError(f"TINYV_DECODE={raw!r} is not one of fused, unfused: unset it or set one of those")
    return choice


def fused_decoder(phi: PhiForCausalLM, qcfg: QuantConfig, kernels: Kernels) -> FusedDecoder:
    """The one-call decode step over ``phi``'s own (quantized) weights, on ``kernels``."""
    cfg = phi.cfg

    def linear(m: QuantLinear) -> tuple:
        return m.qweight, m.scales, m.bias

    layers = []
    for layer in phi.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append({
            "ln_w": layer.input_layernorm.weight, "ln_b": layer.input_layernorm.bias,
            "qkv": linear(attn.query_key_value), "dense": linear(attn.dense),
            "q_ln_w": attn.q_layernorm.weight, "q_ln_b": attn.q_layernorm.bias,
            "k_ln_w": attn.k_layernorm.weight, "k_ln_b": attn.k_layernorm.bias,
            "post_w": layer.post_layernorm.weight, "fc1": linear(mlp.fc1), "fc2": linear(mlp.fc2),
        })
    head = {"final_w": phi.final_layernorm.weight, "final_b": phi.final_layernorm.bias,
            "lm_head": linear(phi.lm_head)}
    cos, sin = phi.rotary.cos_sin(0, cfg.max_positions)
    dims = DecoderDims(cfg.hidden, cfg.layers, cfg.heads, cfg.head_dim, cfg.rotary_dim, cfg.intermediate,
                       cfg.vocab_size, cfg.max_positions, qcfg.bits, qcfg.group_size, cfg.eps, cfg.rms_eps,
                       x16=phi.lm_head.x16)
    return FusedDecoder(kernels, dims, layers, head, cos, sin)


def weight_bytes(phi: PhiForCausalLM) -> int:
    """Bytes of Linear weights streamed per decoded token (what bounds decode speed): every layer
    that counts its own (``QuantLinear``; the GPU path's ``DeviceLinear``)."""
    return sum(m.weight_bytes() for m in phi.modules() if callable(getattr(m, "weight_bytes", None)))

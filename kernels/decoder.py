"""The fused decode step: one token through every layer of a quantized Phi-2 in one C call.

``tv_decode_step`` (``kernels/csrc/decode.cpp``) runs input LayerNorm → qkv GEMV → per-head q/k
LayerNorm → partial NeoX rotary → KV append → attention → dense GEMV → post-attention RMSNorm,
fc1 GEMV + GELU → fc2 GEMV and the residuals, for all layers, then the final LayerNorm and
lm_head: no Python, ATen or allocation between the GEMVs, three thread-pool wake-ups per layer.

``step_batch`` runs several sequences' tokens as one step (``tv_decode_batch``): each Linear is
one GEMM over all of them, so a step reads the weights once however many sequences it carries.

This wrapper takes plain tensors and numbers (the engine builds it from its model, in
``engine/llm.py``) and keeps every tensor it hands to C alive; the weights are used in place.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from tinyv.kernels.native import Kernels

_RC_BUSY = -2
_RC_NO_MEMORY = -3
_p = ctypes.c_void_p


@dataclass(frozen=True)
class DecoderDims:
    """What the C handle needs to know of the model (``PhiConfig`` + the quantization)."""

    hidden: int
    layers: int
    heads: int
    head_dim: int
    rotary_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    bits: int
    group: int
    eps: float
    rms_eps: float
    x16: bool = False  # every Linear repacked to the AVX-512 x16 layout (Kernels.pack_x16)


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("hidden", "layers", "heads", "head_dim", "rotary_dim", "intermediate",
                                             "vocab", "max_positions", "bits", "group", "x16")] + [
        ("eps", ctypes.c_float), ("rms_eps", ctypes.c_float), ("rope_cos", _p), ("rope_sin", _p)]


class _QLinear(ctypes.Structure):
    _fields_ = [("w", _p), ("scales", _p), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln_w", _p), ("ln_b", _p), ("qkv", _QLinear), ("q_ln_w", _p), ("q_ln_b", _p), ("k_ln_w", _p),
                ("k_ln_b", _p), ("dense", _QLinear), ("post_w", _p), ("fc1", _QLinear), ("fc2", _QLinear)]


# (name in a layer dict, output rows, input width) of each Linear, as multiples of the dims
def _linear_shapes(d: DecoderDims) -> dict[str, tuple[int, int]]:
    return {"qkv": (3 * d.hidden, d.hidden), "dense": (d.hidden, d.hidden), "fc1": (d.intermediate, d.hidden),
            "fc2": (d.hidden, d.intermediate), "lm_head": (d.vocab, d.hidden)}


class FusedDecoder:
    """A C model handle over one model's weights, stepping on ``kernels``' context and threads.

    ``layers``: one dict per layer with fp32 vectors ``ln_w ln_b q_ln_w q_ln_b k_ln_w k_ln_b post_w``
    (a ``*_b`` may be None: zero) and Linears ``qkv dense fc1 fc2`` as (qweight, scales, bias)
    in the bundle's stored form; ``head``: ``final_w``, ``final_b`` and ``lm_head``. ``rope_cos``/
    ``rope_sin``: [max_positions, rotary_dim] tables (the model's own ``Rotary.cos_sin``, so the
    fused step rotates by the very values the torch path does). Used by one thread at a time.
    """

    def __init__(self, kernels: Kernels, dims: DecoderDims, layers: list[dict], head: dict,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        if len(layers) != dims.layers:
            raise ValueError(f"{len(layers)} layers given for a model of {dims.layers}")
        self.kernels, self.dims = kernels, dims
        lib, _ = kernels.handle()
        self._keep: list[torch.Tensor] = []  # every tensor C points into: alive as long as the handle
        self._shapes = _linear_shapes(dims)
        table = (dims.max_positions, dims.rotary_dim)
        c_dims = _Dims(**{k: getattr(dims, k) for k in DecoderDims.__dataclass_fields__},
                       rope_cos=self._vec(rope_cos, table), rope_sin=self._vec(rope_sin, table))
        handle = lib.tv_phi_new(ctypes.byref(c_dims))
        if not handle:
            raise ValueError(f"the fused decoder cannot take {dims}")
        self._lib, self._handle = lib, handle
        self._free = weakref.finalize(self, lib.tv_phi_free, handle)
        h, d = (dims.hidden,), (dims.head_dim,)
        for i, L in enumerate(layers):
            c = _Layer(ln_w=self._vec(L["ln_w"], h), ln_b=self._vec(L["ln_b"], h), qkv=self._linear("qkv", L["qkv"]),
                       q_ln_w=self._vec(L["q_ln_w"], d), q_ln_b=self._vec(L["q_ln_b"], d),
                       k_ln_w=self._vec(L["k_ln_w"], d), k_ln_b=self._vec(L["k_ln_b"], d),
                       dense=self._linear("dense", L["dense"]), post_w=self._vec(L["post_w"], h),
                       fc1=self._linear("fc1", L["fc1"]), fc2=self._linear("fc2", L["fc2"]))
            if lib.tv_phi_set_layer(handle, i, ctypes.byref(c)) != 0:
                raise ValueError(f"the fused decoder refused layer {i}'s weights")
        lm = self._linear("lm_head", head["lm_head"])
        if lib.tv_phi_set_head(handle, self._vec(head["final_w"], h), self._vec(head["final_b"], h), ctypes.byref(lm)):
            raise ValueError("the fused decoder refused the final LayerNorm / lm_head")

    def _vec(self, t: torch.Tensor | None, shape: tuple[int, ...]) -> int | None:
        """A pointer to ``t`` as contiguous fp32 (a converted copy kept if it is not already)."""
        if t is None:
            return None
        t = t.detach()
        if tuple(t.shape) != shape:
            raise ValueError(f"expected a tensor of shape {list(shape)}, got {list(t.shape)}")
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, name: str, stored: tuple) -> _QLinear:
        qweight, scales, bias = stored
        n, k = self._shapes[name]
        d = self.dims
        want = (n, k // 2) if d.bits == 4 else (n, k)
        if tuple(qweight.shape) != want or qweight.element_size() != 1 or tuple(scales.shape) != (n, k // d.group) \
                or scales.dtype != torch.float16:
            raise ValueError(f"{name}: weights {list(qweight.shape)} / scales {list(scales.shape)} {scales.dtype} "
                             f"are not {d.bits}-bit g{d.group} for [{n}, {k}]")
        qweight, scales = qweight.detach().contiguous(), scales.detach().contiguous()  # no copy when stored so
        self._keep += [qweight, scales]
        return _QLinear(qweight.data_ptr(), scales.data_ptr(), self._vec(bias, (n,)))

    def step(self, x: torch.Tensor, pos: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] for token embedding ``x`` [hidden] at ``pos``; its keys/values go into
        ``k``/``v`` ([layers, 1, heads, max_len, head_dim], fp16 or fp32, filled below ``pos``)."""
        return self.step_batch(x.reshape(1, -1), [pos], [k], [v])[0]

    def step_batch(self, x: torch.Tensor, positions: list[int], ks: list[torch.Tensor],
                   vs: list[torch.Tensor]) -> torch.Tensor:
        """Logits [M, vocab] for M sequences' token embeddings ``x`` [M, hidden], sequence i at
        ``positions[i]`` over its own cache ``ks[i]``/``vs[i]`` (as for :meth:`step`; all of one
        dtype). Every Linear reads its weights once for all M; each row's logits are exactly
        those :meth:`step` gives for that sequence alone."""
        d = self.dims
        lib, ctx = self.kernels.handle()
        M = len(positions)
        if M < 1 or len(ks) != M or len(vs) != M:
            raise ValueError(f"a batch needs as many caches as positions (>= 1), got {M}, {len(ks)}, {len(vs)}")
        x = x.detach().reshape(M, -1)
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        if x.shape[1] != d.hidden:
            raise ValueError(f"a token embedding has {d.hidden} values, got {x.shape[1]}")
        dtype = ks[0].dtype
        for t in (*ks, *vs):
            if t.dim() != 5 or tuple(t.shape[:3]) != (d.layers, 1, d.heads) or t.shape[4] != d.head_dim \
                    or t.dtype not in (torch.float16, torch.float32) or not t.is_contiguous() or t.dtype != dtype:
                raise ValueError(f"the KV cache must be contiguous fp16/fp32 [{d.layers}, 1, {d.heads}, len, "
                                 f"{d.head_dim}] for keys and values alike, got {list(t.shape)} {t.dtype}")
        for k, v in zip(ks, vs):
            if k.shape != v.shape:
                raise ValueError(f"keys {list(k.shape)} and values {list(v.shape)} of one cache differ")
        ptrs = ctypes.c_void_p * M
        ints = ctypes.c_int * M
        logits = torch.empty(M, d.vocab, dtype=torch.float32)
        rc = lib.tv_decode_batch(ctx, self._handle, M, x.data_ptr(), ints(*positions), ptrs(*(k.data_ptr() for k in ks)),
                                 ptrs(*(v.data_ptr() for v in vs)), ints(*(k.shape[3] for k in ks)),
                                 int(dtype == torch.float16), logits.data_ptr())
        if rc == _RC_BUSY:
            raise RuntimeError("the fused decoder (or its kernels) was called from two threads at once")
        if rc == _RC_NO_MEMORY:
            raise MemoryError(f"no memory for the fused decoder's scratch for {M} sequences")
        if rc != 0:
            raise ValueError(f"a position of {positions} is outside its cache ({[k.shape[3] for k in ks]}) or the "
                             f"model's context ({d.max_positions})")
        return logits

    def profile(self, reset: bool = True) -> dict:
        """Milliseconds per step since the last reset: GEMV phases, attention phases, the rest."""
        ns = (ctypes.c_double * 3)()
        steps = self._lib.tv_phi_profile(self._handle, ns, int(reset))
        per = 1e-6 / max(steps, 1)
        return {"steps": steps, "gemv_ms": ns[0] * per, "attention_ms": ns[1] * per, "other_ms": ns[2] * per}

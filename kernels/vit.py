"""The ViT trunk of a vision graph in one C call (``kernels/csrc/vit.cpp``).

Every pre-norm block of an EVA-style ViT — LayerNorm, qkv, attention, proj + residual, LayerNorm,
fc1 + exact GELU, fc2 + residual — fused. Two precisions: int8 weights (one scale per output
column, as ONNX Runtime's dynamic quantization stores them) with activations quantized per row to
uint8 and int8 attention scores; or fp32 weights computed in bf16 products with fp32 sums (the
high-precision graph). AVX-512 VNNI + BF16 CPUs only (:func:`trunk_supported`).

The handle copies (repacks) every weight when it is built: the arrays handed in may be file
mappings the caller drops afterwards. ``engine/vision_native.py`` finds these weights in a
bundle's ``vision.onnx``.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import numpy as np

from tinyv.kernels.native import Kernels

_RC_BUSY, _RC_NO_MEMORY = -2, -3
_p = ctypes.c_void_p


@dataclass(frozen=True)
class TrunkDims:
    width: int
    heads: int
    head_dim: int
    mlp: int
    blocks: int
    eps: float
    scale: float  # the attention scores' scale
    bf16: bool = False  # fp32 weights computed in bf16 (else int8 weights)


@dataclass(frozen=True)
class TrunkLinear:
    """``y = x @ (weight * scale) + bias``: ``weight`` int8 [K, N] with ``scale`` fp32 [N], or
    fp32 [K, N] with ``scale`` None (a bf16 trunk)."""

    weight: np.ndarray
    scale: np.ndarray | None
    bias: np.ndarray | None


@dataclass(frozen=True)
class TrunkBlock:
    ln1_w: np.ndarray
    ln1_b: np.ndarray | None
    qkv: TrunkLinear
    proj: TrunkLinear
    ln2_w: np.ndarray
    ln2_b: np.ndarray | None
    fc1: TrunkLinear
    fc2: TrunkLinear


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("width", "heads", "head_dim", "mlp", "blocks", "bf16")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class _Linear(ctypes.Structure):
    _fields_ = [("w", _p), ("scale", _p), ("bias", _p)]


class _Block(ctypes.Structure):
    _fields_ = [("ln1_w", _p), ("ln1_b", _p), ("qkv", _Linear), ("proj", _Linear), ("ln2_w", _p), ("ln2_b", _p),
                ("fc1", _Linear), ("fc2", _Linear)]


def trunk_supported(kernels: Kernels | None) -> bool:
    """Whether ``kernels`` can run a trunk: the compiled library on a CPU with AVX-512 VNNI and BF16,
    on its AVX-512 path (not a forced narrower one)."""
    if kernels is None or kernels.isa != "avx512-vnni":
        return False
    lib, _ = kernels.handle()
    return bool(lib.tv_vit_supported())


def _f32(a: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {a.shape}")
    return a


class VitTrunk:
    """A C trunk handle with its own copy of the weights, run on ``kernels``' context and threads
    (one call at a time: a second thread gets RuntimeError rather than a race)."""

    def __init__(self, kernels: Kernels, dims: TrunkDims, blocks):
        """``blocks``: an iterable of ``dims.blocks`` :class:`TrunkBlock`; each is dropped once
        copied, so a generator over file mappings keeps one block's pages resident at a time."""
        if not trunk_supported(kernels):
            raise ValueError(f"{kernels!r} cannot run the ViT trunk (needs AVX-512 VNNI and BF16)")
        self._kernels = kernels
        self._lib, ctx = kernels.handle()
        self.dims = dims
        cd = _Dims(dims.width, dims.heads, dims.head_dim, dims.mlp, dims.blocks, int(dims.bf16), dims.eps, dims.scale)
        handle = self._lib.tv_vit_new(ctypes.byref(cd))
        if not handle:
            raise ValueError(f"the ViT trunk cannot take {dims}")
        self._handle = handle
        self._free = weakref.finalize(self, self._lib.tv_vit_free, handle)
        self._free.atexit = False
        D, F = dims.width, dims.mlp
        want = np.dtype(np.float32 if dims.bf16 else np.int8)
        shapes = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, F), "fc2": (F, D)}
        count = 0
        for i, b in enumerate(blocks):
            if i >= dims.blocks:
                raise ValueError(f"more than the {dims.blocks} blocks declared")
            count += 1
            keep = []  # the arrays must live until tv_vit_set_block has copied them

            def vec(a, n, what):
                a = _f32(a, n, f"block {i} {what}")
                keep.append(a)
                return None if a is None else a.ctypes.data

            def linear(name):
                lin: TrunkLinear = getattr(b, name)
                w = np.ascontiguousarray(lin.weight)
                if w.dtype != want or w.shape != shapes[name] or (lin.scale is None) != dims.bf16:
                    raise ValueError(f"block {i} {name}: expected {want.name} {shapes[name]}"
                                     f"{'' if dims.bf16 else ' with scales'}, got {w.dtype} {w.shape}")
                keep.append(w)
                n = shapes[name][1]
                return _Linear(w.ctypes.data, vec(lin.scale, n, f"{name} scale"), vec(lin.bias, n, f"{name} bias"))

            cb = _Block(vec(b.ln1_w, D, "ln1_w"), vec(b.ln1_b, D, "ln1_b"), linear("qkv"), linear("proj"),
                        vec(b.ln2_w, D, "ln2_w"), vec(b.ln2_b, D, "ln2_b"), linear("fc1"), linear("fc2"))
            self._check(self._lib.tv_vit_set_block(ctx, handle, i, ctypes.byref(cb)), f"block {i}")
            del keep, b
        if count != dims.blocks:
            raise ValueError(f"{dims.blocks} blocks declared, {count} given")

    def _check(self, rc: int, what: str) -> None:
        if rc == _RC_BUSY:
            raise RuntimeError("the ViT trunk was called from two threads at once")
        if rc == _RC_NO_MEMORY:
            raise MemoryError(f"out of memory for the ViT trunk ({what})")
        if rc != 0:
            raise ValueError(f"the ViT trunk refused {what}")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` [tokens, width] (or [1, tokens, width]) through every block, as a new fp32 array."""
        if not self._free.alive:
            raise RuntimeError("the ViT trunk is closed")
        shape = x.shape
        y = np.array(x, dtype=np.float32, order="C", copy=True).reshape(-1, self.dims.width)
        _, ctx = self._kernels.handle()
        self._check(self._lib.tv_vit_forward(ctx, self._handle, y.shape[0], y.ctypes.data), f"{y.shape[0]} tokens")
        return y.reshape(shape)

    def profile(self, reset: bool = False) -> dict:
        """Seconds in GEMMs, attention and the rest since the last reset, and the forwards counted."""
        ns = (ctypes.c_double * 3)()
        calls = self._lib.tv_vit_profile(self._handle, ns, int(reset))
        return {"gemm_s": ns[0] / 1e9, "attention_s": ns[1] / 1e9, "other_s": ns[2] / 1e9, "forwards": calls}

    def close(self) -> None:
        self._free()

"""The compiled CPU kernels (``kernels/csrc/``), loaded through a plain C ABI with ctypes.

``pip install .`` builds them with the system compiler into ``tinyv/kernels/_qgemm*.so``: one
binary with AVX-512 VNNI, AVX2 and portable code on x86-64, or NEON with i8mm, with dotprod and
plain on arm64 (Apple Silicon, Snapdragon, Graviton...), picked at run time from the CPU's features.

The route is resolved once: :func:`open_kernels` reads the setting, loads the library and
returns a :class:`Kernels` object (its own C context: ISA, thread count, thread pool), or None
for the pure-torch path. An engine opens one and hands it to every ``QuantLinear``; nothing here
keeps mutable module state, so two engines in one process never disturb each other.
:func:`describe` says which path an object runs (``tinyv bench`` prints it).

``TINYV_KERNELS`` = ``auto`` (default) | ``torch`` | ``avx512`` | ``avx2`` | ``neon-i8mm`` |
``neon-dotprod`` | ``neon`` | ``scalar`` — all but the first two force a path (capped at what the
CPU has; another architecture's path gives the scalar one), for tests and comparisons. Any other
value is an error (:func:`check_setting`), not a silent fall-back to the slow path.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import weakref

import torch

ISA_NAMES = ("scalar", "avx2", "avx512-vnni", "neon", "neon-dotprod", "neon-i8mm")  # by the C ABI's number
ABI_VERSION = 6
# setting -> the C ABI's ISA number
_FORCED_ISA = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3, "neon-dotprod": 4, "neon-i8mm": 5}
# a forcing setting -> the path it runs where the CPU has it (tests and benchmarks iterate over it)
PATH_OF_SETTING = {setting: ISA_NAMES[isa] for setting, isa in _FORCED_ISA.items()}
# tv_cpu_features' bits
_FEATURE_BITS = ((1, "avx2"), (2, "avx512-vnni"), (4, "neon"), (8, "neon-dotprod"), (16, "neon-i8mm"))
_BEST_ISA = -1
_FLAG_GELU = 1
_FLAG_X16 = 2
_PACK_HUGE_PAGES, _PACK_RELEASE_SOURCE = 1, 2  # tv_pack_q4_x16's flags
_RC_BUSY = -2
# Measured on the 2-core AVX-512 BF16 EPYC, Phi-2's 8-bit layers, 2 threads, GOP/s native vs bf16:
# M=128 74-77 vs 51-58, M=256 69-93 vs 94-100, M=512 71-83 vs 146-154. (4-bit: native 115-165 at
# M=128-512, bf16 no better, so 4-bit stays native.)
_BF16_PREFILL_ROWS = 256


def _library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_qgemm*.so")) + glob.glob(os.path.join(here, "_qgemm*.pyd"))
                   + glob.glob(os.path.join(here, "_qgemm*.dylib")))
    return found[0] if found else None


def _normalise(raw: str) -> str:
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "torch", *_FORCED_ISA):
        from tinyv.errors import TinyVError

        raise TinyVError(f"TINYV_KERNELS={raw!r} is not one of auto, torch, {', '.join(_FORCED_ISA)}: "
                         "unset it (auto picks the fastest path this CPU has) or set one of those")
    return choice


def check_setting() -> str:
    """The ``TINYV_KERNELS`` choice, normalised; a ``TinyVError`` if it is not one tinyv knows."""
    return _normalise(os.environ.get("TINYV_KERNELS", "auto"))


def _choice(setting: str | None) -> str:
    return check_setting() if setting is None else _normalise(setting)


@functools.cache
def _open_library(path: str) -> tuple[ctypes.CDLL | None, str]:
    """The library at ``path`` with its C ABI declared, or (None, why not). Cached: a CDLL is
    immutable, and loading the same file twice would give the same handle anyway."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"the compiled kernels failed to load: {e}"
    lib.tv_abi_version.restype = ctypes.c_int
    if lib.tv_abi_version() != ABI_VERSION:
        return None, "the compiled kernels are from another tinyv version: reinstall tinyv"
    ctx_p, c_int, ptr = ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p
    lib.tv_cpu_features.restype = c_int
    lib.tv_ctx_new.restype, lib.tv_ctx_new.argtypes = ctx_p, [c_int, c_int]
    lib.tv_ctx_free.restype, lib.tv_ctx_free.argtypes = None, [ctx_p]
    lib.tv_ctx_isa.restype, lib.tv_ctx_isa.argtypes = c_int, [ctx_p]
    lib.tv_ctx_threads.restype, lib.tv_ctx_threads.argtypes = c_int, [ctx_p]
    lib.tv_ctx_set_spin_us.restype, lib.tv_ctx_set_spin_us.argtypes = None, [ctx_p, c_int]
    lib.tv_qgemm.restype = c_int
    lib.tv_qgemm.argtypes = [  # ctx, M, N, K, x, ldx, w, scales, G, bits, bias, y, ldy, flags
        ctx_p, c_int, c_int, c_int, ptr, ctypes.c_long, ptr, ptr, c_int, c_int, ptr, ptr, ctypes.c_long, c_int,
    ]
    lib.tv_pack_q4_x16.restype = c_int
    lib.tv_pack_q4_x16.argtypes = [ctx_p, c_int, c_int, c_int, ptr, ptr, ptr, ptr, c_int]  # ctx, N, K, G, w, scales,
    # w_out, scales_out, flags
    # the fused decode step (kernels/decoder.py declares the structs)
    lib.tv_phi_new.restype, lib.tv_phi_new.argtypes = ptr, [ptr]
    lib.tv_phi_free.restype, lib.tv_phi_free.argtypes = None, [ptr]
    lib.tv_phi_set_layer.restype, lib.tv_phi_set_layer.argtypes = c_int, [ptr, c_int, ptr]
    lib.tv_phi_set_head.restype, lib.tv_phi_set_head.argtypes = c_int, [ptr, ptr, ptr, ptr]
    lib.tv_decode_step.restype = c_int
    lib.tv_decode_step.argtypes = [ctx_p, ptr, ptr, c_int, ptr, ptr, c_int, c_int, ptr]
    lib.tv_decode_batch.restype = c_int
    lib.tv_decode_batch.argtypes = [ctx_p, ptr, c_int, ptr, ptr, ptr, ptr, ptr, c_int, ptr]
    lib.tv_phi_profile.restype, lib.tv_phi_profile.argtypes = ctypes.c_long, [ptr, ptr, c_int]
    # the ViT trunk (kernels/vit.py declares the structs)
    lib.tv_vit_supported.restype = c_int
    lib.tv_vit_new.restype, lib.tv_vit_new.argtypes = ptr, [ptr]
    lib.tv_vit_free.restype, lib.tv_vit_free.argtypes = None, [ptr]
    lib.tv_vit_set_block.restype, lib.tv_vit_set_block.argtypes = c_int, [ctx_p, ptr, c_int, ptr]
    lib.tv_vit_forward.restype, lib.tv_vit_forward.argtypes = c_int, [ctx_p, ptr, c_int, ptr]
    lib.tv_vit_profile.restype, lib.tv_vit_profile.argtypes = ctypes.c_long, [ptr, ptr, c_int]
    return lib, ""


def _library() -> tuple[ctypes.CDLL | None, str]:
    path = _library_path()
    if path is None:
        return None, "the compiled kernels are not installed (no C++ compiler at install time?)"
    return _open_library(path)


def unavailable_reason(setting: str | None = None) -> str | None:
    """Why :func:`open_kernels` would return None (the torch path), or None when it would not.
    ``setting`` as for :func:`open_kernels`; a bad setting raises ``TinyVError``."""
    if _choice(setting) == "torch":
        return "TINYV_KERNELS=torch" if setting is None else "kernels setting 'torch'"
    lib, why = _library()
    return why if lib is None else None


def cpu_features() -> list[str]:
    """What this CPU offers of what the kernels use (empty without the library)."""
    lib, _ = _library()
    if lib is None:
        return []
    bits = lib.tv_cpu_features()
    return [name for bit, name in _FEATURE_BITS if bits & bit]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def open_kernels(threads: int | None = None, setting: str | None = None) -> Kernels | None:
    """The compiled kernels on ``threads`` threads (None or 0: ``torch.get_num_threads()`` now),
    or None for the torch path (``TINYV_KERNELS=torch``, or no usable library: see
    :func:`unavailable_reason`). ``setting`` overrides ``TINYV_KERNELS``; a bad one raises
    ``TinyVError``. The object is for one engine, used by one thread at a time."""
    choice = _choice(setting)
    if choice == "torch":
        return None
    lib, _ = _library()
    if lib is None:
        return None
    threads = threads or torch.get_num_threads()
    if threads < 0:
        raise ValueError(f"threads must be 1 or more (None: torch's count), got {threads}")
    # bf16 matmul beats the int8 kernel on long 8-bit prefills only with bf16 units (else torch
    # emulates it), and a forced kernel path is never rerouted
    bf16_units = any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    bf16_rows = _BF16_PREFILL_ROWS if choice == "auto" and bf16_units else None
    return Kernels(lib, _FORCED_ISA.get(choice, _BEST_ISA), threads, bf16_rows)


def describe(kernels: Kernels | None, setting: str | None = None) -> str:
    """One line for ``tinyv bench`` and logs: which kernels ``kernels`` runs, or why the torch
    path runs (``kernels`` None; ``setting`` as it was given to :func:`open_kernels`)."""
    if kernels is None:
        why = unavailable_reason(setting) or "no compiled kernels were opened"
        return f"torch reference (dequantize + matmul): {why}"
    return f"native {kernels.isa} (cpu offers: {', '.join(cpu_features()) or 'no SIMD path tinyv has'})"


class Kernels:
    """The compiled kernels resolved for one engine: an ISA, a thread count and a C context that
    owns its own thread pool. Made by :func:`open_kernels`. Not shared between threads at once
    (a clash raises RuntimeError rather than racing); two objects run side by side freely.

    ``bf16_prefill_rows``: from how many activation rows an 8-bit layer is faster as
    dequantize-to-bf16 + bf16 matmul than in the int8 kernel; None when never (no AVX-512
    BF16/AMX, or a forced kernel path).
    """

    def __init__(self, lib: ctypes.CDLL, isa_request: int, threads: int, bf16_prefill_rows: int | None):
        ctx = lib.tv_ctx_new(isa_request, threads)
        if not ctx:
            raise MemoryError("could not create a kernel context")
        self._lib, self._ctx = lib, ctx
        # frees the context on close() or garbage collection, whichever comes first; not at exit,
        # where the process ending stops the threads anyway and a daemon thread may still be inside
        self._free = weakref.finalize(self, lib.tv_ctx_free, ctx)
        self._free.atexit = False
        self.isa: str = ISA_NAMES[lib.tv_ctx_isa(ctx)]
        self.threads: int = lib.tv_ctx_threads(ctx)
        self.bf16_prefill_rows: int | None = bf16_prefill_rows
        # int4 weights run repacked to the x16 layout (kernels/csrc/kernels_x16.h) on this path:
        # 3x the prefill GEMM of the stored layout there (55 -> 167 GMAC/s a core at M = 64)
        self.x16: bool = self.isa == "avx512-vnni"

    def __repr__(self) -> str:
        state = "" if self._free.alive else ", closed"
        return f"Kernels(isa={self.isa!r}, threads={self.threads}{state})"

    def __deepcopy__(self, memo) -> Kernels:
        return self  # a runtime resource, not data: a copied model keeps running on it

    def close(self) -> None:
        """Stop the context's threads and free it (idempotent; garbage collection does it too)."""
        self._free()

    def handle(self) -> tuple[ctypes.CDLL, int]:
        """The library and the C context (for the fused decoder, ``kernels/decoder.py``)."""
        if not self._free.alive:
            raise RuntimeError(f"{self!r} is closed")
        return self._lib, self._ctx

    def pack_x16(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                 release_source: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """An int4 weight (``qweight`` uint8 [N, K/2], ``scales`` fp16 [N, K/g], contiguous, N a
        multiple of 16) in the x16 layout, in new tensors (huge pages where the system allows);
        only where ``self.x16``. ``release_source``: the caller gives the source up: its memory
        pages go back to the system (a file mapping's are re-read if touched; anonymous ones
        would read as zeros), so the weight is resident once."""
        if not self.x16:
            raise ValueError(f"{self!r} does not run the x16 layout")
        if not (qweight.is_contiguous() and scales.is_contiguous() and qweight.dtype == torch.uint8
                and scales.dtype == torch.float16):
            raise ValueError("pack_x16 takes contiguous uint8 codes and fp16 scales")
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        out_w, out_s = torch.empty_like(qweight), torch.empty_like(scales)
        rc = self._lib.tv_pack_q4_x16(self._ctx, n, k, group_size, qweight.data_ptr(), scales.data_ptr(),
                                      out_w.data_ptr(), out_s.data_ptr(),
                                      _PACK_HUGE_PAGES | (_PACK_RELEASE_SOURCE if release_source else 0))
        if rc == _RC_BUSY:
            raise RuntimeError(f"{self!r} was called from two threads at once: open one Kernels per thread")
        if rc != 0:
            raise ValueError(f"pack_x16 cannot take N={n} K={k} group={group_size}")
        return out_w, out_s

    def qgemm(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
              bias: torch.Tensor | None = None, gelu: bool = False, x16: bool = False) -> torch.Tensor:
        """``x [..., K] · W^T + bias`` (then GELU-tanh if asked) with W in the bundle's stored form,
        or int4 in the x16 layout (``pack_x16``) when ``x16``."""
        if not self._free.alive:
            raise RuntimeError(f"{self!r} is closed")
        K = x.shape[-1]
        N = qweight.shape[0]
        x2 = x.reshape(-1, K)
        if x2.dtype != torch.float32 or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=torch.float32)
        if M == 0:
            return y.reshape(*x.shape[:-1], N)
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        rc = self._lib.tv_qgemm(
            self._ctx, M, N, K, x2.data_ptr(), x2.stride(0), qweight.data_ptr(), scales.data_ptr(), group_size,
            bits, None if bias is None else bias.data_ptr(), y.data_ptr(), N,
            (_FLAG_GELU if gelu else 0) | (_FLAG_X16 if x16 else 0),
        )
        if rc == _RC_BUSY:
            raise RuntimeError(f"{self!r} was called from two threads at once: open one Kernels per thread")
        if rc != 0:
            raise ValueError(f"qgemm cannot take M={M} N={N} K={K} bits={bits} group={group_size}")
        return y.reshape(*x.shape[:-1], N)

"""The compiled CPU kernels (``kernels/csrc/qgemm.cpp``), loaded through a plain C ABI with ctypes.

``pip install .`` builds them with the system compiler into ``tinyv/kernels/_qgemm*.so``: one
binary with AVX-512 VNNI, AVX2 and portable code, picked at run time from the CPU's features.
When the library is missing (no compiler at install time) or ``TINYV_KERNELS=torch`` is set, the
engine keeps the pure-torch path; :func:`describe` says which one runs (``tinyv bench`` prints it).

``TINYV_KERNELS`` = ``auto`` (default) | ``torch`` | ``avx512`` | ``avx2`` | ``scalar`` — the last
three force a path (capped at what the CPU has), for tests and comparisons. Any other value is an
error (:func:`check_setting`), not a silent fall-back to the slow path.
"""
from __future__ import annotations

import ctypes
import glob
import os

import torch

ISA_NAMES = ("scalar", "avx2", "avx512-vnni")
_FORCE = {"scalar": 0, "avx2": 1, "avx512": 2}
FLAG_GELU = 1

_lib = None
_why = ""  # why the native path is off, when it is
_threads: int | None = None  # kernel threads when pinned; None = torch's intra-op count
_bf16_rows: int | None = None  # bf16_prefill_rows() once read (0: never)


def _library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_qgemm*.so")) + glob.glob(os.path.join(here, "_qgemm*.pyd")))
    return found[0] if found else None


def check_setting() -> str:
    """The ``TINYV_KERNELS`` choice, normalised; a ``TinyVError`` if it is not one tinyv knows."""
    raw = os.environ.get("TINYV_KERNELS", "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "torch", *_FORCE):
        from tinyv.errors import TinyVError

        raise TinyVError(f"TINYV_KERNELS={raw!r} is not one of auto, torch, avx512, avx2, scalar: "
                         "unset it (auto picks the fastest path this CPU has) or set one of those")
    return choice


def _load():
    global _lib, _why
    choice = check_setting()
    if choice == "torch":
        _why = "TINYV_KERNELS=torch"
        return None
    path = _library_path()
    if path is None:
        _why = "the compiled kernels are not installed (no C++ compiler at install time?)"
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        _why = f"the compiled kernels failed to load: {e}"
        return None
    lib.tv_abi_version.restype = ctypes.c_int
    if lib.tv_abi_version() != 1:
        _why = "the compiled kernels are from another tinyv version: reinstall tinyv"
        return None
    lib.tv_qgemm.restype = ctypes.c_int
    lib.tv_qgemm.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
        ctypes.c_int, ctypes.c_int,
    ]
    lib.tv_set_isa.argtypes = [ctypes.c_int]
    if choice in _FORCE:
        lib.tv_set_isa(_FORCE[choice])
    return lib


def lib():
    """The loaded library, or None (then :func:`describe` says why); a bad ``TINYV_KERNELS`` raises."""
    global _lib
    if _lib is None and not _why:
        _lib = _load()
    return _lib


def available() -> bool:
    return lib() is not None


def isa() -> str | None:
    """The path in use: ``avx512-vnni``, ``avx2`` or ``scalar`` (None without the library)."""
    return ISA_NAMES[lib().tv_get_isa()] if available() else None


def cpu_features() -> list[str]:
    """What this CPU offers of what the kernels use."""
    if not available():
        return []
    bits = lib().tv_cpu_features()
    return [name for bit, name in ((1, "avx2"), (2, "avx512-vnni")) if bits & bit]


def describe() -> str:
    """One line for ``tinyv bench`` and logs: which kernels run and why."""
    if not available():
        return f"torch reference (dequantize + matmul): {_why}"
    return f"native {isa()} (cpu offers: {', '.join(cpu_features()) or 'none of avx2/avx512-vnni'})"


def bf16_prefill_rows() -> int | None:
    """From how many activation rows an 8-bit layer is faster as dequantize-to-bf16 + bf16 matmul
    than in the int8 kernel, on this CPU; None when never (no AVX-512 BF16/AMX, so torch's bf16
    matmul is emulated, or ``TINYV_KERNELS`` forces a kernel path).

    Measured on the 2-core AVX-512 BF16 EPYC, Phi-2's 8-bit layers, 2 threads, GOP/s native vs bf16:
    M=128 74-77 vs 51-58, M=256 69-93 vs 94-100, M=512 71-83 vs 146-154. (4-bit: native 115-165 at
    M=128-512, bf16 no better, so 4-bit stays native.)
    """
    global _bf16_rows
    if _bf16_rows is None:
        fast = any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
        _bf16_rows = 256 if fast and check_setting() == "auto" else 0
    return _bf16_rows or None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pin_threads(n: int | None) -> int | None:
    """Run the kernels on ``n`` threads whatever torch's count is (None: follow torch); returns
    the previous setting. Decoding pins it and drops torch to one thread, so torch's OpenMP pool
    does not spin on the cores the kernels need (tiny M = 1 ops gain nothing from it)."""
    global _threads
    prev, _threads = _threads, n
    return prev


def reset() -> None:
    """Forget the loaded library so the next call reads TINYV_KERNELS again (tests)."""
    global _lib, _why, _bf16_rows
    _lib, _why, _bf16_rows = None, "", None


def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
          bias: torch.Tensor | None = None, gelu: bool = False, threads: int | None = None) -> torch.Tensor:
    """``x [..., K] · W^T + bias`` (then GELU-tanh if asked) with W in the bundle's stored form."""
    lib_ = lib()
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
    rc = lib_.tv_qgemm(
        M, N, K, x2.data_ptr(), x2.stride(0), qweight.data_ptr(), scales.data_ptr(), group_size, bits,
        None if bias is None else bias.data_ptr(), y.data_ptr(), N, FLAG_GELU if gelu else 0,
        threads or _threads or torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"qgemm cannot take M={M} N={N} K={K} bits={bits} group={group_size}")
    return y.reshape(*x.shape[:-1], N)


def open_kernels(threads=None, setting=None):  # TEMPORARY bridge until the Kernels object lands
    if not available():
        return None
    pin_threads(threads or torch.get_num_threads())
    return lib()

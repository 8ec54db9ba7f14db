"""Build of tinyv's compiled CPU kernels; everything else is declared in setup.cfg.

The repository root is the ``tinyv`` package itself, so this file is kept out of it, and the
kernels are an optional extension: without a C++ compiler tinyv still installs and runs on the
pure-torch path (``tinyv bench`` says which path runs).
"""
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("tinyv", "setup")]


# A plain C ABI library (loaded with ctypes): no Python or torch headers, so one binary serves
# every Python and torch version. CPU-specific code carries target attributes and is chosen at
# run time, so no -march flag: the binary runs on any x86-64 (AVX-512 VNNI, AVX2 or scalar) or
# any arm64 (NEON with i8mm, with dotprod, or plain), Linux with GCC or clang, macOS with clang.
# -Wno-unknown-warning-option first: clang then ignores the GCC-only flag after it.
qgemm = Extension(
    "tinyv.kernels._qgemm",
    sources=[f"kernels/csrc/{c}" for c in ("qgemm.cpp", "decode.cpp", "act.cpp", "pool.cpp", "cpu_features.cpp",
                                           "kernels_neon.cpp", "vit.cpp")],
    depends=[f"kernels/csrc/{h}" for h in ("tinyv_kernels.h", "ctx.h", "job.h", "act.h", "pool.h", "kernels_avx2.h",
                                          "kernels_avx512.h", "kernels_x16.h", "x16_pack.h", "decode_ops.h",
                                          "cpu_features.h", "kernels_neon.h", "kernels_neon_body.h",
                                          "decode_ops_neon.h", "vit_math.h", "vit_gemm.h", "vit_attention.h",
                                          "vit_pack.h")],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-unknown-warning-option",
                        "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread"],
    optional=True,
)

# A macOS universal2 Python builds extensions for arm64 and x86_64 at once; build for this machine
# only (the other half would never run, and the x86 half's CPU detection needs Apple clang 16+).
if sys.platform == "darwin" and "ARCHFLAGS" not in os.environ:
    os.environ["ARCHFLAGS"] = f"-arch {platform.machine()}"

setup(ext_modules=[qgemm], cmdclass={"build_py": BuildPy})

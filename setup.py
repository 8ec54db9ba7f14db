"""Build of tinyv's compiled CPU kernels; everything else is declared in setup.cfg.

The repository root is the ``tinyv`` package itself, so this file is kept out of it, and the
kernels are an optional extension: without a C++ compiler tinyv still installs and runs on the
pure-torch path (``tinyv bench`` says which path runs).
"""
from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("tinyv", "setup")]


# A plain C ABI library (loaded with ctypes): no Python or torch headers, so one binary serves
# every Python and torch version. CPU-specific code carries target attributes and is chosen at
# run time, so no -march flag: the binary runs on any x86-64.
qgemm = Extension(
    "tinyv.kernels._qgemm",
    sources=["kernels/csrc/qgemm.cpp", "kernels/csrc/decode.cpp", "kernels/csrc/act.cpp", "kernels/csrc/pool.cpp"],
    depends=[f"kernels/csrc/{h}" for h in ("tinyv_kernels.h", "ctx.h", "job.h", "act.h", "pool.h", "kernels_avx2.h",
                                          "kernels_avx512.h", "decode_ops.h")],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[qgemm], cmdclass={"build_py": BuildPy})

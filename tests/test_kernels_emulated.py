"""The arm64 kernels, cross-compiled and run under user-mode emulation, one CPU model per run.

``tests/native/kernel_check.cpp``, built with ``kernels/csrc/*.cpp`` for aarch64 (static, the
flags ``setup.py`` uses), checks every path the emulated CPU has against the library's scalar
reference: tv_qgemm over the x86 tests' odd shapes, groups of 32/64/128, 1-4 threads and
misaligned pointers (to 1e-5 of the output's magnitude, and bit for bit on integer-valued data,
where every float step is exact), the decode step's activation quantization (bit for bit), GELU
and attention, and tv_decode_step. Under ``qemu-aarch64 -cpu max`` (dotprod and i8mm),
``cortex-a76`` (dotprod, no i8mm) and ``cortex-a57`` (plain NEON) the run-time dispatch must pick
the CPU's best path, and a path the CPU lacks must never run (it would die of SIGILL).

Needs ``g++-aarch64-linux-gnu`` and ``qemu-user``. Skipped with that reason where they are missing
(the README's test command must pass on a fresh machine), except where
``TINYV_REQUIRE_ARM64_EMULATION=1``: ``.ci/run`` installs them with apt and sets it, so CI runs
these checks or fails.
"""
import concurrent.futures
import glob
import hashlib
import os
import platform
import shutil
import subprocess

import pytest
from filelock import FileLock

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DRIVER = os.path.join(ROOT, "tests", "native", "kernel_check.cpp")
PATHS = ["neon", "neon-dotprod", "neon-i8mm"]  # in the order each includes the one before
CPU_MODELS = {"max": "neon-i8mm", "cortex-a76": "neon-dotprod", "cortex-a57": "neon"}
KERNELS = ["qgemm-int4", "qgemm-int8", "exact-int4", "exact-int8", "misaligned-int4", "misaligned-int8",
           "quantize-int4", "quantize-int8", "gelu", "attention", "decode-int4", "decode-int8"]
# setup.py's flags, plus -static so that qemu-aarch64 needs no aarch64 sysroot at run time
FLAGS = ["-O3", "-std=c++17", "-Wno-uninitialized", "-Wno-maybe-uninitialized", "-pthread"]


def _tools() -> tuple[str, str]:
    native_arm = platform.machine().lower() in ("aarch64", "arm64")
    cxx = shutil.which("aarch64-linux-gnu-g++") or (shutil.which("g++") if native_arm else None)
    qemu = shutil.which("qemu-aarch64")
    if cxx and qemu:
        return cxx, qemu
    missing = " and ".join(n for n, found in (("aarch64-linux-gnu-g++", cxx), ("qemu-aarch64", qemu)) if not found)
    why = f"{missing} not found: apt-get install g++-aarch64-linux-gnu qemu-user (.ci/run does)"
    if os.environ.get("TINYV_REQUIRE_ARM64_EMULATION") == "1":  # .ci/run installs them and sets this
        pytest.fail(f"{why}; TINYV_REQUIRE_ARM64_EMULATION=1 says this machine must run the arm64 checks")
    pytest.skip(why)


def _build(cxx: str, out: str) -> None:
    """The driver and the kernels, one compiler process per source (two at a time), then linked."""
    sources = sorted(glob.glob(os.path.join(ROOT, "kernels", "csrc", "*.cpp"))) + [DRIVER]
    work = out + ".objs"
    os.makedirs(work, exist_ok=True)

    def compile_one(src: str) -> str:
        obj = os.path.join(work, os.path.basename(src) + ".o")
        flags = FLAGS if src != DRIVER else [*FLAGS, "-O1"]  # the driver is not what is tested: build it fast
        r = subprocess.run([cxx, *flags, "-c", src, "-o", obj], capture_output=True, text=True)
        assert r.returncode == 0, f"{os.path.basename(src)} does not compile for aarch64:\n{r.stderr[-4000:]}"
        return obj

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        objects = list(pool.map(compile_one, sources))
    r = subprocess.run([cxx, "-static", "-pthread", *objects, "-o", out + ".tmp"], capture_output=True, text=True)
    assert r.returncode == 0, f"linking the aarch64 driver failed:\n{r.stderr[-4000:]}"
    os.replace(out + ".tmp", out)  # complete or absent: a worker waiting on the lock never sees half a file
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def arm_driver(tmp_path_factory) -> tuple[str, str]:
    """(qemu-aarch64, the static aarch64 driver), built once per test session: with pytest-xdist
    the workers share the session's temporary root, and the first to take the lock builds it."""
    cxx, qemu = _tools()
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's, above every worker's own
    key = hashlib.sha256()
    for src in sorted(glob.glob(os.path.join(ROOT, "kernels", "csrc", "*"))) + [DRIVER]:
        with open(src, "rb") as f:
            key.update(f.read())
    out = str(root / f"kernel_check-aarch64-{key.hexdigest()[:16]}")
    with FileLock(out + ".lock"):
        if not os.path.exists(out):
            _build(cxx, out)
    return qemu, out


@pytest.mark.parametrize("model", list(CPU_MODELS))
def test_every_arm64_path_matches_the_scalar_reference_under_emulation(arm_driver, model):
    qemu, driver = arm_driver
    r = subprocess.run([qemu, "-cpu", model, driver], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[-1:] == ["done pass"], (
        f"-cpu {model}: exit {r.returncode}\n{r.stdout[-6000:]}{r.stderr[-2000:]}")
    best = CPU_MODELS[model]
    assert lines[0] == f"best {best}", f"-cpu {model} dispatched to {lines[0]}, expected {best}"
    # a request above what the CPU has is capped to its best; the others run as asked
    caps = [ln.split()[1:] for ln in lines if ln.startswith("cap ")]
    rank = PATHS.index(best)
    assert caps == [[p, PATHS[min(i, rank)]] for i, p in enumerate(PATHS)]
    checks = {}
    for ln in lines:
        if ln.startswith("check "):
            _, isa, kernel, cases, verdict = ln.split()[:5]
            checks[(isa, kernel)] = (int(cases), verdict)
    want = {(isa, k) for isa in PATHS[: rank + 1] for k in KERNELS}
    assert set(checks) == want, f"checked {sorted(checks)}, expected {sorted(want)}"
    assert all(cases > 0 and verdict == "pass" for cases, verdict in checks.values()), checks

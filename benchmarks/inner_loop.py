"""Instructions in each kernel's inner loop, counted in the compiled code (``objdump -d``).

    python benchmarks/inner_loop.py [--compiler g++|clang++-19 ...]

Builds one translation unit per architecture that instantiates the x86 kernels (kernels_avx2.h,
kernels_avx512.h) and the arm64 ones (kernels_neon.cpp) as standalone functions, with setup.py's
flags, then finds in each the innermost loop holding its dot-product instruction (the smallest
cycle of the control-flow graph through one) and prints the instructions of one iteration per
64 bytes of weights. Static counts of the hot loop, not a measurement of speed: the arm64 code is
cross-compiled (``aarch64-linux-gnu-g++``, or ``clang++ --target=aarch64-linux-gnu``).
"""
from __future__ import annotations

import argparse
import glob
import heapq
import os
import re
import shutil
import subprocess
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "csrc")
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-Wno-unknown-warning-option", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
DOTS = {"sdot", "smmla", "smull", "vpdpbusd", "vpmaddubsw"}


def is_dot(mnem: str, ops: str) -> bool:
    """A vector dot-product instruction (not the scalar smull of index arithmetic)."""
    return mnem.split(".")[0] in DOTS and re.search(r"\bv\d+\.|%[xyz]mm", ops) is not None

# (architecture, label, function, weight bytes per loop iteration, activation rows)
KERNELS = [
    ("x86", "int4 AVX-512 VNNI", "tinyv::Q4Avx512<32>::block<1>", 64, 1),
    ("x86", "int4 AVX2", "tinyv::Q4Avx2<32>::block<1>", 64, 1),
    ("x86", "int8 AVX-512 VNNI", "tinyv::Q8Avx512<32>::block<1>", 64, 1),
    ("x86", "int8 AVX2", "tinyv::Q8Avx2<32>::block<1>", 64, 1),
    ("x86", "int4 AVX2", "tinyv::Q4Avx2<32>::block<4>", 64, 4),
    ("x86", "int4 AVX-512 VNNI", "tinyv::Q4Avx512<32>::block<4>", 64, 4),
    ("arm", "int4 NEON dotprod", "tinyv::neon_dotprod::Q4<32>::block<1>", 64, 1),
    ("arm", "int4 NEON (no dotprod)", "tinyv::neon_plain::Q4<32>::block<1>", 64, 1),
    ("arm", "int8 NEON dotprod", "tinyv::neon_dotprod::Q8<32>::block<1>", 64, 1),
    ("arm", "int8 NEON (no dotprod)", "tinyv::neon_plain::Q8<32>::block<1>", 64, 1),
    ("arm", "int4 NEON dotprod", "tinyv::neon_dotprod::Q4<32>::block<4>", 64, 4),
    ("arm", "int4 NEON i8mm (2 weight rows)", "tinyv::neon_i8mm::Q4Mmla<32>::tile<2>", 128, 4),
    ("arm", "int8 NEON i8mm (2 weight rows)", "tinyv::neon_i8mm::Q8Mmla<32>::tile<2>", 128, 4),
]

SOURCE = {
    "x86": '#include "kernels_avx2.h"\n#include "kernels_avx512.h"\n',
    "arm": '#include "kernels_neon.cpp"\n',
}


def address_table(arch: str) -> str:
    """A table of the kernels' addresses with external linkage: each is then emitted as a function of
    its own (the arm64 ones live in an anonymous namespace and would otherwise be inlined away)."""
    entries = []
    for a, _, function, _, _ in KERNELS:
        if a != arch:
            continue
        if "Mmla" in function:  # tile<P>(job, paired rows, n, n1, acc)
            ns = function.rsplit("::", 2)[0]
            sig = f"void (*)(const tinyv::Job&, const {ns}::PairedRows&, int, int, float32x4_t*)"
        else:
            sig = "void (*)(const tinyv::Job&, int, int)"
        entries.append(f"    reinterpret_cast<void*>(static_cast<{sig}>(&{function})),\n")
    return 'extern "C" {\nvoid* tv_kernel_table[] = {\n' + "".join(entries) + "};\n}\n"


def compile_unit(arch: str, compiler: str, work: str) -> str:
    src = os.path.join(work, f"{arch}.cpp")
    with open(src, "w") as f:
        f.write(SOURCE[arch] + address_table(arch))
    obj = os.path.join(work, f"{arch}.o")
    target = []
    if arch == "arm" and "clang" in compiler:  # Debian's cross sysroot and its libstdc++ headers
        cxx = sorted(glob.glob("/usr/aarch64-linux-gnu/include/c++/*"))[-1:]
        target = ["--target=aarch64-linux-gnu", "--sysroot=/usr/aarch64-linux-gnu"] + [
            f for d in cxx for f in ("-isystem", d, "-isystem", os.path.join(d, "aarch64-linux-gnu"))]
    elif arch == "arm":
        compiler = "aarch64-linux-gnu-g++"
    subprocess.run([compiler, *target, *FLAGS, "-I", CSRC, "-c", src, "-o", obj], check=True)
    return obj


def functions(obj: str, objdump: str) -> dict[str, list[tuple[int, str, str]]]:
    """Demangled name -> [(address, mnemonic, operands)] of every function in the object."""
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", obj], capture_output=True, text=True,
                         check=True).stdout
    funcs, current = {}, None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = funcs.setdefault(head.group(1), [])
            continue
        ins = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if ins and current is not None:
            current.append((int(ins.group(1), 16), ins.group(2), ins.group(3)))
    return funcs


def _branch(mnem: str, ops: str) -> tuple[bool, int | None, bool]:
    """(is a branch, its direct target or None, falls through) for one instruction."""
    if mnem in ("ret", "retq", "br") or (mnem.startswith("jmp") and "*" in ops):
        return True, None, False
    target = re.search(r"\b([0-9a-f]+) <", ops)
    addr = int(target.group(1), 16) if target else None
    if mnem in ("b", "jmp", "jmpq"):
        return True, addr, False
    if mnem.startswith("b.") or mnem in ("cbz", "cbnz", "tbz", "tbnz") or (mnem.startswith("j") and mnem != "jmp"):
        return True, addr, True
    return False, None, True  # calls (bl, blr, call) return here


def inner_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]] | None:
    """The shortest cycle of the control-flow graph through the first dot-product instruction: the
    fewest instructions one iteration of its loop can run (the hot path; padding and other cold
    paths are the longer ways round)."""
    at = {addr: i for i, (addr, _, _) in enumerate(code)}
    leaders = {0}
    for i, (_, mnem, ops) in enumerate(code):
        is_branch, target, _ = _branch(mnem, ops)
        if is_branch:
            leaders.add(i + 1)
            if target in at:
                leaders.add(at[target])
    starts = sorted(x for x in leaders if x < len(code))
    blocks = [(s0, (starts + [len(code)])[k + 1]) for k, s0 in enumerate(starts)]
    block_of = {i: k for k, (b0, b1) in enumerate(blocks) for i in range(b0, b1)}
    succ = []
    for b0, b1 in blocks:
        _, mnem, ops = code[b1 - 1]
        is_branch, target, falls = _branch(mnem, ops)
        nxt = [block_of[at[target]]] if is_branch and target in at else []
        if falls and b1 < len(code):
            nxt.append(block_of[b1])
        succ.append(nxt)
    dot = next((i for i, (_, m, o) in enumerate(code) if is_dot(m, o)), None)
    if dot is None:
        return None
    home = block_of[dot]
    # Dijkstra from home's successors back to home, a block costing its instruction count
    cost = lambda k: blocks[k][1] - blocks[k][0]  # noqa: E731
    dist, prev, todo = {}, {}, [(cost(n), n, home) for n in succ[home]]
    heapq.heapify(todo)
    while todo:
        d, k, p = heapq.heappop(todo)
        if k in dist:
            continue
        dist[k], prev[k] = d, p
        if k == home:
            break
        for n in succ[k]:
            if n not in dist:
                heapq.heappush(todo, (d + cost(n), n, k))
    if home not in dist:
        return None
    path, k = [], prev[home]
    while k != home:
        path.append(k)
        k = prev[k]
    return [code[i] for k in [home, *reversed(path)] for i in range(*blocks[k])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiler", default="g++", help="g++ (arm64: aarch64-linux-gnu-g++) or a clang++")
    args = parser.parse_args()
    objdump = {"x86": "objdump", "arm": shutil.which("aarch64-linux-gnu-objdump") or "objdump"}
    with tempfile.TemporaryDirectory() as work:
        code = {arch: functions(compile_unit(arch, args.compiler, work), objdump[arch]) for arch in ("x86", "arm")}
    print(f"compiler: {args.compiler}; inner-loop instructions (static count of the hot loop)")
    print(f"{'kernel':34} {'rows':>4} {'per iteration':>14} {'per 64 weight bytes':>20}  dot instructions")
    for arch, label, function, wbytes, rows in KERNELS:
        demangled = function.replace("tinyv::neon_", "tinyv::(anonymous namespace)::neon_") + "("
        name = next((n for n in code[arch] if demangled in n), None)
        loop = inner_loop(code[arch][name]) if name else None
        if loop is None:
            print(f"{label:34} {rows:>4} {'(not found)':>14}")
            continue
        dots = sorted({m for _, m, o in loop if is_dot(m, o)})
        print(f"{label:34} {rows:>4} {len(loop):>14} {len(loop) * 64 / wbytes:>20.1f}  {', '.join(dots)}")


if __name__ == "__main__":
    main()

"""The C ViT trunk (kernels/vit.py) at EVA ViT-g's size: GEMMs, attention and the rest per block,
and what 39 blocks take, for int8 and bf16 weights (random: speed does not depend on the values).

    python -m pytest benchmarks/test_vit_trunk_bench.py --benchmark-only -s

``TINYV_BENCH_THREADS`` (2), ``TINYV_BENCH_BLOCKS`` (blocks built and run: 2; the figures are per
block and scaled to 39). Each case prints ms per block in GEMMs (and their GMAC/s against the
two-core peaks of the AVX-512 EPYC: 434 int8, 234 bf16), in attention and in the rest (row
quantization, LayerNorm), from the trunk's own clocks (``VitTrunk.profile``). On that machine:
int8 64-70 ms of GEMMs (93 % of the VNNI peak when quiet) and 17 ms of attention a block; bf16
122 ms and 21 ms; ONNX Runtime's fp32 MultiHeadAttention takes 34.6 ms a block.
"""
import math
import os

import numpy as np
import pytest

from tinyv.kernels.native import open_kernels
from tinyv.kernels.vit import TrunkBlock, TrunkDims, TrunkLinear, VitTrunk, trunk_supported

THREADS = int(os.environ.get("TINYV_BENCH_THREADS", "2"))
BLOCKS = int(os.environ.get("TINYV_BENCH_BLOCKS", "2"))
WIDTH, HEADS, MLP, TOKENS, DEPTH = 1408, 16, 6144, 1025, 39
MACS_PER_BLOCK = TOKENS * (WIDTH * 3 * WIDTH + WIDTH * WIDTH + 2 * WIDTH * MLP)
PEAK_GMAC = {"int8": 434.0, "bf16": 234.0}


def _linear(rng, K, N, precision):
    if precision == "int8":
        w = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
        return TrunkLinear(w, np.full(N, 1 / (127 * math.sqrt(K)), np.float32), np.zeros(N, np.float32))
    return TrunkLinear((rng.standard_normal((K, N)) / math.sqrt(K)).astype(np.float32), None, np.zeros(N, np.float32))


def _trunk(precision: str) -> VitTrunk:
    rng = np.random.default_rng(0)
    ones, zeros = np.ones(WIDTH, np.float32), np.zeros(WIDTH, np.float32)
    blocks = [TrunkBlock(ones, zeros, _linear(rng, WIDTH, 3 * WIDTH, precision), _linear(rng, WIDTH, WIDTH, precision),
                         ones, zeros, _linear(rng, WIDTH, MLP, precision), _linear(rng, MLP, WIDTH, precision))
              for _ in range(BLOCKS)]
    dims = TrunkDims(WIDTH, HEADS, WIDTH // HEADS, MLP, BLOCKS, 1e-6, (WIDTH // HEADS) ** -0.5, precision == "bf16")
    return VitTrunk(open_kernels(THREADS), dims, blocks)


@pytest.mark.skipif(not trunk_supported(open_kernels(1)), reason="the C ViT trunk needs AVX-512 VNNI and BF16")
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_vit_trunk(benchmark, precision):
    trunk = _trunk(precision)
    x = np.random.default_rng(1).standard_normal((TOKENS, WIDTH)).astype(np.float32)
    trunk.forward(x)  # first touch of the weights and scratch
    trunk.profile(reset=True)
    benchmark.pedantic(trunk.forward, args=(x,), rounds=3, iterations=1)
    p = trunk.profile()
    per_block = {k: p[k] / p["forwards"] / BLOCKS * 1e3 for k in ("gemm_s", "attention_s", "other_s")}
    gmac = MACS_PER_BLOCK / (per_block["gemm_s"] / 1e3) / 1e9
    total = sum(per_block.values()) * DEPTH / 1e3
    print(f"\n[{precision}, {THREADS} threads] per block: GEMMs {per_block['gemm_s']:.1f} ms ({gmac:.0f} GMAC/s, "
          f"{100 * gmac / PEAK_GMAC[precision]:.0f} % of the peak), attention {per_block['attention_s']:.1f} ms, "
          f"the rest {per_block['other_s']:.1f} ms; {DEPTH} blocks {total:.2f} s")

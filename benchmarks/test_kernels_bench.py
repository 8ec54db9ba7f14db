"""Microbenchmarks of the CPU kernels at Phi-2's shapes (pytest-benchmark; not in the default run).

    python -m pytest benchmarks/test_kernels_bench.py --benchmark-only --benchmark-columns=median,rounds
    TINYV_BENCH_THREADS=1 python -m pytest benchmarks/test_kernels_bench.py --benchmark-only -k decode

Each case reports, in ``extra_info`` (shown with ``--benchmark-json`` or the table's GB/s print),
the weight bytes streamed per call and the achieved GB/s (decode, M = 1: the figure that bounds
tokens per second) or GOP/s (prefill, M = 64). int4 runs in both layouts where the CPU has the
x16 one (AVX-512 VNNI): ``stored`` (the bundle's) and ``x16`` (what the engine repacks to). Weights rotate over enough copies to exceed the
L3 cache, so decode figures are memory-bandwidth figures, as in a real model.
"""
import os

import pytest
import torch

from tinyv.kernels import native
from tinyv.kernels.linear import QuantLinear
from tinyv.kernels.quant import QuantConfig, quantize_weight

SHAPES = {"qkv": (7680, 2560), "dense": (2560, 2560), "fc1": (10240, 2560), "fc2": (2560, 10240)}
THREADS = int(os.environ.get("TINYV_BENCH_THREADS", "2"))
ROTATE_BYTES = 96 << 20  # > any L3 of the machines we measure on


def _copies(shape, bits):
    n, k = shape
    stored = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02, QuantConfig(bits, 32))
    size = sum(t.numel() * t.element_size() for t in stored.values())
    count = max(1, -(-ROTATE_BYTES // size))
    return [{k: v.clone() for k, v in stored.items()} for _ in range(count)], size


def _run(benchmark, bits, shape, m, path, layout="stored"):
    kernels = native.open_kernels(THREADS) if path == "native" else None
    if path == "native" and kernels is None:
        pytest.fail(f"compiled kernels unavailable: {native.describe(None)}")
    x16 = layout == "x16"
    if x16 and (bits != 4 or not kernels.x16):
        pytest.skip("the x16 layout is int4 on AVX-512 VNNI")
    copies, size = _copies(shape, bits)
    n, k = shape
    x = torch.randn(m, k)
    cfg = QuantConfig(bits, 32)
    if x16:
        copies = [dict(zip(("qweight", "scales"), kernels.pack_x16(st["qweight"], st["scales"], 32))) for st in copies]
    layers = [QuantLinear(k, n, cfg, st, None, kernels=kernels, x16=x16) for st in copies]
    state = {"i": 0}
    torch.set_num_threads(THREADS)

    def call():
        layer = layers[state["i"] % len(layers)]
        state["i"] += 1
        return layer(x)

    benchmark.pedantic(call, rounds=20 if m == 1 else 5, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "weight_bytes": size, "threads": THREADS, "path": native.describe(kernels) if path == "native" else "torch",
        "gb_s": size / median / 1e9, "gop_s": 2 * m * n * k / median / 1e9,
    })
    print(f"\n{path} {layout} q{bits} {shape} M={m}: {size / median / 1e9:.1f} GB/s, {2 * m * n * k / median / 1e9:.1f} GOP/s")


@pytest.mark.parametrize("layout", ["stored", "x16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", list(SHAPES))
def test_decode(benchmark, bits, name, layout):
    _run(benchmark, bits, SHAPES[name], 1, "native", layout)


@pytest.mark.parametrize("layout", ["stored", "x16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", list(SHAPES))
def test_prefill64(benchmark, bits, name, layout):
    _run(benchmark, bits, SHAPES[name], 64, "native", layout)


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_torch_reference(benchmark, bits):
    """The pure-torch fallback on one shape, for the ratio."""
    _run(benchmark, bits, SHAPES["fc1"], 1, "torch")

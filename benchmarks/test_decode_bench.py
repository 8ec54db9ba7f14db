"""Per-token decode profile: the fused step (GEMV phases vs attention vs everything else) and the
per-layer path it replaces, on random quantized weights (speed does not depend on the values).

    python -m pytest benchmarks/test_decode_bench.py --benchmark-only -s                  # stage4, 4-bit
    TINYV_BENCH_PRESET=small TINYV_BENCH_BITS=8 python -m pytest benchmarks/test_decode_bench.py --benchmark-only -s

``TINYV_BENCH_PRESET`` (default ``stage4``: Phi-2 at full size), ``TINYV_BENCH_BITS`` (4),
``TINYV_BENCH_THREADS`` (2), ``TINYV_BENCH_POS`` (position decoded, i.e. KV positions attended:
64). Each case prints tok/s, achieved GB/s (weight bytes × tok/s) and, for the fused step, the
milliseconds per token in GEMVs, in attention and in the rest (``FusedDecoder.profile``, from
clocks around the C phases). Target at full size: the rest ≤ 5 ms per token.
"""
import os

import pytest
import torch

from tinyv.engine.config import preset
from tinyv.engine.llm import build_quant_phi, linear_names, weight_bytes
from tinyv.engine.phi import PhiForCausalLM
from tinyv.kernels import native
from tinyv.kernels.quant import QuantConfig

PRESET = os.environ.get("TINYV_BENCH_PRESET", "stage4")
BITS = int(os.environ.get("TINYV_BENCH_BITS", "4"))
THREADS = int(os.environ.get("TINYV_BENCH_THREADS", "2"))
POS = int(os.environ.get("TINYV_BENCH_POS", "64"))
GROUP = 32


def random_bundle_tensors(cfg, qcfg: QuantConfig) -> dict:
    """Stored-form tensors with random codes and small scales (no quantization pass: seconds at full size)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in PhiForCausalLM(cfg).state_dict().items()}
    linears = set(linear_names(cfg))
    out = {}
    for key, shape in shapes.items():
        name, attr = key.rsplit(".", 1)
        if name in linears and attr == "weight":
            n, k = shape
            hi = 256 if qcfg.bits == 4 else 255
            codes = torch.randint(0, hi, (n, k // 2 if qcfg.bits == 4 else k), generator=g, dtype=torch.int16)
            out[f"{name}.qweight"] = codes.to(torch.uint8) if qcfg.bits == 4 else (codes - 127).to(torch.int8)
            out[f"{name}.scales"] = torch.full((n, k // qcfg.group_size), 0.2 / (k ** 0.5 * (8 if qcfg.bits == 4 else 127)),
                                               dtype=torch.float16)
        elif key.startswith("embed"):
            out[key] = torch.zeros(shape[0], 1, dtype=torch.float16).expand(shape)  # never read here
        elif "layernorm" in key and attr == "weight":
            out[key] = torch.ones(shape)
        else:
            out[key] = 0.01 * torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def weights():
    cfg = preset(PRESET).phi
    qcfg = QuantConfig(BITS, GROUP)
    return cfg, qcfg, random_bundle_tensors(cfg, qcfg)


def _phi(weights, decode, monkeypatch):
    cfg, qcfg, tensors = weights
    monkeypatch.setenv("TINYV_DECODE", decode)
    kernels = native.open_kernels(THREADS)
    if kernels is None:
        pytest.fail(f"compiled kernels unavailable: {native.describe(None)}")
    return build_quant_phi(cfg, tensors, qcfg, kernels=kernels)


def _run(benchmark, phi, label):
    torch.set_num_threads(1)  # as the engine decodes: torch's own ops on one thread
    cfg = phi.cfg
    cache = phi.new_cache(POS + 8)
    cache.length = POS  # positions below POS hold zeros: as costly to attend over as real ones
    x = torch.randn(1, 1, cfg.hidden, generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def step():
        return phi.decode(x, POS, cache)

    if phi.decoder is not None:
        phi.decoder.profile(reset=True)
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    median, nbytes = benchmark.stats.stats.median, weight_bytes(phi)
    info = {"preset": PRESET, "bits": BITS, "threads": THREADS, "pos": POS, "path": label,
            "tok_s": 1 / median, "weight_bytes": nbytes, "gb_s": nbytes / median / 1e9,
            "kv_dtype": str(phi.kv_dtype)}
    if phi.decoder is not None:
        info.update(phi.decoder.profile())  # mean per step over warm-up and rounds
    benchmark.extra_info.update(info)
    line = f"\n{label} {PRESET} q{BITS} {THREADS} threads pos {POS}: {1 / median:.2f} tok/s, {nbytes / median / 1e9:.1f} GB/s"
    if phi.decoder is not None:
        line += (f"; per token {info['gemv_ms']:.1f} ms GEMV, {info['attention_ms']:.2f} ms attention, "
                 f"{info['other_ms']:.2f} ms other")
    print(line)


def test_fused_step(benchmark, weights, monkeypatch):
    _run(benchmark, _phi(weights, "fused", monkeypatch), "fused")


def test_per_layer_path(benchmark, weights, monkeypatch):
    """The path the fused step replaces (TINYV_DECODE=unfused: Python layers, 4 GEMV calls each)."""
    _run(benchmark, _phi(weights, "unfused", monkeypatch), "per-layer")

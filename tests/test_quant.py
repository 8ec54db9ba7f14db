"""Quantization primitives: round trips, packing, SQNR thresholds, QuantLinear."""
import pytest
import torch

from tinyv import TinyVError
from tinyv.kernels.linear import ROW_BLOCK, QuantLinear
from tinyv.kernels.quant import (
    QuantConfig, choose_scales, dequantize, dequantize_weight, pack_int4, quantize, quantize_weight, sqnr_db,
    unpack_int4,
)


def gaussian(n=256, k=1024, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("g", [32, 64, 128])
def test_pack_unpack_round_trip(g):
    q = torch.randint(-8, 8, (7, 4 * g), dtype=torch.int8)
    p = pack_int4(q, g)
    assert p.dtype == torch.uint8 and p.shape == (7, 2 * g)
    assert torch.equal(unpack_int4(p, g), q)


def test_q4_0_nibble_order():
    g = 32
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(1, 32)  # values 0..15 after +8, twice
    p = pack_int4(q, g)[0]
    # byte j = element j (low nibble) | element j+16 (high nibble)
    for j in range(16):
        assert int(p[j]) == (int(q[0, j]) + 8) | ((int(q[0, j + 16]) + 8) << 4)


def test_codes_in_range_and_exact_for_representable_weights():
    w = gaussian(16, 64)
    for bits, lo, hi in ((4, -8, 7), (8, -127, 127)):
        s = choose_scales(w, bits, 32)
        q = quantize(w, s, bits, 32)
        assert q.min() >= lo and q.max() <= hi
        # dequantized weights are fixed points of the quantizer
        again = quantize(dequantize(q, s, 32), s, bits, 32)
        assert torch.equal(again, q)


def test_q4_0_uses_minus_8_for_the_largest_magnitude():
    w = torch.zeros(1, 32)
    w[0, 3], w[0, 7] = -4.0, 1.0
    s = choose_scales(w, 4, 32)
    q = quantize(w, s, 4, 32)
    assert float(s[0, 0]) == pytest.approx(0.5) and int(q[0, 3]) == -8 and int(q[0, 7]) == 2


@pytest.mark.parametrize("bits, group, floor", [(8, 32, 35.0), (8, 128, 35.0), (4, 32, 18.0), (4, 64, 18.0), (4, 128, 18.0)])
def test_sqnr_thresholds_on_gaussian_weights(bits, group, floor):
    w = gaussian()
    cfg = QuantConfig(bits, group)
    db = sqnr_db(w, dequantize_weight(quantize_weight(w, cfg), cfg))
    print(f"bits={bits} g={group}: {db:.2f} dB")
    assert db >= floor
    # smaller groups never lose quality
    if group > 32:
        smaller = QuantConfig(bits, 32)
        assert sqnr_db(w, dequantize_weight(quantize_weight(w, smaller), smaller)) >= db


def test_fp16_storage_is_near_lossless():
    w = gaussian()
    cfg = QuantConfig(16, 32)
    stored = quantize_weight(w, cfg)
    assert stored["weight"].dtype == torch.float16
    assert sqnr_db(w, dequantize_weight(stored, cfg)) > 60


def test_zero_groups_and_outliers():
    w = gaussian(4, 64)
    w[0, :32] = 0  # an all-zero group
    w[1, 5] = 1e3  # an outlier dominates only its own group
    for bits in (4, 8):
        cfg = QuantConfig(bits, 32)
        d = dequantize_weight(quantize_weight(w, cfg), cfg)
        assert torch.equal(d[0, :32], torch.zeros(32))
        assert torch.isfinite(d).all()
        assert sqnr_db(w[1, 32:], d[1, 32:]) > 15


def test_bad_configs():
    with pytest.raises(TinyVError, match="bits"):
        QuantConfig(3, 32)
    with pytest.raises(TinyVError, match="group"):
        QuantConfig(4, 48)
    with pytest.raises(ValueError, match="multiple"):
        choose_scales(torch.randn(4, 40), 4, 32)


def test_sqnr_db_edges():
    w = gaussian(2, 32)
    assert sqnr_db(w, w) == float("inf")
    assert sqnr_db(w, torch.zeros_like(w)) == pytest.approx(0.0)


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("out_features", [96, ROW_BLOCK + 160])  # one block, and several with a remainder
def test_quant_linear_equals_dequantize_then_matmul(bits, out_features):
    """The torch path (reference and fallback; the kernels are checked in test_kernels.py)."""
    torch.manual_seed(0)
    k = 128
    w, b = torch.randn(out_features, k), torch.randn(out_features)
    cfg = QuantConfig(bits, 32)
    stored = quantize_weight(w, cfg)
    lin = QuantLinear(k, out_features, cfg, stored, b)
    x = torch.randn(3, 5, k)
    ref = x @ dequantize_weight(stored, cfg).T + b
    torch.testing.assert_close(lin.reference_forward(x), ref, rtol=1e-5, atol=1e-4)
    assert lin.weight_bytes() == sum(t.numel() * t.element_size() for t in stored.values())


def test_bits_per_weight():
    assert QuantConfig(4, 32).bits_per_weight() == 4.5
    assert QuantConfig(8, 32).bits_per_weight() == 8.5
    assert QuantConfig(16, 32).bits_per_weight() == 16

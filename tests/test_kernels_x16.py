"""The AVX-512 VNNI int4 x16 layout (kernels/csrc/kernels_x16.h): the in-place repack, the GEMM on
it, and the engine's use of it. Needs a CPU with AVX-512 VNNI (skipped elsewhere, with the reason)."""
from __future__ import annotations

import pytest
import torch

from tinyv.engine.config import PhiConfig
from tinyv.engine.llm import build_quant_phi, linear_names
from tinyv.errors import TinyVError
from tinyv.kernels import native
from tinyv.kernels.linear import QuantLinear
from tinyv.kernels.quant import QuantConfig, dequantize_weight, quantize_weight, unpack_x16

from test_kernels import check, reference

pytestmark = pytest.mark.skipif("avx512-vnni" not in native.cpu_features(),
                                reason="the x16 layout runs on AVX-512 VNNI; this CPU has none")

SHAPES = [(1, 16, 32), (1, 48, 2560 + 96), (2, 32, 160), (3, 80, 288), (4, 16, 64), (5, 112, 2560 + 32),
          (7, 64, 384), (9, 48, 640), (64, 96, 256), (130, 32, 224)]


def packed(stored: dict, group: int, kernels: native.Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.pack_x16(stored["qweight"], stored["scales"], group)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_repack_is_the_documented_layout_and_loses_nothing(group):
    kernels = native.open_kernels(2)
    stored = quantize_weight(torch.randn(64, 384), QuantConfig(4, group))
    before = {k: v.clone() for k, v in stored.items()}
    qweight, scales = packed(stored, group, kernels)
    assert all(torch.equal(stored[k], before[k]) for k in stored)  # the source is left as it was
    assert not torch.equal(qweight, stored["qweight"])  # it did move the bytes
    back_q, back_s = unpack_x16(qweight, scales, group)
    assert torch.equal(back_q, stored["qweight"]) and torch.equal(back_s, stored["scales"])


@pytest.mark.parametrize("group", [32, 64, 128])
def test_x16_gemm_matches_dequantize_then_matmul(group):
    gen = torch.Generator().manual_seed(group)
    cfg = QuantConfig(4, group)
    by_threads = {t: native.open_kernels(t) for t in (1, 2, 3, 4)}
    for m, n, k in SHAPES:
        if k % group:
            continue
        stored = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, cfg)
        qweight, scales = packed(stored, group, by_threads[1])
        x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
        for kernels in by_threads.values():
            check(kernels.qgemm(x, qweight, scales, 4, group, bias, x16=True), reference(x, stored, cfg, bias))
        y = by_threads[2].qgemm(x, qweight, scales, 4, group, None, gelu=True, x16=True)
        check(y, reference(x, stored, cfg, None, gelu=True))


def test_a_row_gets_the_same_bits_in_any_batch():
    """Batched decoding promises each sequence its logits alone, bit for bit."""
    kernels = native.open_kernels(2)
    stored = quantize_weight(torch.randn(96, 640), QuantConfig(4, 32))
    qweight, scales = packed(stored, 32, kernels)
    x = torch.randn(11, 640)
    together = kernels.qgemm(x, qweight, scales, 4, 32, x16=True)
    for i in range(11):
        assert torch.equal(kernels.qgemm(x[i : i + 1], qweight, scales, 4, 32, x16=True)[0], together[i])


def test_what_the_layout_cannot_take_is_refused():
    kernels = native.open_kernels(2)
    stored = quantize_weight(torch.randn(24, 64), QuantConfig(4, 32))  # 24 rows: not whole blocks of 16
    with pytest.raises(ValueError, match="N=24"):
        kernels.pack_x16(stored["qweight"], stored["scales"], 32)
    avx2 = native.open_kernels(2, setting="avx2")
    assert not avx2.x16
    ok = quantize_weight(torch.randn(32, 64), QuantConfig(4, 32))
    with pytest.raises(ValueError, match="cannot take"):  # the C side refuses x16 off AVX-512 too
        avx2.qgemm(torch.randn(1, 64), ok["qweight"], ok["scales"], 4, 32, x16=True)
    with pytest.raises(ValueError, match="x16"):
        QuantLinear(64, 32, QuantConfig(4, 32), ok, None, kernels=avx2, x16=True)


TINY = PhiConfig(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=96, rotary_dim=8)


def tiny_tensors(bits=4):
    """A tiny Phi-2's bundle tensors, quantized, with random weights."""
    from tinyv.engine.phi import PhiForCausalLM

    torch.manual_seed(0)
    phi = PhiForCausalLM(TINY)
    cfg, out = QuantConfig(bits, 32), {}
    for key, t in phi.state_dict().items():
        name = key.rsplit(".", 1)[0]
        if name in linear_names(TINY) and key.endswith(".weight"):
            out.update({f"{name}.{k}": v for k, v in quantize_weight(t.float(), cfg).items()})
        else:
            out[key] = t.detach().clone()
    return out, cfg


def test_the_model_runs_a_repacked_copy_and_releases_the_stored_weights_only_when_told():
    tensors, cfg = tiny_tensors()
    kernels = native.open_kernels(2)
    before = {k: v.clone() for k, v in tensors.items()}
    phi = build_quant_phi(TINY, tensors, cfg, kernels=kernels)
    assert phi.lm_head.x16 and phi.layers[0].mlp.fc1.x16
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)  # the caller's tensors untouched
    reference_phi = build_quant_phi(TINY, tensors, cfg, kernels=None)
    for name in linear_names(TINY):
        packed_layer, ref_layer = phi.get_submodule(name), reference_phi.get_submodule(name)
        assert torch.equal(packed_layer.weight_rows(3, 37), ref_layer.weight_rows(3, 37))
    x = torch.randn(1, 5, TINY.hidden)
    check(phi.layers[0].mlp.fc1(x), reference_phi.layers[0].mlp.fc1(x), tol=2e-2)  # int8 activations vs fp32


def test_released_pages_of_a_file_mapping_are_read_back_from_the_file(tmp_path):
    """What the engine does with its mapping of the bundle: after the repack the stored weights'
    pages are given back; the model runs on its own copy, and the mapping still reads the file."""
    from safetensors.torch import save_file

    from tinyv.engine.weights import mmap_safetensors

    tensors, cfg = tiny_tensors()
    big = quantize_weight(torch.randn(4096, 2048), cfg)  # spans whole pages, so some are released
    save_file({**tensors, "big.qweight": big["qweight"], "big.scales": big["scales"]}, tmp_path / "llm.safetensors")
    mapped = mmap_safetensors(str(tmp_path / "llm.safetensors"))
    kernels = native.open_kernels(2)
    source = mapped.pop("big.qweight")
    qweight, scales = kernels.pack_x16(source, mapped.pop("big.scales"), 32, release_source=True)
    assert torch.equal(unpack_x16(qweight, scales, 32)[0], big["qweight"])
    assert torch.equal(source, big["qweight"])  # released pages of the mapping read the file again
    phi = build_quant_phi(TINY, mapped, cfg, kernels=kernels, release_stored=True)
    reference_phi = build_quant_phi(TINY, tensors, cfg, kernels=None)
    x = torch.randn(1, 3, TINY.hidden)
    check(phi(x)[0], reference_phi(x)[0], tol=5e-2)


def test_a_malformed_int4_tensor_is_refused_before_the_repack():
    tensors, cfg = tiny_tensors()
    tensors["layers.1.mlp.fc2.scales"] = tensors["layers.1.mlp.fc2.scales"][:, :1].contiguous()
    with pytest.raises(TinyVError, match=r"layers\.1\.mlp\.fc2\.scales .*re-export"):
        build_quant_phi(TINY, tensors, cfg, kernels=native.open_kernels(2), release_stored=True)


def test_int8_weights_keep_the_stored_layout():
    tensors, cfg = tiny_tensors(bits=8)
    phi = build_quant_phi(TINY, tensors, cfg, kernels=native.open_kernels(2))
    assert not phi.lm_head.x16
    assert torch.equal(phi.lm_head.weight_rows(0, 96), dequantize_weight(
        {"qweight": tensors["lm_head.qweight"], "scales": tensors["lm_head.scales"]}, cfg))

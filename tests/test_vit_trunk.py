"""The C ViT trunk (kernels/vit.py) and the vision graph run with it (engine/vision_native.py)."""
import math
import shutil

import numpy as np
import onnx
import pytest
import torch

from tinyv import TinyVError
from tinyv.engine import vision_native
from tinyv.engine.vision_native import NativeVision, open_native
from tinyv.engine.vision_onnx import open_session
from tinyv.kernels.native import open_kernels
from tinyv.kernels.vit import TrunkLinear, TrunkBlock, TrunkDims, VitTrunk, trunk_supported

KERNELS = open_kernels(2)
needs_trunk = pytest.mark.skipif(not trunk_supported(KERNELS), reason="the C ViT trunk needs AVX-512 VNNI and BF16")


def _linear(rng, K, N, bias=True):
    w = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    scale = ((rng.random(N) + 0.5) / (127 * math.sqrt(K))).astype(np.float32)
    return TrunkLinear(w, scale, (0.1 * rng.standard_normal(N)).astype(np.float32) if bias else None)


def _trunk(rng, D, H, F, L):
    def vec(n, centre):
        return (centre + 0.1 * rng.standard_normal(n)).astype(np.float32)

    blocks = [TrunkBlock(vec(D, 1), vec(D, 0), _linear(rng, D, 3 * D), _linear(rng, D, D), vec(D, 1), None,
                         _linear(rng, D, F), _linear(rng, F, D, bias=False)) for _ in range(L)]
    return TrunkDims(D, H, D // H, F, L, 1e-6, (D // H) ** -0.5), blocks


def _reference(x, dims: TrunkDims, blocks):
    """The blocks in float64 from the dequantized weights: exact GELU, softmax, LayerNorm."""
    x = torch.tensor(x, dtype=torch.float64)
    D, H, hd, T = dims.width, dims.heads, dims.head_dim, x.shape[0]

    def t(a):
        return None if a is None else torch.tensor(np.asarray(a), dtype=torch.float64)

    def lin(h, p):
        w = t(p.weight) if p.scale is None else t(p.weight) * t(p.scale)
        return h @ w + (0 if p.bias is None else t(p.bias))

    for b in blocks:
        q, k, v = lin(torch.nn.functional.layer_norm(x, (D,), t(b.ln1_w), t(b.ln1_b), dims.eps), b.qkv).split(D, -1)
        q, k, v = (a.reshape(T, H, hd).transpose(0, 1) for a in (q, k, v))
        att = torch.softmax(q @ k.transpose(1, 2) * dims.scale, -1) @ v
        x = x + lin(att.transpose(0, 1).reshape(T, D), b.proj)
        h = torch.nn.functional.layer_norm(x, (D,), t(b.ln2_w), t(b.ln2_b), dims.eps)
        x = x + lin(torch.nn.functional.gelu(lin(h, b.fc1)), b.fc2)
    return x.numpy()


def _as_fp32(dims: TrunkDims, blocks):
    """The same trunk with its int8 weights dequantized to fp32: a bf16 trunk."""
    def lin(p):
        return TrunkLinear((p.weight * p.scale).astype(np.float32), None, p.bias)

    fp32 = [TrunkBlock(b.ln1_w, b.ln1_b, lin(b.qkv), lin(b.proj), b.ln2_w, b.ln2_b, lin(b.fc1), lin(b.fc2))
            for b in blocks]
    return TrunkDims(**{**dims.__dict__, "bf16": True}), fp32


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- the kernel -------------------------------------------------------------------------------------
@needs_trunk
@pytest.mark.parametrize("D,H,F,L,T", [(64, 2, 176, 3, 37), (128, 4, 256, 2, 1), (160, 5, 320, 1, 65)])
def test_trunk_matches_float64_blocks(D, H, F, L, T):
    rng = np.random.default_rng(D + T)
    dims, blocks = _trunk(rng, D, H, F, L)
    x = rng.standard_normal((T, D)).astype(np.float32)
    got = VitTrunk(KERNELS, dims, blocks).forward(x)
    ref = _reference(x, dims, blocks)
    # int8 activations per row and int8 scores: what the blocks add, to 1e-4
    assert _cosine(got - x, ref - x) >= 0.9999
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref - x).max()
    # the same weights in fp32 through the bf16 trunk: ten times closer
    bf16 = VitTrunk(KERNELS, *_as_fp32(dims, blocks)).forward(x)
    assert _cosine(bf16 - x, ref - x) >= 0.99999
    assert np.abs(bf16 - ref).max() < 0.01 * np.abs(ref - x).max()


@needs_trunk
def test_trunk_is_the_same_on_any_thread_count_and_leaves_its_input_alone():
    rng = np.random.default_rng(1)
    dims, blocks = _trunk(rng, 96, 3, 208, 2)
    x = rng.standard_normal((1, 23, 96)).astype(np.float32)
    before = x.copy()
    for trunk in (dims, blocks), _as_fp32(dims, blocks):
        outs = [VitTrunk(open_kernels(n), *trunk).forward(x) for n in (1, 2, 3)]
        assert outs[0].shape == x.shape and np.array_equal(x, before)
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@needs_trunk
def test_trunk_takes_a_generator_of_blocks_and_copies_them():
    rng = np.random.default_rng(2)
    dims, blocks = _trunk(rng, 64, 2, 128, 2)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    want = VitTrunk(KERNELS, dims, blocks).forward(x)
    scratch = [TrunkBlock(*(getattr(b, f) for f in TrunkBlock.__dataclass_fields__)) for b in blocks]
    trunk = VitTrunk(KERNELS, dims, (scratch.pop(0) for _ in range(2)))
    for b in blocks:  # the caller's weights overwritten: the trunk holds its own copy
        b.qkv.weight[:] = 0
    assert not scratch and np.array_equal(trunk.forward(x), want)


@needs_trunk
def test_trunk_refuses_what_it_cannot_take():
    rng = np.random.default_rng(3)
    dims, blocks = _trunk(rng, 64, 2, 128, 2)
    with pytest.raises(ValueError, match="blocks declared"):
        VitTrunk(KERNELS, dims, blocks[:1])
    with pytest.raises(ValueError, match="cannot take"):
        VitTrunk(KERNELS, TrunkDims(60, 2, 30, 128, 2, 1e-6, 0.2), blocks)  # width not a multiple of 16
    with pytest.raises(ValueError, match="cannot take"):
        VitTrunk(KERNELS, TrunkDims(272, 2, 136, 128, 2, 1e-6, 0.2), blocks)  # heads wider than 128
    wrong = TrunkBlock(blocks[0].ln1_w, None, _linear(rng, 64, 3 * 64), _linear(rng, 64, 64), blocks[0].ln2_w, None,
                       TrunkLinear(blocks[0].fc1.weight.astype(np.int16), blocks[0].fc1.scale, None),
                       blocks[0].fc2)
    with pytest.raises(ValueError, match="fc1: expected int8"):
        VitTrunk(KERNELS, dims, [wrong, blocks[1]])
    with pytest.raises(ValueError, match="qkv: expected float32"):  # int8 weights to a bf16 trunk
        VitTrunk(KERNELS, _as_fp32(dims, blocks)[0], blocks)
    with pytest.raises(ValueError, match="cannot run"):
        VitTrunk(open_kernels(2, "avx2"), dims, blocks)


# -- the vision graph --------------------------------------------------------------------------------
def _probe_pixels(n, size):
    from tinyv.engine.image import preprocess
    from tinyv.export.vision import probe_images

    return torch.cat([preprocess(im, size) for im in probe_images(n, size)])


def _graph_path(bundle_dir):
    return f"{bundle_dir}/vision.onnx"


@needs_trunk
def test_an_int8_bundle_runs_its_trunk_natively_close_to_onnx_runtime_and_torch(tiny_bundle, tiny_model):
    bundle = tiny_bundle(4, "int8")
    native, why = open_native(_graph_path(bundle), None, 2)
    assert isinstance(native, NativeVision) and why == ""
    assert native.trunk.dims.blocks == tiny_model.config.vision.depth
    whole = open_session(_graph_path(bundle), threads=2)
    size = tiny_model.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    got = native.run(None, {"pixel_values": pixels.numpy()})[0]
    assert got.shape == (3, tiny_model.config.qformer.num_queries, tiny_model.config.phi.hidden)
    # ONNX Runtime quantizes the ViT's activations per tensor, the trunk per row: close, not equal
    assert _cosine(got, whole.run(None, {"pixel_values": pixels.numpy()})[0]) >= 0.9995
    assert _cosine(got, tiny_model.encode_pixels(pixels).numpy()) >= 0.999
    # batch members are independent sequences
    one = native.run(None, {"pixel_values": pixels[1:2].numpy()})[0]
    assert np.allclose(one[0], got[1], atol=1e-5)


@needs_trunk
def test_native_trunk_survives_planted_outlier_channels(tmp_path):
    from tinyv.export.reference import TinyGPTV
    from tinyv.export.vision import export_vision, probe_images
    from tinyv.testing import write_checkpoints

    paths = write_checkpoints(str(tmp_path / "ck"), "tiny", seed=0, outliers=4)
    model = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset="tiny")
    info = export_vision(model, tmp_path / "bundle", "int8", probes=probe_images(2, model.config.image_size))
    assert info["int8"]["per_channel"] is False  # this export's weight scales are per tensor: the trunk takes those too
    native, _ = open_native(_graph_path(tmp_path / "bundle"), None, 2)
    pixels = _probe_pixels(4, model.config.image_size)
    assert _cosine(native.run(None, {"pixel_values": pixels.numpy()})[0], model.encode_pixels(pixels).numpy()) >= 0.999


@needs_trunk
def test_external_weights_are_read_from_the_data_file_only(tiny_model, tmp_path):
    from tinyv.export.vision import export_vision, probe_images

    out = tmp_path / "bundle"
    size = tiny_model.config.image_size
    export_vision(tiny_model, out, "int8", external_data_threshold=1000, probes=probe_images(2, size))
    native, _ = open_native(_graph_path(out), "vision.onnx.data", 2)
    pixels = _probe_pixels(2, size)
    want = tiny_model.encode_pixels(pixels).numpy()
    assert _cosine(native.run(None, {"pixel_values": pixels.numpy()})[0], want) >= 0.999
    with pytest.raises(TinyVError, match="outside the bundle's data file"):
        open_native(_graph_path(out), "other.data", 2)
    # a weight said to lie past the end of the file
    model = onnx.load(_graph_path(out), load_external_data=False)
    big = next(t for t in model.graph.initializer if t.data_location == t.EXTERNAL and t.data_type == 3)
    for e in big.external_data:
        if e.key == "offset":
            e.value = str(10**9)
    onnx.save(model, str(out / "bad.onnx"))
    with pytest.raises(TinyVError, match="past the end"):
        open_native(str(out / "bad.onnx"), "vision.onnx.data", 2)


@needs_trunk
def test_an_fp32_bundle_runs_its_trunk_in_bf16(tiny_bundle, tiny_model):
    native, _ = open_native(_graph_path(tiny_bundle(4, "fp32")), None, 2)
    assert native.trunk.dims.bf16 and native.trunk.dims.blocks == tiny_model.config.vision.depth
    size = tiny_model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    got = native.run(None, {"pixel_values": pixels.numpy()})[0]
    assert _cosine(got, tiny_model.encode_pixels(pixels).numpy()) >= 0.99999


def test_graphs_without_a_known_trunk_run_whole_in_onnx_runtime(tiny_bundle):
    from tinyv.demo.builtin import DEMO_BUNDLE

    # the shipped demo bundle's graph predates the fused attention: no trunk to take
    native, why = open_native(_graph_path(DEMO_BUNDLE), None, 2)
    assert native is None and "no ViT trunk" in why
    native, why = open_native(_graph_path(tiny_bundle(4, "int8")), None, 2, "avx2")
    assert native is None and "AVX-512" in why


@needs_trunk
def test_the_engine_picks_the_runtime_from_the_graph_and_tinyv_vision(tiny_bundle, monkeypatch, scene):
    import tinyv

    engine = tinyv.load(tiny_bundle(4, "int8"), threads=2, cache_dir=None)
    assert engine.vision_path.startswith("C ViT trunk")
    native_caption = engine.caption(scene, max_new_tokens=4)
    assert "bf16 GEMMs" in tinyv.load(tiny_bundle(4, "fp32"), threads=2, cache_dir=None).vision_path
    monkeypatch.setenv("TINYV_VISION", "onnxruntime")
    whole = tinyv.load(tiny_bundle(4, "int8"), threads=2, cache_dir=None)
    assert whole.vision_path == "ONNX Runtime (whole graph)"
    assert whole.caption(scene, max_new_tokens=4) == native_caption
    monkeypatch.setenv("TINYV_VISION", "fast")
    with pytest.raises(TinyVError, match="TINYV_VISION='fast' is not one of auto, onnxruntime"):
        tinyv.load(tiny_bundle(4, "int8"), threads=2, cache_dir=None)


@needs_trunk
def test_a_trunk_whose_weights_do_not_fit_is_left_to_onnx_runtime(tiny_bundle, tmp_path):
    # block 1's second LayerNorm shortened: the C trunk refuses it (no ValueError escapes) and the
    # whole graph goes to ONNX Runtime, whose own checks then judge it
    from onnx import numpy_helper

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(4, "int8"), folder)
    model = onnx.load(str(folder / "vision.onnx"))
    ln = next(t for t in model.graph.initializer if t.name.endswith("blocks.1.norm2.weight"))
    ln.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(ln)[:-16].copy(), ln.name))
    onnx.save(model, str(folder / "vision.onnx"))
    native, why = open_native(str(folder / "vision.onnx"), None, 2)
    assert native is None and "do not fit" in why
    whole = vision_native.open_vision_graph(str(folder / "vision.onnx"), None, 2, ("CPUExecutionProvider",), None)
    assert not isinstance(whole, NativeVision)


@needs_trunk
def test_a_block_that_differs_ends_the_trunk_and_runs_in_onnx_runtime(tiny_bundle, tiny_model, tmp_path):
    # the last block's GELU divides by 1.3, not by √2: not the trunk's block, so that block runs in
    # ONNX Runtime with the Q-Former, and the result is still the graph's
    from onnx import numpy_helper

    model = onnx.load(_graph_path(tiny_bundle(4, "int8")))
    last = tiny_model.config.vision.depth - 1
    div = next(n for n in model.graph.node if n.op_type == "Div" and f"blocks.{last}/" in n.name)
    const = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == div.input[1])
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1.3, dtype=np.float32)))
    onnx.save(model, str(tmp_path / "vision.onnx"))
    native, _ = open_native(str(tmp_path / "vision.onnx"), None, 2)
    assert native.trunk.dims.blocks == last
    pixels = torch.randn(1, 3, tiny_model.config.image_size, tiny_model.config.image_size).numpy()
    whole = open_session(str(tmp_path / "vision.onnx"), threads=2)
    feed = {"pixel_values": pixels}
    assert _cosine(native.run(None, feed)[0], whole.run(None, feed)[0]) >= 0.9995

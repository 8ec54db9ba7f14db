"""The vision ONNX export: folded projections, fp32 and int8 graphs, external data, clean failure."""
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinyv import TinyVError
from tinyv.export import onnx_pieces, onnx_writer, vision_verify
from tinyv.export import vision as vx
from tinyv.export.onnx_pieces import partition, run_in_pieces
from tinyv.export.onnx_writer import inline_if_small
from tinyv.export.reference import TinyGPTV
from tinyv.export.vision import (
    INT8_MODULE,
    VisionEncoder,
    export_vision,
    fold_projections,
    open_vision_session,
    probe_images,
)
from tinyv.export.vision_quant import quantize_pieces
from tinyv.export.attention_fusion import fuse_vit_attention
from tinyv.export.vision_trace import _trace, write_fp32_graph


def _pixels(batch, size, seed):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(path, pixels):
    session = open_vision_session(path, threads=1)
    return session.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]


def _max_rel_err(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fp32_export(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "bundle"
    stages = []
    info = export_vision(tiny_model, out, "fp32", progress=stages.append)
    return out, info, stages


@pytest.fixture(scope="module")
def int8_export(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    info = export_vision(tiny_model, out, "int8")
    return out, info


# -- folding and the torch module ------------------------------------------------------------------
def _two_linears_vs_folded(p1, p2, x):
    """float64 outputs of p2(p1(x)) and of the folded Linear, both from the stored parameters."""
    def lin(m, x):
        return F.linear(x, m.weight.double(), None if m.bias is None else m.bias.double())

    folded = fold_projections(p1, p2)
    assert isinstance(folded, nn.Linear) and folded.weight.dtype == torch.float32
    assert (folded.in_features, folded.out_features) == (p1.in_features, p2.out_features)
    return lin(p2, lin(p1, x)), lin(folded, x)


def test_fold_projections_equals_the_two_linears(tiny_model):
    torch.manual_seed(0)
    cases = [(nn.Linear(48, 96), nn.Linear(96, 80)), (nn.Linear(16, 32, bias=False), nn.Linear(32, 8)),
             (tiny_model.llama_proj, tiny_model.llama_proj2)]
    for p1, p2 in cases:
        x = torch.randn(5, 7, p1.in_features, dtype=torch.float64)
        ref, got = _two_linears_vs_folded(p1, p2, x)
        assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()
    with pytest.raises(ValueError, match="cannot chain"):
        fold_projections(nn.Linear(16, 32), nn.Linear(33, 8))


def test_vision_encoder_matches_encode_pixels_and_shares_weights(tiny_model):
    enc = VisionEncoder(tiny_model).eval()
    assert enc.visual is tiny_model.visual and enc.qformer is tiny_model.qformer
    assert enc.ln_vision is tiny_model.ln_vision
    w = tiny_model.visual.blocks[0].attn.qkv.weight
    assert dict(enc.named_parameters())["visual.blocks.0.attn.qkv.weight"].data_ptr() == w.data_ptr()
    x = _pixels(2, tiny_model.config.image_size, 0)
    with torch.no_grad():
        got = enc(x)
    ref = tiny_model.encode_pixels(x)
    cfg = tiny_model.config
    assert got.shape == (2, cfg.qformer.num_queries, cfg.phi.hidden)
    assert _max_rel_err(got.numpy(), ref.numpy()) <= 1e-5


def test_probe_images_are_deterministic():
    a, b = probe_images(), probe_images()
    assert len(a) == 4 and all(img.mode == "RGB" and img.size == (224, 224) for img in a)
    assert [img.tobytes() for img in a] == [img.tobytes() for img in b]
    assert len({img.tobytes() for img in a}) == 4
    other = probe_images(6, size=64, seed=1)
    assert len(other) == 6 and other[0].size == (64, 64)
    assert other[0].tobytes() != probe_images(1, size=64, seed=0)[0].tobytes()


# -- fp32 ------------------------------------------------------------------------------------------
def test_fp32_export_matches_torch_at_batch_1_and_3(fp32_export, tiny_model):
    out, info, stages = fp32_export
    assert sorted(os.listdir(out)) == ["vision.onnx"]
    cfg = tiny_model.config
    assert info["file"] == "vision.onnx" and info["data_file"] is None
    assert (info["precision"], info["opset"], info["input"], info["output"]) == ("fp32", 17, "pixel_values", "image_embeds")
    assert (info["image_size"], info["num_queries"], info["hidden"]) == (cfg.image_size, cfg.qformer.num_queries, cfg.phi.hidden)
    assert info["int8"] is None
    assert info["verify"]["probes"] == 4 and info["verify"]["cosine_min"] >= 0.9999
    assert info["verify"]["max_abs_err"] < 1e-3 and info["verify"]["seconds"] >= 0
    assert info["verify"]["pieces"] == 1  # small graphs run whole
    assert "tracing" in stages and "verifying" in stages and "quantizing" not in stages
    for batch in (1, 3):
        x = _pixels(batch, cfg.image_size, batch)
        got = _run(out / "vision.onnx", x)
        assert got.shape == (batch, cfg.qformer.num_queries, cfg.phi.hidden) and got.dtype == np.float32
        assert _max_rel_err(got, tiny_model.encode_pixels(x).numpy()) <= 1e-4


def test_fp32_graph_has_one_input_one_output_and_a_dynamic_batch(fp32_export, tiny_model):
    out, _, _ = fp32_export
    model = onnx.load(out / "vision.onnx")
    onnx.checker.check_model(model)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "pixel_values" and outp.name == "image_embeds"
    S = tiny_model.config.image_size
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, S, S]
    assert outp.type.tensor_type.shape.dim[0].dim_param == "batch"
    # the two projections are one MatMul: the folded weight is there, llama_proj's are not
    names = {t.name for t in model.graph.initializer}
    assert "proj.weight.T" in names and not any("llama_proj" in n for n in names)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_every_vit_attention_is_one_fused_node(fp32_export, int8_export, tiny_model, which):
    """The ViT's attention runs as ONNX Runtime's MultiHeadAttention (the scores never whole in
    memory); the Q-Former's keeps its own nodes. The graph's match with torch is the test above."""
    out = (fp32_export if which == "fp32" else int8_export)[0]
    nodes = onnx.load(out / "vision.onnx", load_external_data=False).graph.node
    cfg = tiny_model.config.vision
    fused = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    assert len(fused) == cfg.depth and all(n.domain == "com.microsoft" for n in fused)
    assert {a.name: a.i for n in fused for a in n.attribute if a.name == "num_heads"} == {"num_heads": cfg.heads}
    assert not [n for n in nodes if n.op_type == "Softmax" and n.name.startswith("/visual/")]
    assert [n for n in nodes if n.op_type == "Softmax" and n.name.startswith("/qformer/")]


def test_attention_fusion_leaves_what_does_not_match(tiny_model):
    """A block whose layout differs in one place (here the keys' transpose) keeps its nodes."""
    cfg = tiny_model.config
    proto = _trace(VisionEncoder(tiny_model), cfg.image_size, 17)
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
              if n.op_type == "Constant"}
    outputs = {o.name for o in proto.graph.output}
    nodes, count = fuse_vit_attention(list(proto.graph.node), cfg.vision.heads, consts.get, outputs, 17)
    assert count == cfg.vision.depth
    assert len([n for n in nodes if n.op_type == "MultiHeadAttention"]) == cfg.vision.depth
    k_t = next(n for n in proto.graph.node if n.op_type == "Transpose" and n.name.startswith("/visual/blocks.1/")
               and list(n.attribute[0].ints) == [0, 1, 3, 2])
    k_t.attribute[0].ints[:] = [0, 1, 2, 3]
    nodes, count = fuse_vit_attention(list(proto.graph.node), cfg.vision.heads, consts.get, outputs, 17)
    assert count == cfg.vision.depth - 1
    assert [n.name for n in nodes if n.op_type == "Softmax" and n.name.startswith("/visual/")] == \
        ["/visual/blocks.1/attn/Softmax"]


def test_external_data_when_over_the_threshold(tiny_model, tmp_path):
    out = tmp_path / "bundle"
    info = export_vision(tiny_model, out, "fp32", external_data_threshold=1000)
    assert info["data_file"] == "vision.onnx.data"
    assert sorted(os.listdir(out)) == ["vision.onnx", "vision.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    meta = onnx.load(out / "vision.onnx", load_external_data=False)
    ext = [t for t in meta.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"vision.onnx.data"}
    onnx.checker.check_model(str(out / "vision.onnx"))
    onnx.load(out / "vision.onnx")  # the data file resolves
    assert info["verify"]["cosine_min"] >= 0.9999
    x = _pixels(2, tiny_model.config.image_size, 7)
    assert _max_rel_err(_run(out / "vision.onnx", x), tiny_model.encode_pixels(x).numpy()) <= 1e-4

    # exporting again below the threshold leaves no stale data file behind
    info = export_vision(tiny_model, out, "fp32")
    assert info["data_file"] is None and sorted(os.listdir(out)) == ["vision.onnx"]


def test_large_fp32_graphs_are_checked_piece_by_piece(tiny_model, tmp_path, monkeypatch):
    # stands in for ViT-g, whose fp32 weights must not sit in memory twice beside the torch model
    monkeypatch.setattr(vx, "WHOLE_RUN_BYTES", 0)
    monkeypatch.setattr(onnx_pieces, "PIECE_BYTES", 40_000)
    info = export_vision(tiny_model, tmp_path / "bundle", "fp32", external_data_threshold=1000, probes=probe_images(2, 64))
    assert info["verify"]["pieces"] > 3 and info["verify"]["cosine_min"] >= 0.9999
    x = _pixels(3, tiny_model.config.image_size, 11)
    path = str(tmp_path / "bundle" / "vision.onnx")
    out, n = run_in_pieces(path, {"pixel_values": x.numpy()}, piece_bytes=20_000)
    assert n > 10
    np.testing.assert_allclose(out, _run(path, x), rtol=1e-5, atol=1e-5)


def test_inlining_the_data_file_gives_the_same_model(tiny_model, tmp_path):
    ext = tmp_path / "ext" / "vision.onnx"
    ext.parent.mkdir()
    write_fp32_graph(VisionEncoder(tiny_model), str(ext), tiny_model.config.image_size, 17)
    assert (tmp_path / "ext" / "vision.onnx.data").exists()
    inl = tmp_path / "inl" / "vision.onnx"
    shutil.copytree(ext.parent, inl.parent)
    inline_if_small(str(inl), 1000)  # over the threshold: stays external
    assert sorted(os.listdir(inl.parent)) == ["vision.onnx", "vision.onnx.data"]
    inline_if_small(str(inl), 2**31 - 1)
    assert sorted(os.listdir(inl.parent)) == ["vision.onnx"]
    a, b = onnx.load(ext), onnx.load(inl)
    onnx.checker.check_model(b)
    assert a.graph.node == b.graph.node and a.graph.input == b.graph.input and a.graph.output == b.graph.output
    assert not any(t.external_data for t in b.graph.initializer)
    xs = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    ys = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert xs.keys() == ys.keys()
    for name, x in xs.items():
        assert x.dtype == ys[name].dtype
        np.testing.assert_array_equal(x, ys[name])


# -- int8 ------------------------------------------------------------------------------------------
def test_int8_export_has_signed_int8_weights(int8_export):
    out, _ = int8_export
    model = onnx.load(out / "vision.onnx")
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.INT8 in types.values()
    weight_ops = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")]
    assert weight_ops
    for n in weight_ops:
        assert types.get(n.input[1]) == onnx.TensorProto.INT8, n.name
    assert all(n.name.startswith(INT8_MODULE) for n in weight_ops)
    # every ViT weight MatMul is int8; the Q-Former's and the projection's keep fp32 activations
    # (outliers) with 8-bit weights: MatMulNBits, computed in fp32
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in types]
    eight = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {n.name.split("/")[1] for n in eight} == {"qformer", "proj"}
    for n in eight:
        attrs = {a.name: a.i for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8, 32, 4), n.name
        assert types[n.input[1]] == onnx.TensorProto.UINT8
    unsigned = {n.input[1] for n in eight}
    assert not [name for name, t in types.items() if t == onnx.TensorProto.UINT8 and name not in unsigned]


def test_int8_vision_survives_planted_outlier_channels(tmp_path):
    """Real ViTs carry a few huge residual channels and high-norm tokens (tinyv.testing outliers=N).
    Quantizing every MatMul gave cosine 0.979 on them; the ViT alone in int8 keeps 0.999."""
    from tinyv.testing import write_checkpoints

    paths = write_checkpoints(str(tmp_path / "ck"), "tiny", seed=0, outliers=4)
    model = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset="tiny")
    info = export_vision(model, tmp_path / "bundle", "int8", probes=probe_images(4, model.config.image_size))
    assert info["verify"]["cosine_min"] >= 0.999, info["int8"]


def test_int8_export_quality_and_clean_directories(int8_export, tiny_model):
    out, info = int8_export
    assert sorted(os.listdir(out)) == ["vision.onnx"]
    assert sorted(os.listdir(out.parent)) == ["bundle"]  # no temp dir, no fp32 intermediate
    assert info["precision"] == "int8" and info["data_file"] is None
    assert isinstance(info["int8"]["per_channel"], bool)
    tried = info["int8"]["cosine_min"]
    assert info["verify"]["cosine_min"] == max(tried.values())
    print(f"int8 tiny: cosine_min {info['verify']['cosine_min']:.6f} (per-tensor {tried['per_tensor']:.6f}, "
          f"per-channel {tried['per_channel']:.6f}), max_abs_err {info['verify']['max_abs_err']:.4g}")
    assert info["verify"]["cosine_min"] >= 0.99
    x = _pixels(3, tiny_model.config.image_size, 3)
    got = _run(out / "vision.onnx", x)
    assert vision_verify.compare(got, tiny_model.encode_pixels(x).numpy())["cosine_min"] >= 0.99


def test_int8_external_data(tiny_model, tmp_path):
    out = tmp_path / "bundle"
    info = export_vision(tiny_model, out, "int8", external_data_threshold=1000, probes=probe_images(2, 96))
    assert info["data_file"] == "vision.onnx.data" and info["verify"]["probes"] == 2
    assert sorted(os.listdir(out)) == ["vision.onnx", "vision.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    assert info["verify"]["cosine_min"] >= 0.99


@pytest.mark.parametrize("only", ["", INT8_MODULE])
def test_quantizing_in_pieces_gives_the_same_graph(tiny_model, tmp_path, only):
    # full-size exports quantize the graph in pieces (quantize_dynamic holds ~3 copies of its
    # input); cutting anywhere must give exactly what one piece gives
    fp32 = tmp_path / "fp32" / "vision.onnx"
    fp32.parent.mkdir()
    write_fp32_graph(VisionEncoder(tiny_model).eval(), str(fp32), tiny_model.config.image_size, 17)
    meta = onnx.load(fp32, load_external_data=False)
    inits = {t.name: t for t in meta.graph.initializer}
    x = _pixels(2, tiny_model.config.image_size, 5)
    outs = {}
    for budget in (1 << 30, 20_000):
        dst = tmp_path / f"q{budget}" / "vision.onnx"
        dst.parent.mkdir()
        quantize_pieces(str(fp32), str(dst), per_channel=True, piece_bytes=budget, only=only)
        assert sorted(os.listdir(dst.parent)) == ["vision.onnx", "vision.onnx.data"]
        ops = [n.op_type for n in onnx.load(dst).graph.node]
        outs[budget] = (_run(dst, x), ops.count("MatMulInteger"), ops.count("DynamicQuantizeLinear"))
    assert len(partition(list(meta.graph.node), inits, 20_000)) > 5
    whole = outs[1 << 30]
    for budget, (out, n_mm, n_dq) in outs.items():
        assert (n_mm, n_dq) == whole[1:]  # shared activation quantizers are not duplicated
        np.testing.assert_array_equal(out, whole[0])


def test_int8_export_in_pieces(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_pieces, "PIECE_BYTES", 30_000)
    info = export_vision(tiny_model, tmp_path / "bundle", "int8", probes=probe_images(2, 64))
    assert info["verify"]["cosine_min"] >= 0.99
    assert sorted(os.listdir(tmp_path)) == ["bundle"] and sorted(os.listdir(tmp_path / "bundle")) == ["vision.onnx"]


# -- failures leave nothing behind -----------------------------------------------------------------
@pytest.mark.parametrize(
    "precision,owner,name,nth",
    [
        ("fp32", onnx_writer.TensorWriter, "add", 20),  # half-written weight file
        ("fp32", vx, "verify_graph", 1),
        ("fp32", vx, "_move_into_place", 1),
        ("int8", vx, "quantize_pieces", 2),  # one candidate already written
        ("int8", vx, "verify_graph", 2),
    ],
    ids=["write", "fp32-verify", "move", "int8-quantize", "int8-verify"],
)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_export_leaves_no_files(tiny_model, tmp_path, monkeypatch, precision, owner, name, nth, existing):
    out = tmp_path / "bundle"
    if existing:
        out.mkdir()
        (out / "manifest.json").write_text("{}")
    real = getattr(owner, name)
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == nth:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, flaky)
    with pytest.raises(RuntimeError, match="boom"):
        export_vision(tiny_model, out, precision, probes=probe_images(2, 64))
    assert len(calls) == nth
    if existing:
        assert sorted(os.listdir(tmp_path)) == ["bundle"] and sorted(os.listdir(out)) == ["manifest.json"]
    else:
        assert os.listdir(tmp_path) == []


def test_a_graph_that_does_not_match_is_rejected(tiny_model, tmp_path):
    with pytest.raises(TinyVError, match="does not match"):
        export_vision(tiny_model, tmp_path / "bundle", "fp32", min_cosine=1.5, probes=probe_images(1, 64))
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(TinyVError, match="precision"):
        export_vision(tiny_model, tmp_path / "b", "int4")
    with pytest.raises(TinyVError, match="not found"):
        open_vision_session(tmp_path / "missing.onnx")
    assert os.listdir(tmp_path) == []

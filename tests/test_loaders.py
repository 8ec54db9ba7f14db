"""The strict checkpoint loaders (tinyv.export.loaders, tinyv.export.hub; SPEC §1.14, §2).

Every test builds its own checkpoints with ``tinyv.testing`` in the real on-disk formats (torch
zip pickles, safetensors, sharded safetensors with an index, pytorch_model.bin, HF cache layout).

* every accepted spelling of a file loads to the *same* model (bit-identical outputs);
* the LoRA merge equals running the LoRA branch unmerged, computed here from the raw tensors;
* which file wins for each tensor (stage norm weights over Phi-2's; biases from Phi-2; q/k norm
  biases zero), the dropped 40th ViT block, the pos_embed interpolation;
* every mistake a user can make is a ``TinyVError`` whose message names the problem, and a
  pickle with code in it is refused without running the code;
* hub names resolve from a local Hugging Face cache while offline, ``file://`` URLs through
  tinyv's download cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from tinyv import TinyVError
from tinyv.engine.config import preset as make_preset
from tinyv.export.reference import TinyGPTV
from tinyv.engine.prompts import build_prompt
from tinyv.export.hub import resolve
from tinyv.testing import CheckpointPaths, write_checkpoints, write_phi2, write_stage, write_vit

PRESET = "tiny"
CFG = make_preset(PRESET)
SEED = 0
PROMPT = build_prompt(4)
PEFT = "llama_model.base_model.model.model."  # the stage file's prefix of Phi-2 tensors
LAYERS = CFG.phi.layers
QKV_DENSE = ("query_key_value", "dense")


# ---------------------------------------------------------------------------------------------
# Helpers and session fixtures
# ---------------------------------------------------------------------------------------------
def load(paths: CheckpointPaths, **override) -> TinyGPTV:
    kw = paths.as_kwargs()
    kw.update({k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in override.items()})
    return TinyGPTV.from_checkpoints(**kw, preset=PRESET)


def outputs(model: TinyGPTV, image) -> tuple[torch.Tensor, torch.Tensor]:
    return model.next_token_logits(image, PROMPT), model.encode_image(image)


def assert_same_outputs(model, ref_out, image):
    logits, emb = outputs(model, image)
    assert torch.equal(logits, ref_out[0]), f"logits differ by {(logits - ref_out[0]).abs().max()}"
    assert torch.equal(emb, ref_out[1]), f"image embeddings differ by {(emb - ref_out[1]).abs().max()}"


def assert_same_state(model, ref_model):
    a, b = model.state_dict(), ref_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def raw_pickle(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_sd(path) -> dict:
    return raw_pickle(path)["model"]


def phi2_sd(folder) -> dict:
    return load_file(os.path.join(folder, "model.safetensors"))


def phi2_keys(folder) -> list[str]:
    """Tensor names in a Phi-2 folder, whatever its file layout."""
    from safetensors import safe_open

    keys = []
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as h:
                keys += list(h.keys())
        elif f.endswith(".bin"):
            keys += list(raw_pickle(os.path.join(folder, f)))
    return keys


def edit_pickle(src, dst, edit, wrapped: bool) -> str:
    """Load ``src``, apply ``edit`` to its state dict, save to ``dst`` (same container)."""
    obj = raw_pickle(src)
    edit(obj["model"] if wrapped else obj)
    torch.save(obj, dst)
    return os.fspath(dst)


def edit_phi2(src_dir, dst_dir, edit) -> str:
    """Copy a single-file Phi-2 folder and apply ``edit`` to its tensors."""
    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})
    return os.fspath(dst_dir)


def edit_file(ckpt: CheckpointPaths, which: str, tmp_path, edit) -> dict:
    """A ``load`` override with one of the four sources edited."""
    if which == "phi2":
        return {"phi2": edit_phi2(ckpt.phi2, tmp_path / "phi-2", edit)}
    src = getattr(ckpt, which)
    dst = tmp_path / os.path.basename(src)
    return {which: edit_pickle(src, dst, edit, wrapped=which in ("stage", "qformer"))}


def error_of(ckpt, **override) -> str:
    with pytest.raises(TinyVError) as e:
        load(ckpt, **override)
    return str(e.value)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> CheckpointPaths:
    return write_checkpoints(str(tmp_path_factory.mktemp("ref")), PRESET, seed=SEED)


@pytest.fixture(scope="session")
def ref_model(ckpt) -> TinyGPTV:
    return load(ckpt)


@pytest.fixture(scope="session")
def image():
    img = Image.new("RGB", (52, 37), (240, 240, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((3, 5, 25, 30), fill=(220, 30, 30))
    d.rectangle((28, 8, 50, 33), fill=(30, 60, 220))
    d.line((0, 36, 51, 0), fill=(20, 160, 40), width=3)
    return img


@pytest.fixture(scope="session")
def ref_out(ref_model, image):
    return outputs(ref_model, image)


# ---------------------------------------------------------------------------------------------
# The reference load
# ---------------------------------------------------------------------------------------------
def test_reference_load_is_complete_fp32(ref_model, ref_out):
    for name, t in list(ref_model.named_parameters()) + list(ref_model.named_buffers()):
        assert not t.is_meta, f"{name} was never filled"
        assert t.dtype == torch.float32, name
    logits, emb = ref_out
    assert logits.shape == (CFG.phi.vocab_size,) and torch.isfinite(logits).all()
    assert emb.shape == (1, CFG.qformer.num_queries, CFG.phi.hidden) and torch.isfinite(emb).all()
    assert ref_model.config.stage == 4  # the stage file's config says arch minigpt_v2


# ---------------------------------------------------------------------------------------------
# Every format and spelling gives the same model
# ---------------------------------------------------------------------------------------------
VARIANTS = {
    "phi-split-qkv": dict(phi_format="split"),
    "phi-sharded": dict(shard_bytes=60_000),
    "phi-bin": dict(phi_file="bin"),
    "phi-split-sharded": dict(phi_format="split", shard_bytes=60_000),
    "phi-split-bin": dict(phi_format="split", phi_file="bin"),
    "lora-default-spelling": dict(lora="default"),
    "stage-without-peft-prefix": dict(peft_prefix=False),
    "lora-default-without-prefix": dict(lora="default", peft_prefix=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_format_variants_give_identical_model(name, tmp_path, ref_model, ref_out, image):
    opts = VARIANTS[name]
    paths = write_checkpoints(str(tmp_path), PRESET, seed=SEED, **opts)
    files = sorted(os.listdir(paths.phi2))
    keys = list(stage_sd(paths.stage))
    # the variant really is in the format it claims
    if opts.get("phi_file") == "bin":
        assert "pytorch_model.bin" in files and not any(f.endswith(".safetensors") for f in files)
    elif "shard_bytes" in opts:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        assert sum(f.endswith(".safetensors") for f in files) >= 2
    else:
        assert "model.safetensors" in files
    if opts.get("phi_format") == "split":
        phi_keys = phi2_keys(paths.phi2)
        assert "model.layers.0.self_attn.q_proj.weight" in phi_keys
        assert not any("query_key_value" in k for k in phi_keys)
    if opts.get("lora") == "default":
        assert any(k.endswith("lora_A.default.weight") for k in keys)
    if opts.get("peft_prefix") is False:
        assert not any("base_model.model." in k for k in keys)
        assert any(k.startswith("llama_model.model.layers.") for k in keys)

    model = load(paths)
    assert_same_state(model, ref_model)
    assert_same_outputs(model, ref_out, image)


def test_vit_file_without_extra_block_gives_identical_model(ckpt, tmp_path, ref_out, image):
    vit = tmp_path / "eva_vit_g.pth"
    write_vit(str(vit), CFG, SEED + 1, extra_block=False)
    assert f"blocks.{CFG.vision.depth - 1}.norm1.weight" in raw_pickle(vit)
    assert f"blocks.{CFG.vision.depth}.norm1.weight" not in raw_pickle(vit)
    assert_same_outputs(load(ckpt, vit=vit), ref_out, image)


def test_local_paths_may_be_pathlike(ckpt, ref_out, image):
    from pathlib import Path

    model = TinyGPTV.from_checkpoints(
        phi2=Path(ckpt.phi2), vit=Path(ckpt.vit), qformer=Path(ckpt.qformer), stage=Path(ckpt.stage), preset=PRESET
    )
    assert_same_outputs(model, ref_out, image)


# ---------------------------------------------------------------------------------------------
# Stage 1 (no LoRA) and the LoRA merge
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_prefix", [True, False])
def test_stage_file_without_lora_loads_base_weights(peft_prefix, ckpt, tmp_path, ref_model, ref_out, image):
    stage = tmp_path / "TinyGPT-V_for_Stage1.pth"
    write_stage(str(stage), CFG, SEED + 3, lora="none", peft_prefix=peft_prefix)
    assert not any("lora" in k for k in stage_sd(stage))
    model = load(ckpt, stage=stage)
    phi = phi2_sd(ckpt.phi2)
    for i in range(LAYERS):
        for mod in QKV_DENSE:
            got = getattr(model.phi.layers[i].self_attn, mod).weight
            base = phi[f"model.layers.{i}.self_attn.{mod}.weight"].float()
            assert torch.equal(got, base), f"layer {i} {mod}: no LoRA, so the Phi-2 weight unchanged"
            merged = getattr(ref_model.phi.layers[i].self_attn, mod).weight
            assert not torch.allclose(merged, base), f"layer {i} {mod}: the LoRA stage must change it"
    logits, emb = outputs(model, image)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, ref_out[0], atol=1e-3)


@pytest.mark.parametrize("arch, stage", [("minigpt_v2", 4), ("minigpt4", 3)])
def test_stage_number_comes_from_the_checkpoint_config(arch, stage, ckpt, tmp_path):
    path = tmp_path / "stage.pth"
    write_stage(str(path), CFG, SEED + 3, arch=arch)
    assert load(ckpt, stage=path).config.stage == stage


@torch.no_grad()
def test_lora_merge_equals_unmerged_branch(ckpt, tmp_path, ref_model):
    base_stage = tmp_path / "no_lora.pth"
    write_stage(str(base_stage), CFG, SEED + 3, lora="none")
    base_model = load(ckpt, stage=base_stage)

    raw = raw_pickle(ckpt.stage)
    sd, conf = raw["model"], raw["config"]["model"]
    scale = conf["lora_alpha"] / conf["lora_r"]
    assert scale == pytest.approx(0.25)  # the real 16/64
    phi = phi2_sd(ckpt.phi2)

    g = torch.Generator().manual_seed(123)
    x = torch.randn(7, CFG.phi.hidden, generator=g)
    for i in range(LAYERS):
        for mod in QKV_DENSE:
            W = phi[f"model.layers.{i}.self_attn.{mod}.weight"].float()
            b = phi[f"model.layers.{i}.self_attn.{mod}.bias"].float()
            A = sd[f"{PEFT}layers.{i}.self_attn.{mod}.lora_A.weight"]
            B = sd[f"{PEFT}layers.{i}.self_attn.{mod}.lora_B.weight"]
            assert A.shape == (conf["lora_r"], CFG.phi.hidden) and B.shape[1] == conf["lora_r"]
            base_lin = getattr(base_model.phi.layers[i].self_attn, mod)
            assert torch.equal(base_lin.weight, W) and torch.equal(base_lin.bias, b)

            branch = scale * F.linear(F.linear(x, A), B)  # (alpha/r) * B(A(x)), peft semantics
            assert branch.abs().max() > 1e-2, "LoRA too small for the test to mean anything"
            expected = F.linear(x, W, b) + branch
            merged_lin = getattr(ref_model.phi.layers[i].self_attn, mod)
            got = merged_lin(x)
            assert torch.allclose(got, base_lin(x) + branch, atol=1e-5, rtol=1e-5)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (
                f"layer {i} {mod}: max err {(got - expected).abs().max()}"
            )
            assert torch.equal(merged_lin.bias, b)  # LoRA has no bias


# ---------------------------------------------------------------------------------------------
# Which file gives which tensor
# ---------------------------------------------------------------------------------------------
def test_stage_norm_weights_override_phi2_but_biases_come_from_phi2(ckpt, ref_model):
    stage, phi = stage_sd(ckpt.stage), phi2_sd(ckpt.phi2)
    pairs = [(ref_model.phi.layers[i].input_layernorm, f"layers.{i}.input_layernorm") for i in range(LAYERS)]
    pairs.append((ref_model.phi.final_layernorm, "final_layernorm"))
    for module, name in pairs:
        s_w = stage[PEFT + name + ".weight"]
        p_w, p_b = phi["model." + name + ".weight"].float(), phi["model." + name + ".bias"].float()
        assert not torch.allclose(s_w, p_w), f"{name}: the test needs the two files to differ"
        assert torch.equal(module.weight, s_w), f"{name}.weight must be the stage file's"
        assert torch.equal(module.bias, p_b), f"{name}.bias must be Phi-2's"
        assert PEFT + name + ".bias" not in stage
    for i in range(LAYERS):
        post = ref_model.phi.layers[i].post_layernorm
        assert torch.equal(post.weight, stage[f"{PEFT}layers.{i}.post_layernorm.weight"])


def test_qk_norms_come_from_stage_file_and_biases_are_zero(ckpt, ref_model):
    stage = stage_sd(ckpt.stage)
    for i in range(LAYERS):
        attn = ref_model.phi.layers[i].self_attn
        for n in ("q_layernorm", "k_layernorm"):
            norm = getattr(attn, n)
            assert torch.equal(norm.weight, stage[f"{PEFT}layers.{i}.self_attn.{n}.weight"])
            assert norm.bias.shape == (CFG.phi.head_dim,)
            assert torch.equal(norm.bias, torch.zeros(CFG.phi.head_dim)), f"layer {i} {n}.bias"


def test_other_tensors_come_from_their_files(ckpt, ref_model):
    stage, vit, qf = stage_sd(ckpt.stage), raw_pickle(ckpt.vit), stage_sd(ckpt.qformer)
    phi = phi2_sd(ckpt.phi2)
    m = ref_model
    checks = [
        (m.llama_proj.weight, stage["llama_proj.weight"]),
        (m.llama_proj2.bias, stage["llama_proj2.bias"]),
        (m.visual.cls_token, vit["cls_token"]),
        (m.visual.blocks[1].attn.q_bias, vit["blocks.1.attn.q_bias"]),
        (m.visual.blocks[2].mlp.fc2.weight, vit["blocks.2.mlp.fc2.weight"]),
        (m.ln_vision.weight, qf["ln_vision.weight"]),
        (m.qformer.query_tokens, qf["query_tokens"]),
        (m.phi.embed_tokens.weight, phi["model.embed_tokens.weight"]),
        (m.phi.lm_head.bias, phi["lm_head.bias"]),
        (m.phi.layers[2].mlp.fc1.weight, phi["model.layers.2.mlp.fc1.weight"]),
    ]
    for got, want in checks:
        assert torch.equal(got, want.float())


def test_extra_vit_block_is_not_used(ckpt, tmp_path, ref_model, ref_out, image):
    depth = CFG.vision.depth
    assert len(ref_model.visual.blocks) == depth
    vit = raw_pickle(ckpt.vit)
    extra = [k for k in vit if k.startswith(f"blocks.{depth}.")]
    assert len(extra) >= 10  # the file holds one more block than the model uses
    g = torch.Generator().manual_seed(7)

    def scramble(sd):
        for k in extra:
            sd[k] = (torch.randn(sd[k].shape, generator=g) * 100).to(sd[k].dtype)

    override = edit_file(ckpt, "vit", tmp_path, scramble)
    assert not torch.equal(raw_pickle(override["vit"])[extra[0]], vit[extra[0]])
    assert_same_outputs(load(ckpt, **override), ref_out, image)


def test_pos_embed_is_interpolated_to_the_model_grid(ckpt, ref_model):
    v = CFG.vision
    old, new = v.pretrain_image_size // v.patch_size, v.image_size // v.patch_size
    assert (old, new) == (4, 8)  # tiny: 56 px -> 112 px
    stored = raw_pickle(ckpt.vit)["pos_embed"].float()
    assert stored.shape == (1, 1 + old * old, v.width)
    got = ref_model.visual.pos_embed
    assert got.shape == (1, 1 + new * new, v.width)
    assert torch.equal(got[:, :1], stored[:, :1]), "the cls position is kept apart"
    grid = stored[:, 1:].reshape(1, old, old, v.width).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, new * new, v.width)
    assert torch.allclose(got[:, 1:], want, atol=1e-6, rtol=0)
    # and not some other resize
    bilinear = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    assert not torch.allclose(got[:, 1:], bilinear.permute(0, 2, 3, 1).reshape(1, new * new, v.width), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Missing, unexpected and misshapen tensors
# ---------------------------------------------------------------------------------------------
MISSING = [
    ("stage", PEFT + "layers.1.post_layernorm.weight", "layers.1.post_layernorm.weight"),
    ("stage", PEFT + "layers.0.self_attn.k_layernorm.weight", "layers.0.self_attn.k_layernorm.weight"),
    ("stage", "llama_proj2.bias", "llama_proj2.bias"),
    ("vit", "blocks.1.attn.q_bias", "blocks.1.attn.q_bias"),
    ("vit", "pos_embed", "pos_embed"),
    ("qformer", "Qformer.bert.encoder.layer.2.crossattention.self.key.weight",
     "layer.2.crossattention.self.key.weight"),
    ("qformer", "query_tokens", "query_tokens"),
    ("phi2", "model.layers.2.mlp.fc1.bias", "layers.2.mlp.fc1.bias"),
    ("phi2", "lm_head.bias", "lm_head.bias"),
    # the bias comes only from Phi-2 even though the stage file gives the weight
    ("phi2", "model.layers.1.input_layernorm.bias", "layers.1.input_layernorm.bias"),
]


@pytest.mark.parametrize("which, key, named", MISSING, ids=[m[1] for m in MISSING])
def test_missing_tensor_is_named(which, key, named, ckpt, tmp_path):
    def drop(sd):
        del sd[key]

    msg = error_of(ckpt, **edit_file(ckpt, which, tmp_path, drop))
    assert named in msg
    assert "lack" in msg


def test_missing_stage_norms_hint_at_stage_file(ckpt, tmp_path):
    msg = error_of(ckpt, **edit_file(ckpt, "stage", tmp_path, lambda sd: sd.pop(PEFT + "layers.2.post_layernorm.weight")))
    assert "--stage" in msg


def _t(*shape):
    return torch.full(shape, 0.5)


UNEXPECTED = [
    # keys no rule knows
    ("stage", PEFT + "layers.0.mlp.fc1.lora_A.weight", _t(8, 80)),
    ("stage", "bogus.weight", _t(3)),
    ("vit", "blocks.0.attn.relative_position_bias_table", _t(10, 4)),
    ("vit", "bogus", _t(3)),
    ("qformer", "Qformer.bert.bogus.weight", _t(3)),
    ("phi2", "model.layers.0.self_attn.bogus.weight", _t(3)),
    ("phi2", "transformer.h.0.mixer.Wqkv.weight", _t(240, 80)),
    # keys of a known form that map to a tensor this model does not have
    ("stage", PEFT + "layers.5.post_layernorm.weight", _t(80)),
    ("qformer", "Qformer.bert.encoder.layer.1.crossattention.self.query.weight", _t(32, 32)),
    ("phi2", "model.layers.7.mlp.fc1.weight", _t(192, 80)),
]


@pytest.mark.parametrize("which, key, tensor", UNEXPECTED, ids=[u[1] for u in UNEXPECTED])
def test_unexpected_tensor_is_named(which, key, tensor, ckpt, tmp_path):
    def add(sd):
        sd[key] = tensor.to(torch.float16) if which in ("vit", "phi2") else tensor

    msg = error_of(ckpt, **edit_file(ckpt, which, tmp_path, add))
    assert key in msg
    assert f"--{which}" in msg


def test_vit_blocks_beyond_the_stored_extra_block_are_an_error(ckpt, tmp_path):
    """Only the one stored extra block (index ``depth``) is declared unused (SPEC §1.3).

    A file with more blocks than that belongs to a deeper ViT: silently truncating it would
    give exactly the garbage outputs the strict loader exists to prevent (SPEC §2).
    """
    depth = CFG.vision.depth

    def add_blocks(sd):
        for k in [k for k in sd if k.startswith(f"blocks.{depth}.")]:
            for extra in (depth + 1, depth + 5):
                sd[k.replace(f"blocks.{depth}.", f"blocks.{extra}.", 1)] = sd[k].clone()

    msg = error_of(ckpt, **edit_file(ckpt, "vit", tmp_path, add_blocks))
    assert f"blocks.{depth + 1}." in msg or f"blocks.{depth + 5}." in msg


WRONG_SHAPE = [
    ("stage", "llama_proj.weight", (96, 31), "[96, 32]"),
    ("stage", PEFT + "layers.1.post_layernorm.weight", (161,), "[160]"),
    ("vit", "blocks.0.attn.qkv.weight", (100, 48), "[144, 48]"),
    ("qformer", "query_tokens", (1, 4, 32), "[1, 8, 32]"),
    ("phi2", "model.layers.1.mlp.fc2.weight", (256, 160), "[160, 256]"),
    ("phi2", "model.embed_tokens.weight", (1000, 160), "[1024, 160]"),
]


@pytest.mark.parametrize("which, key, shape, expected", WRONG_SHAPE, ids=[w[1] for w in WRONG_SHAPE])
def test_wrong_shape_is_named(which, key, shape, expected, ckpt, tmp_path):
    def resize(sd):
        sd[key] = torch.zeros(shape, dtype=sd[key].dtype)

    msg = error_of(ckpt, **edit_file(ckpt, which, tmp_path, resize))
    assert key in msg
    assert str(list(shape)) in msg and expected in msg


def test_non_square_pos_embed_is_an_error(ckpt, tmp_path):
    def bad(sd):
        sd["pos_embed"] = sd["pos_embed"][:, :-1].clone()

    msg = error_of(ckpt, **edit_file(ckpt, "vit", tmp_path, bad))
    assert "pos_embed" in msg and "--vit" in msg


def test_integer_tensor_where_floats_are_needed_is_an_error(ckpt, tmp_path):
    def to_int(sd):
        sd["llama_proj.bias"] = torch.zeros(sd["llama_proj.bias"].shape, dtype=torch.int64)

    msg = error_of(ckpt, **edit_file(ckpt, "stage", tmp_path, to_int))
    assert "llama_proj.bias" in msg and "int64" in msg


# ---------------------------------------------------------------------------------------------
# LoRA problems
# ---------------------------------------------------------------------------------------------
def test_lora_rank_mismatch(ckpt, tmp_path):
    stage = tmp_path / "rank4.pth"
    write_stage(str(stage), CFG.replace(lora_r=4), SEED + 3)
    assert stage_sd(stage)[PEFT + "layers.0.self_attn.dense.lora_A.weight"].shape[0] == 4
    msg = error_of(ckpt, stage=stage)
    assert "rank 4" in msg and str(CFG.lora_r) in msg and "LoRA" in msg


def test_lora_for_only_some_layers(ckpt, tmp_path):
    def drop_layer2(sd):
        for k in [k for k in sd if ".layers.2." in k and "lora_" in k]:
            del sd[k]

    msg = error_of(ckpt, **edit_file(ckpt, "stage", tmp_path, drop_layer2))
    assert "LoRA" in msg and "layer 2" in msg
    assert "query_key_value" in msg and "dense" in msg


def test_lora_a_without_b(ckpt, tmp_path):
    msg = error_of(ckpt, **edit_file(
        ckpt, "stage", tmp_path, lambda sd: sd.pop(PEFT + "layers.1.self_attn.dense.lora_B.weight")))
    assert "layer 1" in msg and "dense" in msg and "lora_A" in msg


def test_lora_for_a_differently_shaped_weight(ckpt, tmp_path):
    key = PEFT + "layers.0.self_attn.query_key_value.lora_B.weight"

    def resize(sd):
        sd[key] = torch.zeros(200, CFG.lora_r)

    msg = error_of(ckpt, **edit_file(ckpt, "stage", tmp_path, resize))
    assert "layer 0" in msg and "query_key_value" in msg and "200" in msg


# ---------------------------------------------------------------------------------------------
# Hostile and broken files
# ---------------------------------------------------------------------------------------------
class CustomObject:  # an arbitrary class: weights_only loading must refuse it
    def __init__(self):
        self.value = 3


class Payload:
    """Unpickles to ``os.system('touch MARKER')``."""

    def __init__(self, marker):
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_payload_is_armed(tmp_path):
    """The payload used below really runs code when unpickled unsafely (so its absence means something)."""
    marker = tmp_path / "armed"
    pickle.loads(pickle.dumps(Payload(marker)))  # our own harmless payload: touches a file in tmp
    assert marker.exists()


def _hostile(kind: str, path, marker, base: dict, wrapped: bool) -> None:
    if kind == "custom-class":
        sd = dict(base, extra=CustomObject())
    else:
        sd = dict(base, extra=Payload(marker))
    obj = {"model": sd} if wrapped else sd
    if kind == "raw-pickle":  # a hand-made (non-zip) pickle, like a legacy torch file
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("kind", ["custom-class", "torch-save-os-system", "raw-pickle"])
@pytest.mark.parametrize("which", ["stage", "vit", "qformer", "phi2-bin"])
def test_pickle_with_code_is_refused_and_not_run(which, kind, ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    base = {"w": torch.ones(2)}
    if which == "phi2-bin":
        folder = tmp_path / "phi-2"
        shutil.copytree(ckpt.phi2, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
        path = folder / "pytorch_model.bin"
        _hostile(kind, path, marker, base, wrapped=False)
        override = {"phi2": folder}
    else:
        path = tmp_path / f"{which}.pth"
        _hostile(kind, path, marker, base, wrapped=which in ("stage", "qformer"))
        override = {which: path}
    msg = error_of(ckpt, **override)
    assert not marker.exists(), "the pickle's code was executed"
    assert str(path) in msg or os.path.basename(path) in msg
    assert "pickled Python objects" in msg or "refusing" in msg


@pytest.mark.parametrize("which", ["stage", "vit", "qformer", "phi2-safetensors", "phi2-bin"])
def test_truncated_file(which, ckpt, tmp_path):
    if which.startswith("phi2"):
        folder = tmp_path / "phi-2"
        if which == "phi2-bin":
            write_phi2(str(folder), CFG, SEED, file="bin")
            path = folder / "pytorch_model.bin"
        else:
            shutil.copytree(ckpt.phi2, folder)
            path = folder / "model.safetensors"
        override = {"phi2": folder}
    else:
        path = tmp_path / os.path.basename(getattr(ckpt, which))
        shutil.copy(getattr(ckpt, which), path)
        override = {which: path}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = error_of(ckpt, **override)
    assert os.path.basename(path) in msg
    assert "complete" in msg.lower()


def test_sharded_phi2_missing_a_shard(ckpt, tmp_path):
    folder = tmp_path / "phi-2"
    write_phi2(str(folder), CFG, SEED, shard_bytes=60_000)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    os.unlink(folder / shards[-1])
    msg = error_of(ckpt, phi2=folder)
    assert shards[-1] in msg


def test_split_phi2_missing_one_projection_names_it(ckpt, tmp_path):
    folder = tmp_path / "phi-2"
    write_phi2(str(folder), CFG, SEED, fmt="split")

    def drop(sd):
        del sd["model.layers.1.self_attn.v_proj.weight"]

    msg = error_of(ckpt, phi2=edit_phi2(folder, tmp_path / "phi-2-edited", drop))
    assert "v_proj" in msg and ("layers.1" in msg or "layer 1" in msg), msg


def test_not_a_state_dict(ckpt, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    msg = error_of(ckpt, vit=path)
    assert "--vit" in msg and "state dict" in msg


def test_stage_file_without_model_dict(ckpt, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"llama_proj.weight": torch.ones(2)}, path)
    msg = error_of(ckpt, stage=path)
    assert "--stage" in msg and "'model'" in msg


# ---------------------------------------------------------------------------------------------
# Wrong option, wrong kind of path
# ---------------------------------------------------------------------------------------------
WRONG_OPTION = [
    ("qformer", "vit", "--qformer"),
    ("stage", "vit", "--stage"),
    ("stage", "qformer", "--stage"),
    ("qformer", "stage", "--qformer"),
    ("vit", "qformer", "--vit"),
    ("vit", "stage", "--vit"),
]


@pytest.mark.parametrize("given, option, hint", WRONG_OPTION, ids=[f"{g}-as-{o}" for g, o, _ in WRONG_OPTION])
def test_file_passed_to_the_wrong_option_hints_what_it_is(given, option, hint, ckpt):
    msg = error_of(ckpt, **{option: getattr(ckpt, given)})
    assert f"--{option}" in msg
    assert "looks like" in msg and hint in msg, msg


def test_phi2_weights_passed_as_vit_are_recognized(ckpt, tmp_path):
    folder = tmp_path / "phi-bin"
    write_phi2(str(folder), CFG, SEED, file="bin")
    msg = error_of(ckpt, vit=folder / "pytorch_model.bin")
    assert "--vit" in msg and "--phi2" in msg and "looks like" in msg


@pytest.mark.parametrize("option", ["phi2", "vit", "qformer", "stage"])
def test_nonexistent_path(option, ckpt, tmp_path):
    missing = tmp_path / "no" / "such_file.pth"
    msg = error_of(ckpt, **{option: missing})
    assert f"--{option}" in msg and str(missing) in msg and "does not exist" in msg


@pytest.mark.parametrize("option", ["vit", "qformer", "stage"])
def test_folder_where_a_file_is_expected(option, ckpt):
    msg = error_of(ckpt, **{option: ckpt.phi2})
    assert f"--{option}" in msg and "folder" in msg and ckpt.phi2 in msg


def test_file_where_the_phi2_folder_is_expected(ckpt):
    msg = error_of(ckpt, phi2=ckpt.vit)
    assert "--phi2" in msg and "folder" in msg and ckpt.vit in msg


def test_phi2_folder_of_another_model_type(ckpt, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(ckpt.phi2, folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "llama"
    cfg_path.write_text(json.dumps(cfg))
    msg = error_of(ckpt, phi2=folder)
    assert "model_type" in msg and "'llama'" in msg and "--phi2" in msg


def test_phi2_folder_without_config_or_weights(ckpt, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    msg = error_of(ckpt, phi2=folder)
    assert "config.json" in msg and "--phi2" in msg
    shutil.copy(os.path.join(ckpt.phi2, "config.json"), folder)
    for f in os.listdir(ckpt.phi2):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(ckpt.phi2, f), folder)
    msg = error_of(ckpt, phi2=folder)
    assert "--phi2" in msg and "safetensors" in msg


# ---------------------------------------------------------------------------------------------
# Hub and URL resolution, without a network
# ---------------------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline. huggingface_hub reads its constants at import time."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    return cache


def add_to_hf_cache(cache, repo: str, files: dict, commit: str = COMMIT) -> str:
    """Lay files out as huggingface_hub does: blobs/<sha256>, snapshot symlinks, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        data = open(src, "rb").read()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, dst.parent), dst)
    return os.fspath(snap)


def test_hub_file_from_local_cache(hf_cache, ckpt):
    snap = add_to_hf_cache(hf_cache, "owner/name", {"file.pth": ckpt.stage, "sub/other.pth": ckpt.vit})
    for spec in ("hf://owner/name/file.pth", "hf:owner/name/file.pth", "hf://owner/name/file.pth@main"):
        got = resolve(spec, "--stage")
        assert os.path.samefile(got, os.path.join(snap, "file.pth")), spec
        assert open(got, "rb").read() == open(ckpt.stage, "rb").read()
    assert os.path.samefile(resolve("hf://owner/name/sub/other.pth", "--vit"), os.path.join(snap, "sub/other.pth"))


def test_hub_folder_from_local_cache(hf_cache, ckpt):
    files = {f: os.path.join(ckpt.phi2, f) for f in os.listdir(ckpt.phi2)}
    snap = add_to_hf_cache(hf_cache, "owner/phi", files)
    got = resolve("hf://owner/phi", "--phi2", folder=True)
    assert os.path.samefile(got, snap)
    assert os.path.exists(os.path.join(got, "config.json"))


@pytest.mark.parametrize("spec, folder", [
    ("hf://owner/name/missing.pth", False),
    ("hf://owner/absent/file.pth", False),
    ("hf://owner/absent", True),
])
def test_hub_entry_missing_while_offline(spec, folder, hf_cache, ckpt):
    add_to_hf_cache(hf_cache, "owner/name", {"file.pth": ckpt.stage})
    with pytest.raises(TinyVError) as e:
        resolve(spec, "--stage", folder=folder)
    msg = str(e.value)
    assert "--stage" in msg and spec.split("://")[1] in msg
    assert "offline" in msg and "cache" in msg


@pytest.mark.parametrize("spec, folder", [
    ("hf://owner", False),  # no file
    ("hf://owner/name", False),  # a file option given a whole repo
    ("hf://owner/name/file.pth", True),  # a folder option given a file
])
def test_hub_name_of_the_wrong_form(spec, folder, hf_cache):
    with pytest.raises(TinyVError) as e:
        resolve(spec, "--x", folder=folder)
    assert "--x" in str(e.value) and "hf://" in str(e.value)


def test_invalid_hub_repo_id_is_a_tinyv_error(hf_cache):
    with pytest.raises(TinyVError) as e:
        resolve("hf://own er/na me/file.pth", "--stage")
    assert "--stage" in str(e.value) and "own er" in str(e.value)


def test_known_short_names_resolve_through_the_hub_cache(hf_cache, ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    add_to_hf_cache(hf_cache, "Tyrannosaurus/TinyGPT-V", {"TinyGPT-V_for_Stage4.pth": ckpt.stage})
    got = resolve("tinygptv-stage4", "--stage")
    assert os.path.basename(got) == "TinyGPT-V_for_Stage4.pth"
    assert open(got, "rb").read() == open(ckpt.stage, "rb").read()


def test_whole_model_loads_from_hub_names(hf_cache, ckpt, ref_out, image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "phi-2" must not be taken for a local folder
    add_to_hf_cache(hf_cache, "microsoft/phi-2", {f: os.path.join(ckpt.phi2, f) for f in os.listdir(ckpt.phi2)})
    add_to_hf_cache(hf_cache, "Tyrannosaurus/TinyGPT-V", {"TinyGPT-V_for_Stage4.pth": ckpt.stage})
    add_to_hf_cache(hf_cache, "owner/blip2", {"eva_vit_g.pth": ckpt.vit, "blip2_pretrained_flant5xxl.pth": ckpt.qformer})
    model = TinyGPTV.from_checkpoints(
        phi2="phi-2",
        vit="hf://owner/blip2/eva_vit_g.pth",
        qformer="hf://owner/blip2/blip2_pretrained_flant5xxl.pth",
        stage="hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage4.pth",
        preset=PRESET,
    )
    assert_same_outputs(model, ref_out, image)


def test_file_url_downloads_into_tinyv_cache_once(tmp_path, monkeypatch, ckpt):
    cache = tmp_path / "tinyv-cache"
    monkeypatch.setenv("TINYV_CACHE", str(cache))
    src = tmp_path / "src" / "eva_vit_g.pth"
    src.parent.mkdir()
    shutil.copy(ckpt.vit, src)
    url = src.as_uri()
    assert url.startswith("file://")

    first = resolve(url, "--vit")
    assert os.path.commonpath([first, str(cache)]) == str(cache)
    assert os.path.basename(first) == "eva_vit_g.pth"
    assert open(first, "rb").read() == src.read_bytes()
    assert not [f for f in os.listdir(os.path.dirname(first)) if f.startswith(".part")]

    src.unlink()  # the second resolve must not need the source
    second = resolve(url, "--vit")
    assert second == first and os.path.exists(second)


def test_file_url_that_cannot_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "tinyv-cache"))
    url = (tmp_path / "nowhere.pth").as_uri()
    with pytest.raises(TinyVError) as e:
        resolve(url, "--vit")
    assert "--vit" in str(e.value) and url in str(e.value)
    with pytest.raises(TinyVError) as e:
        resolve(url, "--phi2", folder=True)
    assert "--phi2" in str(e.value)


def test_model_loads_from_file_urls(tmp_path, monkeypatch, ckpt, ref_out, image):
    from pathlib import Path

    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "tinyv-cache"))
    model = TinyGPTV.from_checkpoints(
        phi2=ckpt.phi2,
        vit=Path(ckpt.vit).as_uri(),
        qformer=Path(ckpt.qformer).as_uri(),
        stage=Path(ckpt.stage).as_uri(),
        preset=PRESET,
    )
    assert_same_outputs(model, ref_out, image)

"""tinyv export on tiny checkpoints: bundles at every precision, integrity checks, clean failure."""
import errno
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import tinyv.export.bundle as bundle_mod
from tinyv import TinyVError
from tinyv.cli.main import cli
from tinyv.engine.bundle import LLM_FILE, MANIFEST, read_manifest
from tinyv.engine.llm import build_quant_phi, linear_names
from tinyv.engine.prompts import build_prompt
from tinyv.export import llm_quant, stages
from tinyv.export.bundle import export_bundle
from tinyv.export.manifest import jsonable
from tinyv.export.quality import check_gate
from tinyv.kernels.quant import QuantConfig, dequantize_weight, quantize_weight, sqnr_db


def _export(paths, out, **kw):
    kw.setdefault("preset", "tiny")
    return export_bundle(**paths.as_kwargs(), out=str(out), **kw)


PRECISIONS = [(4, "fp32"), (8, "int8"), (16, "fp32")]


@pytest.fixture(scope="module")
def bundles(tiny_bundle):
    """(path, what export_bundle returned) per (bits, vision): the session's shared tiny bundles
    (read them, never change them)."""
    return {key: (tiny_bundle(*key), tiny_bundle.manifest(*key)) for key in PRECISIONS}


@pytest.mark.parametrize("bits, vision", PRECISIONS)
def test_bundle_contents(bundles, bits, vision):
    path, m = bundles[(bits, vision)]
    assert read_manifest(path, verify=True) == json.load(open(os.path.join(path, MANIFEST)))
    assert set(m["files"]) == {"llm.safetensors", "tokenizer.json", "vision.onnx"}
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tinyv-")]
    q = m["quality"]
    assert m["quantization"]["bits"] == bits and m["vision"]["precision"] == vision
    assert m["model"]["phi"]["hidden"] == 160 and m["model"]["stage"] == 4
    assert m["prompt"]["stop_strings"] == ["###"] and "<ImageHere>" in m["prompt"]["template"]
    assert set(m["sources"]) == {"phi2", "vit", "qformer", "stage"}
    assert all(len(f["sha256"]) == 64 for fs in m["sources"].values() for f in fs)
    assert len(q["sqnr_db"]["per_layer"]) == len(linear_names(_phi_cfg(m)))
    assert q["steps"] == 32 and 0 <= q["token_agreement"] <= 1 and q["kl_mean"] >= 0
    floor = {4: 18, 8: 35, 16: 60}[bits]
    assert q["sqnr_db"]["min"] >= floor
    assert m["vision"]["verify"]["cosine_min"] >= (0.9999 if vision == "fp32" else 0.99)
    print(bits, vision, {k: q[k] for k in ("kl_mean", "kl_max", "token_agreement")}, q["sqnr_db"]["min"])


STAGES = ["load", "vision", "quantize", "verify", "write"]


@pytest.mark.parametrize("bits, vision", PRECISIONS)
def test_export_memory_per_stage(bundles, bits, vision):
    """RSS now and the peak so far at the end of every stage: returned, not written to the bundle."""
    path, m = bundles[(bits, vision)]
    mem = m["export_memory"]
    assert list(mem) == STAGES
    peaks = [mem[s]["peak_mb"] for s in STAGES]
    assert all(0 < mem[s]["rss_mb"] <= mem[s]["peak_mb"] for s in STAGES)
    assert peaks == sorted(peaks)  # the peak so far never goes down
    assert "export_memory" not in json.load(open(os.path.join(path, MANIFEST)))
    written = {k: v for k, v in m.items() if k != "export_memory"}
    assert json.loads(json.dumps(jsonable(written))) == read_manifest(path)


def test_stage_memory_reads_the_kernel():
    from tinyv.engine.memory import rss_mb
    from tinyv.export.memory import StageMemory

    rss, peak = rss_mb()
    assert 0 < rss <= peak
    log = StageMemory()
    log.mark("a")
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    log.mark("b")
    del block
    a, b = log.summary()["a"], log.summary()["b"]
    assert b["peak_mb"] >= a["peak_mb"] and b["rss_mb"] > a["rss_mb"] + 32


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_quantize_rows_equals_the_whole_weight(monkeypatch, bits):
    """Quantized a block of rows at a time: the same tensors and the same SQNR as all at once."""
    monkeypatch.setattr(llm_quant, "BLOCK_ELEMS", 3 * 64)  # 3 rows per block, the last one short
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    qcfg = QuantConfig(bits, 32)
    stored, db = llm_quant.quantize_rows(w, qcfg)
    whole = quantize_weight(w.float(), qcfg)
    assert stored.keys() == whole.keys() and all(torch.equal(stored[k], whole[k]) for k in whole)
    assert db == pytest.approx(sqnr_db(w.float(), dequantize_weight(whole, qcfg)), rel=1e-12)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_phi2_tensors_do_not_keep_their_file_mapped(tiny_paths):
    """Every page read through a mapping counts as the process's memory while it stays mapped."""
    from safetensors.torch import load_file

    from tinyv.export.checkpoint_files import phi2_source

    src = phi2_source(tiny_paths.phi2)
    kept = [src.get(k) for k in src.keys]  # alive while the maps are read: a view would pin its file
    with open("/proc/self/maps") as f:
        assert not [line for line in f if os.path.realpath(tiny_paths.phi2) in line]
    # and what was kept is the files' tensors, not empty or stand-in copies
    files = {}
    for name in sorted(os.listdir(tiny_paths.phi2)):
        if name.endswith(".safetensors"):
            files.update(load_file(os.path.join(tiny_paths.phi2, name)))
    assert sorted(src.keys) == sorted(files)
    for key, tensor in zip(src.keys, kept):
        assert tensor.dtype == files[key].dtype and torch.equal(tensor, files[key]), key


def test_quality_orders_by_precision(bundles):
    kl = {b: bundles[k][1]["quality"]["kl_mean"] for b, k in ((4, (4, "fp32")), (16, (16, "fp32")))}
    assert kl[16] < 1e-4 < kl[4]
    assert bundles[(16, "fp32")][1]["quality"]["token_agreement"] == 1.0


def _phi_cfg(m):
    from tinyv.engine.config import PhiConfig

    return PhiConfig.from_dict(m["model"]["phi"])


@pytest.mark.parametrize("bits", [4, 8])
def test_bundle_llm_is_the_dequantized_model(bundles, tiny_model, scene, bits, torch_kernels):
    """The stored layout round-trips: QuantPhi equals the fp32 model with dequantized weights
    (on the torch path; the kernels' int8 activations are checked in test_kernels.py)."""
    from safetensors.torch import load_file

    path, m = bundles[(bits, "fp32" if bits == 4 else "int8")]
    tensors = load_file(os.path.join(path, LLM_FILE))
    qcfg = QuantConfig.from_dict(m["quantization"])
    quant = build_quant_phi(_phi_cfg(m), tensors, qcfg)
    ref = __import__("copy").deepcopy(tiny_model.phi)
    for name in linear_names(_phi_cfg(m)):
        stored = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name and not k.endswith("bias")}
        ref.get_submodule(name).weight.data = dequantize_weight(stored, qcfg)
    ref.embed_tokens.weight.data = tensors["embed_tokens.weight"].float()
    with torch.inference_mode():
        emb = tiny_model.encode_image(scene)
        from tinyv.engine.generate import build_prompt_embeds

        x = build_prompt_embeds(ref, tiny_model.tokenizer, build_prompt(4), emb)
        torch.testing.assert_close(quant.logits(quant(x)), ref.logits(ref(x)), rtol=1e-4, atol=1e-4)
    # biases and norms are kept exactly
    assert torch.equal(tensors["layers.1.self_attn.q_layernorm.weight"], tiny_model.phi.layers[1].self_attn.q_layernorm.weight)
    assert torch.equal(tensors["lm_head.bias"], tiny_model.phi.lm_head.bias)


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(bundles[(4, "fp32")][0], path)
    return path


def test_missing_file(bundle_copy):
    os.remove(bundle_copy / "vision.onnx")
    with pytest.raises(TinyVError, match="missing vision.onnx"):
        read_manifest(bundle_copy)


def test_truncated_file(bundle_copy):
    data = (bundle_copy / LLM_FILE).read_bytes()
    (bundle_copy / LLM_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(TinyVError, match="truncated"):
        read_manifest(bundle_copy)


def test_altered_file_same_size(bundle_copy):
    data = bytearray((bundle_copy / LLM_FILE).read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / LLM_FILE).write_bytes(bytes(data))
    read_manifest(bundle_copy)  # sizes still match: only the hash check sees it
    with pytest.raises(TinyVError, match="altered"):
        read_manifest(bundle_copy, verify=True)


def test_unknown_format_version(bundle_copy):
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["format_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(TinyVError, match="format 99"):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("damage", ["not json", "no manifest", "file", "nowhere", "escape"])
def test_unreadable_bundles(bundle_copy, tmp_path, damage):
    target = bundle_copy
    if damage == "not json":
        (bundle_copy / MANIFEST).write_text("{oops")
    elif damage == "no manifest":
        os.remove(bundle_copy / MANIFEST)
    elif damage == "file":
        target = bundle_copy / "tokenizer.json"
    elif damage == "nowhere":
        target = tmp_path / "nothing-here"
    else:
        m = json.loads((bundle_copy / MANIFEST).read_text())
        m["files"]["../secret"] = {"size": 1, "sha256": "0" * 64}
        (bundle_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(TinyVError):
        read_manifest(target)


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".tinyv-")]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")])
def test_interrupted_export_leaves_nothing(tiny_paths, tmp_path, monkeypatch, exc):
    """Whatever stops an export, the staging folder goes, files and all, and a full disk is a
    TinyVError. The stage that fails is a stand-in that half writes a file (the real stages
    failing late are test_failure_while_writing_the_manifest and the quality gate's test)."""
    def half_written_vision(ck, folder, precision, progress):
        with open(os.path.join(folder, "vision.onnx"), "wb") as f:
            f.write(b"\0" * 1000)
            raise exc

    monkeypatch.setattr(bundle_mod, "export_and_probe_vision", half_written_vision)
    out = tmp_path / "b"
    expected = {RuntimeError: RuntimeError, KeyboardInterrupt: KeyboardInterrupt, OSError: TinyVError}[type(exc)]
    with pytest.raises(expected) as info:
        _export(tiny_paths, out)
    if isinstance(exc, OSError):
        assert "disk is full" in str(info.value)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failure_while_writing_the_manifest(tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "write_tokenizer", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        _export(tiny_paths, tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_quality_gate_failure_writes_nothing(tiny_paths, tmp_path):
    # all three thresholds out of reach: each is passed on to the gate, and named
    with pytest.raises(TinyVError, match="quality gate failed: layer SQNR .*; greedy agreement .*; mean KL "):
        _export(tiny_paths, tmp_path / "b", min_sqnr=40.0, min_agreement=1.01, max_kl=0.0)
    assert os.listdir(tmp_path) == []


def test_quality_gate_thresholds(bundles):
    """Each threshold fails on its own figure and names it; thresholds the figures meet pass."""
    q = bundles[(8, "int8")][1]["quality"]
    check_gate(q, min_sqnr=30.0, min_agreement=0.0, max_kl=1.0)
    check_gate(q, min_sqnr=None, min_agreement=None, max_kl=None)
    worst = q["sqnr_db"]["worst"][0]
    missed = {
        f"layer SQNR {worst['db']:.1f} dB at {worst['layer']}": {"min_sqnr": q["sqnr_db"]["min"] + 1},
        "greedy agreement": {"min_agreement": q["token_agreement"] + 0.01},
        "mean KL": {"max_kl": q["kl_mean"] / 2},
    }
    for figure, threshold in missed.items():
        with pytest.raises(TinyVError, match="quality gate failed") as info:
            check_gate(q, **{"min_sqnr": None, "min_agreement": None, "max_kl": None, **threshold})
        assert [f for f in missed if f in str(info.value)] == [figure]


def test_existing_target_and_force(tiny_paths, tmp_path, bundles):
    out = tmp_path / "b"
    shutil.copytree(bundles[(16, "fp32")][0], out)
    with pytest.raises(TinyVError, match="already exists"):
        _export(tiny_paths, out)
    m = _export(tiny_paths, out, force=True)
    assert read_manifest(out)["quantization"]["bits"] == 4 == m["quantization"]["bits"]
    assert _leftovers(tmp_path) == []
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(TinyVError, match="not a tinyv bundle"):
        _export(tiny_paths, other, force=True)
    assert (other / "cat.jpg").exists()


def test_group_size_must_divide_the_widths(tiny_paths, tmp_path):
    with pytest.raises(TinyVError, match="group-size 64"):
        _export(tiny_paths, tmp_path / "b", group_size=64)  # tiny hidden 160 = 2.5 x 64
    assert os.listdir(tmp_path) == []


def test_bad_precision_options(tiny_paths, tmp_path):
    with pytest.raises(TinyVError, match="bits"):
        _export(tiny_paths, tmp_path / "b", bits=3)
    with pytest.raises(TinyVError, match="vision"):
        _export(tiny_paths, tmp_path / "b", vision="int4")


def _args(paths):
    return ["--phi2", paths.phi2, "--vit", paths.vit, "--qformer", paths.qformer, "--stage", paths.stage, "--preset", "tiny"]


def test_cli_export_json_and_info(tiny_paths, tmp_path):
    out = tmp_path / "cli-bundle"
    r = CliRunner().invoke(cli, ["export", "--bits", "8", "-o", str(out), "--json"] + _args(tiny_paths))
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["bits"] == 8 and s["quality"]["sqnr_min_db"] > 35 and set(s["files"]) >= {"vision.onnx", LLM_FILE}
    assert "quantize: done" in r.stderr  # one line per stage when not a terminal
    assert list(s["memory"]) == STAGES and all(v["peak_mb"] > 0 for v in s["memory"].values())
    r = CliRunner().invoke(cli, ["info", str(out), "--verify"])
    assert r.exit_code == 0 and "8-bit" in r.stdout and "verified" in r.stdout
    r = CliRunner().invoke(cli, ["info", str(out), "--json"])
    assert json.loads(r.stdout)["quantization"]["bits"] == 8


def test_cli_errors_are_one_line(tiny_paths, tmp_path):
    r = CliRunner().invoke(cli, ["export", "-o", str(tmp_path / "b"), "--phi2", tiny_paths.phi2])
    assert r.exit_code == 1 and "--vit" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "none")])
    assert r.exit_code == 1 and "not found" in r.output
    r = CliRunner().invoke(cli, ["export", "--bits", "5", "-o", "x"] + _args(tiny_paths))
    assert r.exit_code == 2 and "bits" in r.output

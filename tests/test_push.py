"""tinyv push: the model card and the file list, made and checked with the upload seam replaced
(nothing here reaches the network)."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from tinyv.cli.main import cli
from tinyv.demo.builtin import DEMO_BUNDLE
from tinyv.engine.bundle import LLM_FILE, read_manifest
from tinyv.engine.config import preset
from tinyv.errors import TinyVError
from tinyv.export import publish
from tinyv.export.model_card import model_card, origin_of


@pytest.fixture
def sent(monkeypatch, tmp_path):
    """What the CLI hands to the upload seam (replaced: it records and returns a made-up URL)."""
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "tinyv-cache"))
    monkeypatch.delenv("TINYV_DEBUG", raising=False)
    plans = []

    def fake_upload(plan):
        plans.append(plan)
        return f"https://huggingface.co/{plan.repo_id}/commit/abc"

    monkeypatch.setattr(publish, "upload_to_hub", fake_upload)
    return plans


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory):
    """A real `tinyv eval --json` of the built-in bundle, on one scene."""
    r = CliRunner().invoke(cli, ["eval", "--images", "1", "--json"])
    assert r.exit_code == 0, r.output
    path = tmp_path_factory.mktemp("eval") / "results.json"
    path.write_text(r.stdout)
    return str(path)


def test_demo_bundle_card_and_files(sent, eval_json):
    r = CliRunner().invoke(cli, ["push", DEMO_BUNDLE, "owner/tinyv-demo", "--private", "--revision", "q8",
                                 "--eval", eval_json])
    assert r.exit_code == 0, r.output
    assert "pushed 5 files to owner/tinyv-demo" in r.stdout and "--bundle hf://owner/tinyv-demo@q8" in r.stdout
    (plan,) = sent
    assert (plan.repo_id, plan.revision, plan.private) == ("owner/tinyv-demo", "q8", True)
    m = read_manifest(DEMO_BUNDLE)
    assert plan.names == ["README.md", "manifest.json", *sorted(m["files"])]
    assert dict(plan.files)["README.md"] == plan.card.encode()
    for name, src in plan.files[1:]:
        assert src == os.path.join(DEMO_BUNDLE, name)

    card = ModelCard(plan.card)  # the hub's own parser reads the header
    assert card.data.library_name == "tinyv" and card.data.license == "mit"
    assert card.data.base_model is None  # trained by tinyv: no base model on the hub
    text = plan.card
    for entry in m["files"].values():
        assert entry["sha256"] in text
    for files in m["sources"].values():
        assert all(f["sha256"] in text for f in files)
    assert "8-bit, groups of 32, scheme `q8_sym`" in text
    assert f"{m['quality']['sqnr_db']['min']:.1f} / {m['quality']['sqnr_db']['mean']:.1f} dB" in text
    assert "tinyv caption photo.jpg --bundle hf://owner/tinyv-demo@q8" in text
    results = json.load(open(eval_json))["results"][0]
    assert "## Accuracy (`tinyv eval`)" in text and "1 held-out scene (seed 1), greedy" in text
    assert f"| {results['model']} | {100 * results['caption_exact']:.1f} |" in text


def test_dry_run_prints_the_card_and_sends_nothing(sent):
    r = CliRunner().invoke(cli, ["push", DEMO_BUNDLE, "hf://owner/tinyv-demo", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert sent == []
    assert r.stdout.startswith("---\n") and "library_name: tinyv" in r.stdout
    assert "README.md, manifest.json, llm.safetensors, tokenizer.json, vision.onnx" in r.stderr
    assert "## Accuracy" not in r.stdout  # only with --eval


def test_refuses_a_bundle_that_fails_verify(sent, tiny_bundle, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(tiny_bundle(4), altered)
    data = bytearray((altered / LLM_FILE).read_bytes())
    data[-7] ^= 0x5A  # same size: `tinyv info` passes it, `tinyv info --verify` does not
    (altered / LLM_FILE).write_bytes(bytes(data))
    assert CliRunner().invoke(cli, ["info", str(altered)]).exit_code == 0
    info = CliRunner().invoke(cli, ["info", str(altered), "--verify"])
    r = CliRunner().invoke(cli, ["push", str(altered), "owner/repo", "--license", "mit"])
    assert r.exit_code == 1 and "altered" in r.stderr and r.stderr == info.stderr
    assert sent == []


def test_license_of_the_source_weights(sent, tiny_bundle):
    r = CliRunner().invoke(cli, ["push", tiny_bundle(4), "owner/repo"])
    assert r.exit_code == 1 and "pass --license" in r.stderr and sent == []
    r = CliRunner().invoke(cli, ["push", tiny_bundle(4), "owner/repo", "--license", "Apache 2"])
    assert r.exit_code == 1 and "license id" in r.stderr
    r = CliRunner().invoke(cli, ["push", tiny_bundle(4), "owner/repo", "--license", "apache-2.0"])
    assert r.exit_code == 0, r.output
    assert ModelCard(sent[0].card).data.license == "apache-2.0"


@pytest.mark.parametrize("name", ["stage4", "stage3"])
def test_real_tinygptv_card_names_its_base_model_and_license(tiny_bundle, name):
    m = {**read_manifest(tiny_bundle(4)), "model": preset(name).to_dict()}
    origin = origin_of(m["model"])
    assert origin.base_model == "Tyrannosaurus/TinyGPT-V" and origin.license == "bsd-3-clause"
    card = ModelCard(model_card(m, "owner/tinygptv-q4"))
    assert card.data.base_model == "Tyrannosaurus/TinyGPT-V" and card.data.license == "bsd-3-clause"
    assert card.data.library_name == "tinyv"
    assert f"TinyGPT-V stage {m['model']['stage']}" in card.text and "microsoft/phi-2" in card.text
    assert origin_of(preset("tiny").to_dict()).license is None  # a configuration of its own: unknown


def test_bad_arguments(sent, tmp_path):
    runner = CliRunner()
    for repo in ("owner", "owner/repo@main", "owner/repo/sub"):
        r = runner.invoke(cli, ["push", DEMO_BUNDLE, repo])
        assert r.exit_code == 1 and r.stderr.startswith("Error: "), (repo, r.output)
    junk = tmp_path / "junk.json"
    junk.write_text('{"results": []}')
    r = runner.invoke(cli, ["push", DEMO_BUNDLE, "owner/repo", "--eval", str(junk)])
    assert r.exit_code == 1 and "not the output of `tinyv eval --json`" in r.stderr
    assert sent == []


def test_upload_while_offline_is_one_clear_line(monkeypatch, tmp_path):
    """The real seam, with huggingface_hub in offline mode: it refuses before any request."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    plan = publish.plan_push(DEMO_BUNDLE, "owner/tinyv-demo")
    with pytest.raises(TinyVError, match="cannot push to owner/tinyv-demo: HF_HUB_OFFLINE is set"):
        publish.upload_to_hub(plan)


def test_what_push_sends_loads_back_by_name(offline_hub, tmp_path, monkeypatch):
    """Round trip: the pushed files, cached as a download of that commit, are a hub bundle."""
    import tinyv

    def upload_into_cache(plan):
        remote = tmp_path / "remote"
        remote.mkdir()
        for name, src in plan.files:
            (remote / name).write_bytes(src if isinstance(src, bytes) else open(src, "rb").read())
        offline_hub.add(plan.repo_id, str(remote), "5" * 40, plan.revision or "main")
        return "https://huggingface.co/owner/tinyv-demo/commit/5555555"

    monkeypatch.setattr(publish, "upload_to_hub", upload_into_cache)
    r = CliRunner().invoke(cli, ["push", DEMO_BUNDLE, "owner/tinyv-demo", "--revision", "demo"])
    assert r.exit_code == 0, r.output
    with tinyv.load("hf://owner/tinyv-demo@demo", cache_dir=None) as engine:
        assert engine.manifest == read_manifest(DEMO_BUNDLE)

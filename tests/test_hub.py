"""Bundles from the Hugging Face Hub, offline: a hub cache laid out exactly as huggingface_hub
writes it (blobs, refs, snapshots/<commit> of links into blobs), HF_HUB_OFFLINE=1, no network."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import tinyv
from tinyv.cli.main import cli
from tinyv.demo.builtin import DEMO_BUNDLE
from tinyv.engine import bundle as bundle_mod
from tinyv.engine.bundle import LLM_FILE, MANIFEST, load_bundle, read_manifest
from tinyv.engine.hub import HubName, parse_hub_name
from tinyv.errors import TinyVError

REPO = "owner/tiny"
MAIN = "1" * 40  # refs/main: the tiny bundle
V1 = "2" * 40  # refs/v1: the demo bundle, so a revision visibly picks another snapshot


@pytest.fixture
def hub(offline_hub, tiny_bundle):
    """``owner/tiny`` cached: main = the shared 4-bit tiny bundle, v1 = the demo bundle."""
    offline_hub.add(REPO, tiny_bundle(4), MAIN, "main")
    offline_hub.add(REPO, DEMO_BUNDLE, V1, "v1")
    return offline_hub.cache


def snapshot(cache, commit=MAIN):
    return os.path.join(cache, "models--owner--tiny", "snapshots", commit)


def blob_of(cache, name, commit=MAIN):
    return os.path.realpath(os.path.join(snapshot(cache, commit), name))


def rewrite_manifest(cache, change, commit=MAIN):
    """Replace the snapshot's manifest link with a changed copy (a new blob, as a new download would be)."""
    path = os.path.join(snapshot(cache, commit), MANIFEST)
    with open(path) as f:
        m = json.load(f)
    change(m)
    os.unlink(path)
    with open(path, "w") as f:
        json.dump(m, f)


# -- names ------------------------------------------------------------------------------------------

def test_hub_names_and_local_paths(tmp_path, monkeypatch):
    assert parse_hub_name("hf://owner/repo") == HubName("owner/repo")
    assert parse_hub_name("hf://owner/repo@v1.0") == HubName("owner/repo", "v1.0")
    assert parse_hub_name("owner/repo@" + MAIN) == HubName("owner/repo", MAIN, bare=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "repo").mkdir(parents=True)
    assert parse_hub_name("owner/repo") is None  # an existing folder always wins over the hub
    for local in ("bundle", "./a/b", "/abs/path", "a/b/c", "../x/y"):
        assert parse_hub_name(local) is None, local
    for bad in ("hf://owner", "hf://owner/repo/file", "hf://owner/repo@", "hf://owner/repo@../x"):
        with pytest.raises(TinyVError, match="not a hub bundle name"):
            parse_hub_name(bad)


# -- loading ----------------------------------------------------------------------------------------

def test_load_by_hub_name_and_revision(hub, tiny_bundle, scene):
    local = read_manifest(tiny_bundle(4))
    for spec in ("hf://owner/tiny", "owner/tiny", f"hf://owner/tiny@{MAIN}", "hf://owner/tiny@main"):
        found = load_bundle(spec)
        assert found.commit == MAIN and found.manifest == local, spec
        assert os.path.realpath(found.folder) == os.path.realpath(snapshot(hub))
    assert load_bundle("hf://owner/tiny@v1").manifest == read_manifest(DEMO_BUNDLE)
    with tinyv.load("hf://owner/tiny", cache_dir=None) as from_hub, \
            tinyv.load(tiny_bundle(4), cache_dir=None) as from_folder:
        assert os.path.realpath(from_hub.bundle) == os.path.realpath(snapshot(hub))
        answer = [s.token for s in from_hub.stream(scene, max_new_tokens=4)]
        assert answer == [s.token for s in from_folder.stream(scene, max_new_tokens=4)]


def test_sha256_once_per_downloaded_revision(hub, monkeypatch):
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    load_bundle("hf://owner/tiny")
    assert len(hashed) == 3  # every listed file, the first time
    load_bundle("hf://owner/tiny")
    load_bundle("hf://owner/tiny@main")
    assert len(hashed) == 3  # this commit is verified: sizes only
    load_bundle("hf://owner/tiny@v1")
    assert len(hashed) == 6  # another revision is hashed on its own
    os.utime(blob_of(hub, LLM_FILE), ns=(1, 1))  # the blob was rewritten since
    load_bundle("hf://owner/tiny")
    assert len(hashed) == 9
    load_bundle("hf://owner/tiny", verify=True)  # `--verify` always hashes
    assert len(hashed) == 12


def test_corrupted_blob_is_rejected_before_anything_runs(hub):
    blob = blob_of(hub, LLM_FILE)
    data = bytearray(open(blob, "rb").read())
    data[-9] ^= 0xFF  # same size: only sha256 sees it
    with open(blob, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(TinyVError, match=f"llm.safetensors does not match its sha256.*delete {re.escape(blob)}"):
        tinyv.load("hf://owner/tiny", cache_dir=None)
    with open(blob, "wb") as f:
        f.write(bytes(data[:100]))
    with pytest.raises(TinyVError, match=f"has 100 bytes but the manifest says .*delete {re.escape(blob)}"):
        load_bundle("hf://owner/tiny")


def test_corruption_after_verification_is_caught_when_the_blob_changes(hub):
    load_bundle("hf://owner/tiny")
    blob = blob_of(hub, LLM_FILE)
    data = bytearray(open(blob, "rb").read())
    data[-9] ^= 0xFF
    with open(blob + ".incomplete", "wb") as f:  # fetched again, as huggingface_hub does: a new file renamed in
        f.write(bytes(data))
    os.replace(blob + ".incomplete", blob)
    with pytest.raises(TinyVError, match="does not match its sha256"):
        load_bundle("hf://owner/tiny")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", "sub/llm.safetensors", ".hidden", "a*b"])
def test_manifest_naming_a_file_outside_is_rejected(hub, name):
    def add(m):
        m["files"][name] = {"size": 1, "sha256": "0" * 64}

    rewrite_manifest(hub, add)
    with pytest.raises(TinyVError, match="names a file outside the bundle"):
        load_bundle("hf://owner/tiny")


def test_manifest_opening_an_unlisted_file_is_rejected(hub):
    def redirect(m):
        m["vision"]["file"] = "../../blobs/elsewhere"

    rewrite_manifest(hub, redirect)
    with pytest.raises(TinyVError, match="refers to '../../blobs/elsewhere', which it does not list"):
        tinyv.load("hf://owner/tiny", cache_dir=None)


def test_snapshot_link_escaping_the_repository_is_rejected(hub, tmp_path):
    link = os.path.join(snapshot(hub), LLM_FILE)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(link, outside)  # same bytes, same size: only where it lies is wrong
    os.unlink(link)
    os.symlink(outside, link)
    with pytest.raises(TinyVError, match="outside the bundle"):
        load_bundle("hf://owner/tiny")


def test_missing_revision_and_missing_file_say_so(hub):
    with pytest.raises(TinyVError, match=r"hf://owner/tiny@v9 is not in the Hugging Face cache and "
                                         r"HF_HUB_OFFLINE is set: fetch it once while connected"):
        load_bundle("hf://owner/tiny@v9")
    with pytest.raises(TinyVError, match="nobody/else is no local folder, and as a hub bundle hf://nobody/else"):
        load_bundle("nobody/else")
    os.unlink(os.path.join(snapshot(hub), "vision.onnx"))  # the manifest came down, this file did not
    with pytest.raises(TinyVError, match="vision.onnx of hf://owner/tiny is not in the Hugging Face cache"):
        load_bundle("hf://owner/tiny")


# -- local bundles are confined the same way -------------------------------------------------------

def test_local_bundle_links_must_stay_inside(tiny_bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(4), folder)
    os.rename(folder / LLM_FILE, folder / "weights.bin")
    os.symlink("weights.bin", folder / LLM_FILE)  # a link inside the folder is fine
    read_manifest(folder, verify=True)
    os.rename(folder / "weights.bin", tmp_path / "weights.bin")
    os.unlink(folder / LLM_FILE)
    os.symlink(tmp_path / "weights.bin", folder / LLM_FILE)
    with pytest.raises(TinyVError, match="is a link to .* outside the bundle"):
        read_manifest(folder)


# -- the command line -------------------------------------------------------------------------------

def test_cli_runs_a_hub_bundle(hub, tiny_bundle, scene_path):
    runner = CliRunner()
    args = ["caption", scene_path, "--max-new-tokens", "4", "--json"]
    r = runner.invoke(cli, args + ["--bundle", "hf://owner/tiny"])
    assert r.exit_code == 0, r.output
    local = runner.invoke(cli, args + ["--bundle", tiny_bundle(4)])
    assert json.loads(r.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    r = runner.invoke(cli, ["info", "hf://owner/tiny@v1"])
    assert r.exit_code == 0 and f"commit {V1}" in r.stdout and "84 px" in r.stdout, r.output
    r = runner.invoke(cli, ["caption", scene_path, "--bundle", "hf://owner/tiny@v9"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "not in the Hugging Face cache" in r.stderr


def test_offline_environment_in_a_fresh_process(hub):
    """The variables alone, set before huggingface_hub is imported, are what a user sets."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    out = subprocess.run([sys.executable, "-m", "tinyv.cli.main", "info", "owner/tiny", "--verify"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert f"hf://owner/tiny: commit {MAIN}" in out.stdout and "files verified (sha256)" in out.stdout


def test_vision_graph_reading_outside_the_bundle_is_rejected(offline_hub, tiny_bundle, tmp_path, scene):
    """The graph's own external-data references are confined too (ONNX Runtime checks them; with
    the hub cache's links into blobs/ a bundle's own data file must still load)."""
    import onnx
    from onnx import TensorProto

    secret = tmp_path / "secret.bin"
    folder = tmp_path / "evil"
    shutil.copytree(tiny_bundle(4), folder)
    graph = onnx.load(str(folder / "vision.onnx"))
    weight = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    secret.write_bytes(weight.raw_data)  # right size and type: only where it is read from is wrong
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(secret)), ("offset", "0"), ("length", str(secret.stat().st_size))):
        weight.external_data.add(key=key, value=value)
    onnx.save(graph, str(folder / "vision.onnx"))
    m = json.loads((folder / MANIFEST).read_text())
    m["files"]["vision.onnx"] = bundle_mod.file_entry(str(folder), "vision.onnx")
    (folder / MANIFEST).write_text(json.dumps(m))
    offline_hub.add(REPO, str(folder), "3" * 40, "evil")
    with tinyv.load("hf://owner/tiny@evil", cache_dir=None) as engine:
        # refused by tinyv's own check (C trunk) or by ONNX Runtime's (the whole graph in it)
        with pytest.raises(TinyVError, match="cannot open the vision graph .*(External data path|escapes)"
                                             "|points outside the bundle's data file"):
            engine.caption(scene, max_new_tokens=2)


def test_vision_graph_with_a_data_file_loads_from_the_hub_cache(offline_hub, tiny_bundle, tmp_path, scene):
    """A full-size vision graph keeps its weights in a data file next to it: in the hub cache both
    are links into blobs/, and the graph must still find its data (ONNX Runtime 1.24.1 refused)."""
    import onnx

    folder = tmp_path / "external"
    shutil.copytree(tiny_bundle(4), folder)
    graph = onnx.load(str(folder / "vision.onnx"))
    onnx.save(graph, str(folder / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data",
              size_threshold=0)
    m = json.loads((folder / MANIFEST).read_text())
    m["vision"]["data_file"] = "vision.onnx.data"
    for name in ("vision.onnx", "vision.onnx.data"):
        m["files"][name] = bundle_mod.file_entry(str(folder), name)
    (folder / MANIFEST).write_text(json.dumps(m))
    offline_hub.add(REPO, str(folder), "4" * 40, "external")
    with tinyv.load("hf://owner/tiny@external", cache_dir=None) as from_hub, \
            tinyv.load(tiny_bundle(4), cache_dir=None) as from_folder:
        assert from_hub.manifest["vision"]["data_file"] == "vision.onnx.data"
        answer = [s.token for s in from_hub.stream(scene, max_new_tokens=3)]
        assert answer == [s.token for s in from_folder.stream(scene, max_new_tokens=3)]

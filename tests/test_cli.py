"""The tinyv command through click's CliRunner, with an isolated cache."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tinyv.cli.main import cli


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYV_DEBUG", raising=False)
    return CliRunner()


def _ckpt_args(paths):
    return ["--phi2", paths.phi2, "--vit", paths.vit, "--qformer", paths.qformer, "--stage", paths.stage, "--preset", "tiny"]


def test_default_model_is_the_announced_demo_and_writes_no_model(runner, scene_path, tmp_path):
    r = runner.invoke(cli, ["caption", scene_path, "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "built-in demo model" in r.stderr
    cache = tmp_path / "cache"
    assert not cache.exists() or all(n == "embeddings" for n in os.listdir(cache))  # image cache only
    r2 = runner.invoke(cli, ["caption", scene_path, "--max-new-tokens", "4"])
    assert r2.exit_code == 0 and r2.stdout == r.stdout


def test_one_image_is_answered_by_a_one_shot_engine(runner, scene_path, tiny_bundle, monkeypatch):
    """One image: vision graph and language model resident in turn (Engine.load one_shot); several
    images share one engine that keeps both; the answers are the same."""
    import tinyv

    asked, real = [], tinyv.load
    monkeypatch.setattr(tinyv, "load", lambda *a, **kw: asked.append(kw.get("one_shot")) or real(*a, **kw))
    args = ["--bundle", tiny_bundle(4, "int8"), "--json", "--max-new-tokens", "5"]
    one = runner.invoke(cli, ["caption", scene_path] + args)
    two = runner.invoke(cli, ["caption", scene_path, scene_path] + args)
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert asked == [True, False]
    tokens = [json.loads(line)["tokens"] for line in (one.stdout + two.stdout).splitlines()]
    assert len(tokens) == 3 and tokens[0] == tokens[1] == tokens[2]


def test_json_output_matches_the_library(runner, scene_path, tiny_paths, tiny_model):
    r = runner.invoke(cli, ["caption", scene_path, "--json", "--max-new-tokens", "6"] + _ckpt_args(tiny_paths))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    reference = list(tiny_model.stream(scene_path, max_new_tokens=6))
    assert out["tokens"] == [s.token for s in reference]
    assert out["finish_reason"] == reference[-1].finish_reason
    assert {"image_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"} <= set(out["timings"])
    assert r.stderr == ""  # named checkpoints: no default-model note


def test_question_and_raw_prompt_change_the_answer(runner, scene_path, tiny_paths, tiny_model):
    base = ["caption", scene_path, "--json", "--max-new-tokens", "3"] + _ckpt_args(tiny_paths)
    q = json.loads(runner.invoke(cli, base + ["--question", "how many shapes?"]).stdout)
    assert q["tokens"] == tiny_model.generate(scene_path, None, max_new_tokens=3, question="how many shapes?")
    raw = "###Human: <Img><ImageHere></Img> hi###Assistant: "
    p = json.loads(runner.invoke(cli, base + ["--prompt", raw]).stdout)
    assert p["tokens"] == tiny_model.generate(scene_path, raw, max_new_tokens=3)


def test_sampling_options_are_seeded(runner, scene_path, tiny_paths):
    args = ["caption", scene_path, "--json", "--sample", "--temperature", "1.3", "--seed", "7",
            "--max-new-tokens", "5"] + _ckpt_args(tiny_paths)
    a, b = runner.invoke(cli, args), runner.invoke(cli, args)
    assert a.exit_code == 0 and json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_streams_plain_text(runner, scene_path, tiny_paths):
    r = runner.invoke(cli, ["caption", scene_path, "--max-new-tokens", "5"] + _ckpt_args(tiny_paths))
    assert r.exit_code == 0 and r.stdout.endswith("\n") and not r.stdout.startswith(" ")


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, r.output


def test_missing_image(runner):
    _one_line_error(runner.invoke(cli, ["caption", "/no/such/photo.jpg"]), "does not exist")


def test_not_an_image(runner, tmp_path, tiny_paths):
    bad = tmp_path / "notes.jpg"
    bad.write_text("hello")
    r = runner.invoke(cli, ["caption", str(bad)] + _ckpt_args(tiny_paths))
    _one_line_error(r, "cannot read", "notes.jpg")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1


def test_some_checkpoint_options_missing(runner, scene_path, tiny_paths):
    r = runner.invoke(cli, ["caption", scene_path, "--phi2", tiny_paths.phi2])
    _one_line_error(r, "--vit", "--qformer", "--stage")


def test_wrong_file_for_option(runner, scene_path, tiny_paths):
    args = _ckpt_args(tiny_paths)
    args[args.index("--vit") + 1] = tiny_paths.qformer
    _one_line_error(runner.invoke(cli, ["caption", scene_path] + args), "--vit", "Q-Former")


def test_nonexistent_checkpoint(runner, scene_path, tiny_paths):
    args = _ckpt_args(tiny_paths)
    args[args.index("--stage") + 1] = "/nowhere/stage4.pth"
    _one_line_error(runner.invoke(cli, ["caption", scene_path] + args), "/nowhere/stage4.pth", "does not exist")


def test_bad_option_values(runner, scene_path):
    _one_line_error(runner.invoke(cli, ["caption", scene_path, "--top-p", "0"]), "top-p")
    _one_line_error(runner.invoke(cli, ["caption", scene_path, "--max-new-tokens", "0"]), "max-new-tokens")


def test_debug_env_shows_the_exception(runner, scene_path, tiny_paths, monkeypatch):
    from tinyv import TinyVError

    monkeypatch.setenv("TINYV_DEBUG", "1")
    r = runner.invoke(cli, ["caption", scene_path, "--phi2", tiny_paths.phi2])
    assert isinstance(r.exception, TinyVError)


def test_help_is_lean():
    code = "import sys; from tinyv.cli.main import cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "caption" in r.output

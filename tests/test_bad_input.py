"""Bad input as a hostile new user gives it (issue 16): each case one clear line, nothing lost.

Through the command line where the user meets it (click's CliRunner, or a real process where a
signal, a pipe or /dev/full is part of the case), on the built-in demo model unless said.
"""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tinyv
from tinyv import TinyVError
from tinyv.cli.main import cli
from tinyv.demo.builtin import DEMO_BUNDLE
from tinyv.engine import image as image_mod
from tinyv.engine.cache import EmbeddingCache, default_cache_folder, image_key
from tinyv.engine.image import MEAN, STD, open_image, preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = "6"  # new tokens per answer: enough to tell answers apart
LIMIT_ENV = "TINYV_MAX_IMAGE_PIXELS"


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYV_DEBUG", raising=False)
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the CLI lifts Pillow's own limit
    return CliRunner()


@pytest.fixture(scope="module")
def demo():
    """The built-in model with no disk cache: the answers the CLI must give."""
    return tinyv.load(cache_dir=None)


@pytest.fixture(scope="module")
def other_path(other_image, tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "triangle.png"
    other_image.save(path)
    return str(path)


def _tokens(engine, image, question=None, **kw):
    return [s.token for s in engine.stream(image, question, max_new_tokens=int(TOKENS), **kw)]


def _json_lines(r):
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


def _one_line_error(r, *needles, code=1):
    """Exit ``code``, no exception escaped (CliRunner hides tracebacks: check the exception), and
    exactly one ``Error:`` line on stderr holding the needles."""
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _png_header(width, height):
    """A PNG that declares width x height (8-bit grey) and holds almost no data: a decompression
    bomb's header, made without the memory a real one would take."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- 1. the image cache poisoned across bundles ----------------------------------------------------

def _alter_vision_same_size(bundle):
    """Scale the vision graph's largest weight by -3, in place, keeping the file's size (the
    manifest's sizes still match, its sha256 no longer does)."""
    import onnx
    from onnx import numpy_helper

    path = os.path.join(bundle, "vision.onnx")
    size = os.path.getsize(path)
    model = onnx.load(path)
    weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: numpy_helper.to_array(t).size)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * -3, weight.name))
    onnx.save(model, path)
    assert os.path.getsize(path) == size


def test_1_an_altered_bundle_does_not_poison_the_genuine_ones_cache(runner, demo, scene_path, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(DEMO_BUNDLE, altered)
    _alter_vision_same_size(altered)
    args = ["caption", scene_path, "--json", "--max-new-tokens", TOKENS]
    r = runner.invoke(cli, args + ["--bundle", str(altered)])
    assert r.exit_code == 0, r.output
    genuine = _tokens(demo, scene_path)
    assert _json_lines(r)[0]["tokens"] != genuine  # the alteration changes what is seen
    r = runner.invoke(cli, args)  # the built-in model, same cache folder
    assert r.exit_code == 0, r.output
    assert _json_lines(r)[0]["tokens"] == genuine


def test_1_file_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    from tinyv.engine import file_identity

    stamps = str(tmp_path / "stamps")
    f = tmp_path / "vision.onnx"
    f.write_bytes(b"a" * 4096)
    real = hashlib.sha256(b"a" * 4096).hexdigest()
    assert file_identity.file_sha256(str(f), stamps) == real
    assert not os.path.exists(stamps)  # just written: a same-tick rewrite could hide, so no stamp yet
    later = file_identity.time.time_ns() + 10 * file_identity.SETTLE_NS
    monkeypatch.setattr(file_identity.time, "time_ns", lambda: later)
    assert file_identity.file_sha256(str(f), stamps) == real
    (stamp,) = [os.path.join(stamps, n) for n in os.listdir(stamps)]
    data = json.loads(open(stamp).read())

    def stamp_with(**changes):
        with open(stamp, "w") as out:
            json.dump({**data, **changes}, out)

    stamp_with(sha256="0" * 64)  # a matching stamp is believed: the file is not read again
    assert file_identity.file_sha256(str(f), stamps) == "0" * 64
    for field in ("ctime_ns", "mtime_ns", "ino", "size"):  # any difference: hashed again
        stamp_with(sha256="0" * 64, **{field: data[field] - 1})
        assert file_identity.file_sha256(str(f), stamps) == real
    stamp_with(sha256="0" * 64)
    st = os.stat(f)
    tmp = tmp_path / "new"
    tmp.write_bytes(b"b" * 4096)  # same size and mtime, another file (a new inode)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, f)
    assert file_identity.file_sha256(str(f), stamps) == hashlib.sha256(b"b" * 4096).hexdigest()


# -- 2. decompression bombs ---------------------------------------------------------------------

def test_2_a_bomb_in_a_batch_is_one_error_and_the_rest_are_answered(runner, demo, scene_path, other_path, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))
    r = runner.invoke(cli, ["caption", scene_path, str(bomb), other_path, "--json", "--max-new-tokens", TOKENS])
    _one_line_error(r, "1 of 3 images failed")
    recs = _json_lines(r)
    assert [x["image"] for x in recs] == [scene_path, str(bomb), other_path]
    assert recs[0]["tokens"] == _tokens(demo, scene_path) and recs[2]["tokens"] == _tokens(demo, other_path)
    assert "20000x20000 = 400,000,000 pixels" in recs[1]["error"] and "TINYV_MAX_IMAGE_PIXELS=400000000" in recs[1]["error"]
    assert [line for line in r.stderr.splitlines() if "bomb.png: error:" in line] == [
        f"{bomb}: error: {recs[1]['error']}"]
    r = runner.invoke(cli, ["ask", scene_path, str(bomb), "what colour is the square?", "--max-new-tokens", TOKENS])
    _one_line_error(r, "1 of 2 images failed")
    assert r.stdout.startswith(f"{scene_path}: ")
    _one_line_error(runner.invoke(cli, ["bench", "--image", str(bomb), "--runs", "1", "--pp", "8", "--tg", "2"]),
                    "over the limit")
    with pytest.raises(TinyVError, match="over the limit of 178,956,970"):
        demo.caption(bomb.read_bytes())


def test_2_the_pixel_limit_can_be_lowered_and_must_be_a_number(runner, scene_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1000")
    _one_line_error(runner.invoke(cli, ["caption", scene_path]), "160x120", f"{LIMIT_ENV}=19200")
    monkeypatch.setenv(LIMIT_ENV, "lots")
    _one_line_error(runner.invoke(cli, ["caption", scene_path]), "must be a whole number")


def test_2_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    Image.radial_gradient("L").resize((2000, 1600)).convert("RGB").save(path, quality=95)
    full = preprocess(str(path), 56)  # under the threshold: decoded whole
    monkeypatch.setattr(image_mod, "DRAFT_OVER_PIXELS", 1_000_000)
    assert open_image(str(path), draft_to=56).size == (500, 400)  # 1/4 scale (1/8 would be under 4 x 56)
    reduced = preprocess(str(path), 56)
    assert (reduced - full).abs().max() < 0.05  # a grey level or two, in normalized units


# -- 3. text that is not UTF-8 ---------------------------------------------------------------------

BAD_QUESTION = "how many \udcff shapes?"  # what Python makes of the argument $'how many \xff shapes?'


def test_3_non_utf8_questions_and_prompts_are_one_line(runner, demo, scene_path):
    _one_line_error(runner.invoke(cli, ["ask", scene_path, BAD_QUESTION]), "not valid UTF-8", "byte 0xff")
    _one_line_error(runner.invoke(cli, ["caption", scene_path, "-q", BAD_QUESTION]), "byte 0xff")
    _one_line_error(runner.invoke(cli, ["caption", scene_path, "--prompt", "<ImageHere> \udcfe"]), "the prompt",
                    "byte 0xfe")
    for question in ("\ud800 lone surrogate", BAD_QUESTION):
        with pytest.raises(TinyVError, match="not valid UTF-8"):
            demo.caption(scene_path, question=question)
    with pytest.raises(TinyVError, match="not valid UTF-8"):
        demo.ask(scene_path, BAD_QUESTION)
    assert _tokens(demo, scene_path)  # still serving


# -- 4. 16-bit and float images ------------------------------------------------------------------

def _eight_bit(x):
    """preprocess's output back to 8-bit values [H, W, 3]."""
    rgb = x[0].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
    return np.rint(rgb * 255).astype(int)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [0, 257, 32768, 65535], [0, 1, 128, 255]),
    ("F", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),
    ("I", [0, 1000, 40000, 65535], [0, 4, 156, 255]),
    ("I", [-5, 0, 5, 10], [0, 85, 170, 255]),  # no known range: min to max
])
def test_4_wide_images_are_scaled_to_8_bits(mode, values, expected, tmp_path):
    img = Image.fromarray(np.array([values] * 4, dtype={"I;16": np.uint16, "F": np.float32, "I": np.int32}[mode]))
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tif")
    img.save(path)
    assert Image.open(path).mode == mode
    got = _eight_bit(preprocess(str(path), 4))  # 4 x 4: no resampling
    assert (got[0, :, 0] == expected).all() and (got[..., 0] == got[..., 2]).all()


def test_4_a_16bit_png_is_seen_as_its_8bit_picture(runner, scene, tmp_path):
    grey = np.asarray(scene.convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    r = runner.invoke(cli, ["caption", str(tmp_path / "grey8.png"), str(tmp_path / "grey16.png"), "--json",
                            "--max-new-tokens", TOKENS])
    assert r.exit_code == 0, r.output
    eight, sixteen = _json_lines(r)
    assert sixteen["tokens"] == eight["tokens"]


# -- 5. export -o under a file, or onto one ------------------------------------------------------

def test_5_export_to_a_file_or_under_one(runner, tiny_paths, tmp_path):
    args = ["--phi2", tiny_paths.phi2, "--vit", tiny_paths.vit, "--qformer", tiny_paths.qformer,
            "--stage", tiny_paths.stage, "--preset", "tiny"]
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    _one_line_error(runner.invoke(cli, ["export", "-o", str(f / "bundle")] + args), "is a file, not a folder")
    for force in ([], ["--force"]):
        _one_line_error(runner.invoke(cli, ["export", "-o", str(f)] + force + args), "is a file", "will not replace")
    assert f.read_text() == "keep me" and os.listdir(tmp_path) == ["notes.txt"]


# -- 6. an unusable cache folder ----------------------------------------------------------------

def test_6_an_unusable_cache_folder_is_said_once_and_embeddings_stay_in_memory(runner, demo, scene_path, tmp_path,
                                                                              monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("TINYV_CACHE", str(blocker / "cache"))
    r = runner.invoke(cli, ["caption", scene_path, scene_path, "--json", "--max-new-tokens", TOKENS])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if "cannot be used" in line]
    assert len(notes) == 1 and "is a file" in notes[0] and "memory only" in notes[0]
    recs = _json_lines(r)
    assert recs[0]["tokens"] == recs[1]["tokens"] == _tokens(demo, scene_path)
    assert recs[1]["timings"]["image_cached"] is True  # the memory cache still works
    _one_line_error(runner.invoke(cli, ["cache", "info"]), "cannot be used", "TINYV_CACHE")
    _one_line_error(runner.invoke(cli, ["cache", "clear"]), "cannot be used")
    reports = []
    EmbeddingCache(str(blocker / "c"), report=reports.append).put("k" * 64, torch.zeros(2))
    assert len(reports) == 1


# -- 7 and 11. signals: SIGTERM cleans up as Ctrl-C does; what SIGKILL leaves is removed next time -

def _blocked_export(tiny_paths, tmp_path, name):
    """A real `tinyv export` that stops, staging folder made, reading --phi2's config.json (a FIFO);
    returns the process once it is there."""
    phi2 = tmp_path / f"phi2-{name}"
    shutil.copytree(tiny_paths.phi2, phi2)
    os.remove(phi2 / "config.json")
    os.mkfifo(phi2 / "config.json")
    env = {**os.environ, "TINYV_CACHE": str(tmp_path / "cache")}
    env.pop("TINYV_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyv.cli.main", "export", "-o", str(tmp_path / "out" / name), "--preset", "tiny",
         "--phi2", str(phi2), "--vit", tiny_paths.vit, "--qformer", tiny_paths.qformer, "--stage", tiny_paths.stage],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def unblock_if_it_dies():  # should the export fail before reading the FIFO, do not hang here
        proc.wait()
        try:
            os.close(os.open(phi2 / "config.json", os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock_if_it_dies, daemon=True).start()
    writer = os.open(phi2 / "config.json", os.O_WRONLY)  # returns once the export opens it to read
    assert proc.poll() is None, proc.communicate()
    return proc, writer


def _work_folders(tmp_path):
    out = tmp_path / "out"
    return sorted(n for n in os.listdir(out) if n.startswith((".tinyv-export-", ".vision-export-"))) if out.exists() else []


def test_7_11_signals_clean_up_and_stale_work_folders_go(tiny_paths, tmp_path):
    killed, writer = _blocked_export(tiny_paths, tmp_path, "killed")
    (left,) = _work_folders(tmp_path)
    killed.kill()  # SIGKILL: nothing can clean up
    killed.communicate()
    os.close(writer)
    assert _work_folders(tmp_path) == [left]
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        proc, writer = _blocked_export(tiny_paths, tmp_path, word)
        (mine,) = _work_folders(tmp_path)  # the dead export's folder went when this one started
        assert mine != left
        proc.send_signal(sig)
        _, err = proc.communicate()
        os.close(writer)
        assert proc.returncode == code, err
        assert err.strip().splitlines()[-1] == f"tinyv: {word}" and "Traceback" not in err
        assert _work_folders(tmp_path) == [] and not (tmp_path / "out" / word).exists()


def test_7_only_work_folders_of_dead_exports_on_this_host_are_removed(tmp_path):
    from tinyv.export.staging import _host_tag, remove_stale

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # its pid is now free
    host = _host_tag()
    names = {f".vision-export-{host}-{done.pid}-a1": False, f".tinyv-export-{host}-{done.pid}-b2": False,
             f".vision-export-{host}-{os.getpid()}-c3": True,  # alive: this process
             f".tinyv-export-00000000-{done.pid}-d4": True,  # another host's
             ".tinyv-export-e5": True, "bundle": True}  # no owner in the name (older tinyv); not ours
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "vision.onnx").write_bytes(b"partial")
    assert sorted(remove_stale(str(tmp_path))) == sorted(n for n, kept in names.items() if not kept)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)


def test_11_ctrl_c_in_any_command_exits_130(runner, scene_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinyv, "load", interrupted)
    r = runner.invoke(cli, ["caption", scene_path])
    assert r.exit_code == 130 and "tinyv: interrupted" in r.stderr


# -- 8. chat goes on past a bad question ----------------------------------------------------------

def test_8_chat_reports_a_bad_question_and_reads_the_next(runner, demo, scene_path):
    long_question = "square " * 400  # over the demo model's 256-token context
    stdin = f"{long_question}\n".encode() + b"how many \xff shapes?\n" + b"what colour is the square?\n"
    r = runner.invoke(cli, ["chat", scene_path, "--json", "--max-new-tokens", TOKENS], input=stdin)
    _one_line_error(r, "2 of 3 questions failed")
    recs = _json_lines(r)
    assert "context" in recs[0]["error"] and "byte 0xff" in recs[1]["error"]
    assert recs[2]["tokens"] == _tokens(demo, scene_path, "what colour is the square?")
    assert len([line for line in r.stderr.splitlines() if line.startswith("error: ")]) == 2


# -- 9. a well-formed cache entry of the wrong shape --------------------------------------------

def test_9_a_cache_entry_of_the_wrong_shape_is_recomputed(runner, demo, scene_path, other_path):
    folder = default_cache_folder()  # the runner's TINYV_CACHE
    engine = tinyv.load(cache_dir=folder)
    EmbeddingCache(folder).put(image_key(scene_path, engine.vision_id), torch.zeros(1, 3, 7))
    r = runner.invoke(cli, ["caption", scene_path, other_path, "--json", "--max-new-tokens", TOKENS])
    assert r.exit_code == 0, r.output
    assert [x["tokens"] for x in _json_lines(r)] == [_tokens(demo, scene_path), _tokens(demo, other_path)]


# -- 10. output that cannot be written -----------------------------------------------------------

def test_10_output_to_dev_full_is_one_line(scene_path, tmp_path):
    env = {**os.environ, "TINYV_CACHE": str(tmp_path / "cache")}
    env.pop("TINYV_DEBUG", None)
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "tinyv.cli.main", "caption", scene_path, "--max-new-tokens", TOKENS],
                           env=env, stdout=full, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "Exception" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "Error: cannot write the output (No space left on device)"


# -- 11. API misuse and a checkpoint of another size ---------------------------------------------

def test_11_option_types_are_checked(demo, scene):
    for bad, needle in [({"max_new_tokens": "5"}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
                        ({"temperature": float("nan"), "greedy": False}, "temperature"),
                        ({"top_p": "0.9"}, "top_p"), ({"greedy": "no"}, "greedy"), ({"seed": 1.5}, "seed"),
                        ({"max_new_token": 5}, "unknown option max_new_token")]:
        with pytest.raises(TinyVError, match=needle):
            demo.caption(scene, **bad)
    for question in (5, b"what?", ["what?"]):
        with pytest.raises(TinyVError, match="must be text"):
            demo.caption(scene, question=question)
    with pytest.raises(TinyVError, match="<ImageHere>"):
        demo.ask(scene, "what is <ImageHere>?")
    assert demo.caption(scene, max_new_tokens=3)  # still serving


def test_11_a_lora_rank_mismatch_hints_at_preset(runner, tiny_paths, tmp_path):
    r = runner.invoke(cli, ["export", "-o", str(tmp_path / "b"), "--phi2", tiny_paths.phi2, "--vit", tiny_paths.vit,
                            "--qformer", tiny_paths.qformer, "--stage", tiny_paths.stage])
    _one_line_error(r, "LoRA has rank 8, expected 64", "--preset", "tiny")


# -- the image from stdin --------------------------------------------------------------------------

def test_stdin_image(runner, demo, scene_path):
    data = open(scene_path, "rb").read()
    r = runner.invoke(cli, ["caption", "-", "--json", "--max-new-tokens", TOKENS], input=data)
    assert r.exit_code == 0, r.output
    (rec,) = _json_lines(r)
    assert rec["image"] == "-" and rec["tokens"] == _tokens(demo, scene_path)
    r = runner.invoke(cli, ["ask", "-", "what colour is the square?", "--max-new-tokens", TOKENS], input=data)
    assert r.exit_code == 0 and r.stdout.strip()
    _one_line_error(runner.invoke(cli, ["caption", "-"], input=b""), "stdin is empty")
    _one_line_error(runner.invoke(cli, ["caption", "-", "-"], input=data), "only once")
    _one_line_error(runner.invoke(cli, ["caption", "-"], input=b"not an image"), "cannot read")
    _one_line_error(runner.invoke(cli, ["chat", "-"], input=data), "must be a file")


def test_error_lines_escape_what_would_break_them(runner, tmp_path):
    odd = tmp_path / "two\nlines.png"
    odd.write_bytes(b"not an image")
    line = _one_line_error(runner.invoke(cli, ["caption", str(odd)]), "two\\nlines.png")
    assert "\n" not in line

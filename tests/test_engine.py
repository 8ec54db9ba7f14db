"""The bundle engine (tinyv.Engine): parity with the fp32 model, sessions, the image cache,
cancellation, threads, errors, the default model, bench and the run commands.

Run with ``-s`` to see the measured fp32-vs-bundle figures.
"""
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import tinyv
from click.testing import CliRunner
from conftest import HANG_GUARD_S
from PIL import Image, ImageDraw

import tinyv.engine.generate as generate_mod
from tinyv import TinyVError
from tinyv.cli.main import cli
from tinyv.engine.bundle import LLM_FILE
from tinyv.engine.cache import image_key
from tinyv.demo.builtin import DEMO_BUNDLE
from tinyv.engine.engine import Engine
from tinyv.engine.generate import prefill
from tinyv.engine.generate import build_prompt_embeds
from tinyv.engine.prompts import build_prompt

N = 24  # new tokens for the parity checks
VQA_Q = "what colour is the circle?"


# -- fixtures ------------------------------------------------------------------------------------

# every test: an isolated TINYV_CACHE, and one torch thread (fixtures in conftest.py)
pytestmark = pytest.mark.usefixtures("isolated_cache", "one_torch_thread")


@pytest.fixture(scope="module")
def b16(tiny_bundle):
    return tiny_bundle(16)


@pytest.fixture(scope="module")
def b8(tiny_bundle):
    return tiny_bundle(8)


@pytest.fixture(scope="module")
def b4(tiny_bundle):
    return tiny_bundle(4)


@pytest.fixture(scope="module")
def e16(b16):
    return Engine.load(b16, cache_dir=None)


@pytest.fixture(scope="module")
def e4(b4):
    return Engine.load(b4, cache_dir=None)


@pytest.fixture(scope="module")
def other_path(other_image, tmp_path_factory):
    path = tmp_path_factory.mktemp("img2") / "triangle.png"
    other_image.save(path)
    return str(path)


def _tokens(steps):
    return [s.token for s in steps]


def _run(engine, image, question=None, **kw):
    steps = list(engine.stream(image, question, **kw))
    return _tokens(steps), "".join(s.text for s in steps), steps[-1]


# -- parity with the fp32 torch model ------------------------------------------------------------

def test_16bit_bundle_greedy_tokens_identical_to_fp32_model(e16, tiny_model, scene, scene_embeds):
    ref = tiny_model.generate(scene_embeds, build_prompt(4), max_new_tokens=N)
    got, _, last = _run(e16, scene, max_new_tokens=N)
    assert got == ref
    assert last.finish_reason == list(tiny_model.stream(scene_embeds, max_new_tokens=N))[-1].finish_reason
    ref_vqa = tiny_model.generate(scene_embeds, build_prompt(4, VQA_Q, task="vqa"), max_new_tokens=N)
    got_vqa, _, last_vqa = _run(e16, scene, VQA_Q, task="vqa", max_new_tokens=N)
    assert got_vqa == ref_vqa
    # the question reached the model: the prompt is the VQA template's, token for token
    vqa_len = tiny_model.prompt_embeds(build_prompt(4, VQA_Q, task="vqa"), scene_embeds).shape[1]
    assert last_vqa.timings["prompt_tokens"] == vqa_len > last.timings["prompt_tokens"]
    # a free question goes into the chat template like the model's build_prompt(4, q)
    q = "how many shapes are there?"
    assert _run(e16, scene, q, max_new_tokens=8)[0] == tiny_model.generate(scene_embeds, build_prompt(4, q), max_new_tokens=8)
    raw = "###Human: <Img><ImageHere></Img> hi###Assistant: "  # a raw template is used as given
    assert _run(e16, scene, prompt=raw, max_new_tokens=8)[0] == tiny_model.generate(scene_embeds, raw, max_new_tokens=8)


def _greedy_ref(tiny_model, image, prompt, steps):
    """fp32 greedy continuation (eos ignored) and its next-token logits [steps, V]."""
    phi = tiny_model.phi
    with torch.inference_mode():
        x = tiny_model.prompt_embeds(prompt, tiny_model.encode_image(image))
        cache = phi.new_cache(x.shape[1] + steps)
        logits = [prefill(phi, x, cache, 0)]
        tokens = []
        for s in range(steps):
            tokens.append(int(torch.argmax(logits[-1])))
            if s < steps - 1:
                logits.append(phi.logits(phi(phi.embed(torch.tensor([[tokens[-1]]])), x.shape[1] + s, cache)[0, -1]))
    return tokens, torch.stack(logits).float()


def _teacher_forced(engine, image, prompt, tokens):
    """The engine's logits [steps, V] on the prompt plus the fp32 tokens, through its own parts."""
    with torch.inference_mode():
        img, _ = engine.encode_image(image, use_cache=False)
        x = build_prompt_embeds(engine.phi, engine.tokenizer, prompt, img)
        L = x.shape[1]
        seq = torch.cat([x, engine.phi.embed(torch.tensor([tokens[:-1]]))], dim=1)
        return engine.phi.logits(engine.phi(seq)[0, L - 1:]).float(), img


def _compare(engine, tiny_model, image, prompt, steps=16):
    tokens, ref_logits = _greedy_ref(tiny_model, image, prompt, steps)
    q_logits, img = _teacher_forced(engine, image, prompt, tokens)
    r, q = ref_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (r.exp() * (r - q)).sum(-1)
    agree = (q.argmax(-1) == torch.tensor(tokens)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(img.flatten(1), tiny_model.encode_image(image).flatten(1)).item()
    return {"kl_first": kl[0].item(), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "agreement": agree,
            "vision_cos": cos, "first_token": tokens[0], "q_first": int(q_logits[0].argmax())}


# Bounds for the tiny random model (hidden 160, groups of 32), whose 4-bit error is large; measured
# (run with -s): 16-bit KL ~1e-6, 8-bit KL mean ~1e-3 (agreement 100%), 4-bit KL mean ~0.3, max
# ~0.85 (agreement ~80%), in line with the quality figures export writes into the manifest.
KL_BOUND = {16: (1e-4, 1e-4), 8: (0.01, 0.05), 4: (0.6, 2.0)}  # (mean, max)
AGREE_BOUND = {16: 1.0, 8: 0.875, 4: 0.6}


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_quantized_bundle_next_token_kl_and_agreement(bits, b16, b8, b4, tiny_model, scene):
    engine = Engine.load({16: b16, 8: b8, 4: b4}[bits], cache_dir=None)
    figures = []
    for prompt in (build_prompt(4), build_prompt(4, VQA_Q, task="vqa")):
        f = _compare(engine, tiny_model, scene, prompt)
        figures.append(f)
        print(f"\n[fp32 vs {bits}-bit bundle] {prompt[-40:]!r}: KL first {f['kl_first']:.3g}, mean {f['kl_mean']:.3g}, "
              f"max {f['kl_max']:.3g}; greedy agreement {f['agreement']:.0%} over 16 teacher-forced tokens; "
              f"vision cosine {f['vision_cos']:.7f}")
        assert f["vision_cos"] > 0.99999
        assert f["kl_mean"] <= KL_BOUND[bits][0] and f["kl_max"] <= KL_BOUND[bits][1]
        assert f["agreement"] >= AGREE_BOUND[bits]
    # the engine's own streaming path picks the argmax of the first-step logits computed above
    first = _run(engine, scene, max_new_tokens=1)[0][0]
    assert first == figures[0]["q_first"]
    if bits == 16:
        assert first == figures[0]["first_token"]


# -- sessions ------------------------------------------------------------------------------------

def test_session_reuse_equals_fresh_runs(b16, scene):
    e16 = Engine.load(b16, cache_dir=None, prefix_cache_bytes=0)  # the session alone keeps the prefix
    q1, q2 = "what is on the left?", "how many shapes are there?"
    fresh = {q: _run(e16, scene, q, max_new_tokens=10)[:2] for q in (q1, q2)}
    s = e16.session(scene)
    seen = []
    for q in (q1, q2, q1):
        steps = list(s.stream(q, max_new_tokens=10))
        assert (_tokens(steps), "".join(x.text for x in steps)) == fresh[q]
        seen.append(steps[-1].timings)
    t1, t2, t3 = seen
    assert t1["prefix_reused"] is False and t1["prefilled_tokens"] == t1["prompt_tokens"]
    own = len(e16.tokenizer.encode(e16.prompt_format.split(q2)[1]))
    assert t2["prefix_reused"] is True and t2["prefilled_tokens"] == own
    assert t2["prompt_tokens"] == t2["prefix_tokens"] + own == t1["prefix_tokens"] + own
    assert t2["image_ms"] == 0 and t3["image_ms"] == 0 and t3["prefix_reused"] is True
    assert t3["prefilled_tokens"] == len(e16.tokenizer.encode(e16.prompt_format.split(q1)[1]))
    # vqa questions and captions through the same session, too
    assert s.ask(VQA_Q, max_new_tokens=6) == e16.ask(scene, VQA_Q, max_new_tokens=6)
    assert s.caption(max_new_tokens=6) == e16.caption(scene, max_new_tokens=6)


def test_interleaved_streams_on_one_session(e16, scene):
    """Two streams open at once in one thread, on separate sessions and on one session (which
    shares one KV cache): the engine's worker runs them one after the other, so both answers are
    exactly the fresh ones — never one continued over a cache the other truncated."""
    q1, q2 = "what is on the left?", "how many shapes are there?"
    fresh1 = _run(e16, scene, q1, max_new_tokens=10)[0]
    fresh2 = _run(e16, scene, q2, max_new_tokens=10)[0]
    g1, g2 = e16.stream(scene, q1, max_new_tokens=10), e16.stream(scene, q2, max_new_tokens=10)
    a, b = [next(g1).token, next(g1).token], [x.token for x in g2]
    a += _tokens(g1)
    assert (a, b) == (fresh1, fresh2)
    s = e16.session(scene)
    g1 = s.stream(q1, max_new_tokens=10)
    a = [next(g1).token, next(g1).token]
    b = _tokens(s.stream(q2, max_new_tokens=10))
    a += _tokens(g1)
    assert (a, b) == (fresh1, fresh2)


# -- image cache ---------------------------------------------------------------------------------

class CountingSession:
    def __init__(self, inner):
        self.inner, self.runs = inner, 0

    def run(self, *a, **k):
        self.runs += 1
        return self.inner.run(*a, **k)


def test_image_cache_hits_skip_the_vision_graph(b16, scene, scene_path, tmp_path):
    engine = Engine.load(b16, cache_dir=str(tmp_path / "emb"))
    engine.vision = counter = CountingSession(engine.vision)
    data = open(scene_path, "rb").read()
    a, cached_a = engine.encode_image(scene_path)
    assert (cached_a, counter.runs) == (False, 1)
    b, cached_b = engine.encode_image(data)  # same bytes as the file: same key
    assert (cached_b, counter.runs) == (True, 1)
    assert torch.equal(a, b)
    c, cached_c = engine.encode_image(scene)  # a PIL image: keyed by its pixels
    assert (cached_c, counter.runs) == (False, 2)
    torch.testing.assert_close(c, a, rtol=0, atol=0)  # same pixels -> same embeddings
    d, cached_d = engine.encode_image(Image.open(scene_path))  # the file opened: same pixels, same key
    assert (cached_d, counter.runs) == (True, 2) and torch.equal(d, c)
    # through stream timings
    tl = list(engine.stream(scene_path, max_new_tokens=2))[-1].timings
    assert tl["image_cached"] is True and counter.runs == 2
    # a fresh engine on the same folder reads it from disk
    engine2 = Engine.load(b16, cache_dir=str(tmp_path / "emb"))
    engine2.vision = counter2 = CountingSession(engine2.vision)
    e, cached_e = engine2.encode_image(data)
    assert cached_e is True and counter2.runs == 0 and torch.equal(e, a)
    assert engine2.cache.hits["disk"] == 1
    # use_cache=False always runs the graph
    engine2.encode_image(data, use_cache=False)
    assert counter2.runs == 1



def test_image_cache_is_keyed_by_the_vision_graph(b16, tiny_bundle, scene_path, tmp_path):
    """A bundle with another vision graph (int8 here) never reuses the fp32 graph's embeddings."""
    folder = str(tmp_path / "emb")
    fp32 = Engine.load(b16, cache_dir=folder)
    a, _ = fp32.encode_image(scene_path)
    int8 = Engine.load(tiny_bundle(8, "int8"), cache_dir=folder)
    int8.vision = counter = CountingSession(int8.vision)
    assert int8.vision_id != fp32.vision_id
    b, cached = int8.encode_image(scene_path)
    assert cached is False and counter.runs == 1 and not torch.equal(a, b)
    assert int8.encode_image(scene_path)[1] is True  # its own entry is reused


def test_image_cache_first_then_cached_in_timings(b16, other_image, tmp_path):
    engine = Engine.load(b16, cache_dir=None)  # memory only
    engine.vision = counter = CountingSession(engine.vision)
    first = list(engine.stream(other_image, max_new_tokens=3))
    second = list(engine.stream(other_image, max_new_tokens=3))
    assert first[-1].timings["image_cached"] is False and second[-1].timings["image_cached"] is True
    assert counter.runs == 1 and _tokens(first) == _tokens(second)
    assert engine.cache.folder is None and engine.cache.entries() == []


# -- cancellation (closing, dropping, timeouts and threads: test_concurrency.py) ----------------

def test_stop_event_cancels_promptly(e16, scene, gate_sampling):
    ev = threading.Event()
    ev.set()
    steps = list(e16.stream(scene, max_new_tokens=100, stop_event=ev))
    assert steps[-1].finish_reason == "cancelled" and len(steps) <= 2
    assert steps[-1].timings["new_tokens"] == len(steps)
    ev = threading.Event()
    steps = []
    for step in e16.stream(scene, max_new_tokens=100, stop_event=ev):
        steps.append(step)
        if len(steps) == 3:
            ev.set()  # e.g. from a UI thread
    assert steps[-1].finish_reason == "cancelled" and 3 <= len(steps) <= 5
    # set from another thread while the worker is making the second token (held there by the
    # sampler, so how far the worker runs ahead does not depend on the machine's load)
    gate = gate_sampling(2)
    ev = threading.Event()
    gen = e16.stream(scene, max_new_tokens=100, stop_event=ev)
    steps = [next(gen)]
    assert gate.reached.wait(HANG_GUARD_S)
    t = threading.Thread(target=ev.set)
    t.start()
    t.join()
    gate.open.set()
    steps.extend(gen)
    assert steps[-1].finish_reason == "cancelled" and len(steps) <= 3
    assert gate.calls == 2  # nothing sampled after the token in progress


# -- errors --------------------------------------------------------------------------------------

def test_bad_images(e16, scene, tmp_path):
    with pytest.raises(TinyVError, match="cannot read the given bytes as an image"):
        list(e16.stream(b"definitely not an image", max_new_tokens=2))
    with pytest.raises(TinyVError, match="image not found"):
        list(e16.stream(str(tmp_path / "nope.jpg"), max_new_tokens=2))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(TinyVError, match="cannot read"):
        e16.caption(str(bad))
    with pytest.raises(TinyVError, match="expected an image path"):
        e16.caption(12345)
    assert _run(e16, scene, max_new_tokens=4)[0] == _run(e16, scene, max_new_tokens=4)[0]  # still serving


def test_bad_bundles(b4, tmp_path):
    with pytest.raises(TinyVError, match="bundle not found"):
        Engine.load(str(tmp_path / "no-bundle"), cache_dir=None)
    altered = tmp_path / "altered"
    shutil.copytree(b4, altered)
    data = bytearray((altered / LLM_FILE).read_bytes())
    data[-7] ^= 0x5A
    (altered / LLM_FILE).write_bytes(bytes(data))
    with pytest.raises(TinyVError, match="altered"):
        Engine.load(str(altered), verify=True, cache_dir=None)
    Engine.load(str(altered), cache_dir=None)  # same sizes: only verify sees it
    Engine.load(b4, verify=True, cache_dir=None)  # an intact bundle verifies
    truncated = tmp_path / "truncated"
    shutil.copytree(b4, truncated)
    data = (truncated / LLM_FILE).read_bytes()
    (truncated / LLM_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(TinyVError, match="truncated"):
        Engine.load(str(truncated), cache_dir=None)  # sizes are always checked


def test_bad_requests(e16, scene):
    expected = _run(e16, scene, max_new_tokens=2)[0]
    long_q = " square" * 2100
    with pytest.raises(TinyVError, match="context is 2048"):
        list(e16.stream(scene, long_q))
    with pytest.raises(TinyVError, match="context"):
        e16.ask(scene, long_q)
    with pytest.raises(TinyVError, match="max_new_tokens"):
        e16.stream(scene, max_new_tokens=0)  # raised at the call, before any work
    with pytest.raises(TinyVError, match="task must be"):
        e16.stream(scene, "hi", task="detect")
    with pytest.raises(TinyVError, match="question is empty"):
        e16.stream(scene, "", task="vqa")
    with pytest.raises(TinyVError, match="question is empty"):
        e16.ask(scene, "")
    with pytest.raises(TinyVError, match="exactly once"):
        e16.stream(scene, prompt="no placeholder")
    with pytest.raises(TinyVError, match="sampling options"):
        e16.stream(scene, greedy=False, top_p=0)
    assert _run(e16, scene, max_new_tokens=2)[0] == expected  # the engine still serves, unchanged


def _scripted(monkeypatch, ids):
    it = iter(ids)
    monkeypatch.setattr(generate_mod, "make_sampler", lambda *a, **k: (lambda logits, hist: next(it)))


def test_max_new_tokens_capped_by_the_context(e16, scene, monkeypatch):
    tok = e16.tokenizer
    s = e16.session(scene)
    prefix_len = list(s.stream("x", max_new_tokens=1))[-1].timings["prefix_tokens"]
    limit = e16.config.phi.max_positions

    def length(n):
        return prefix_len + len(tok.encode(e16.prompt_format.split("cat " * n)[1]))

    lo, hi = 1, limit  # the most words that still leave room for one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) < limit else (lo, mid - 1)
    q = "cat " * lo
    L = length(lo)
    remaining = limit - L
    assert 0 < remaining <= 7
    filler = tok.encode(" dog")[0]
    _scripted(monkeypatch, [filler] * 1000)
    steps = list(e16.stream(scene, q, max_new_tokens=500))
    assert steps[-1].finish_reason == "length" and len(steps) == remaining
    assert steps[-1].timings["prompt_tokens"] == L and steps[-1].timings["new_tokens"] == remaining


def test_stop_string_cuts_the_stream(e16, scene, monkeypatch):
    tok = e16.tokenizer
    ids = tok.encode(" a cat###rest")
    _scripted(monkeypatch, ids + [tok.encode(" dog")[0]] * 10)
    steps = list(e16.stream(scene, max_new_tokens=50))
    assert "".join(s.text for s in steps) == " a cat"
    assert all("#" not in s.text for s in steps)
    assert steps[-1].finish_reason == "stop" and len(steps) <= len(ids)
    _scripted(monkeypatch, ids)
    assert e16.caption(scene, max_new_tokens=50) == "a cat"
    _scripted(monkeypatch, tok.encode(" two #") + [tok.eos_id])
    steps = list(e16.stream(scene, max_new_tokens=50))
    assert steps[-1].finish_reason == "eos" and "".join(s.text for s in steps) == " two #"


# -- the default model ---------------------------------------------------------------------------

def test_default_model_is_the_shipped_demo_bundle(tmp_path, scene):
    cache = tmp_path / "tinyv-cache"
    assert os.environ["TINYV_CACHE"] == str(cache)
    notes = []
    e = tinyv.load(announce=notes.append)
    assert len(notes) == 1 and "built-in demo model" in notes[0]
    assert os.path.realpath(e.bundle) == os.path.realpath(DEMO_BUNDLE)
    assert e.cache.folder.startswith(str(cache))  # the embedding cache lives under TINYV_CACHE too
    assert not cache.exists()  # loading wrote nothing: the model is read in place
    tokens = _run(e, scene, max_new_tokens=4)[0]
    assert _run(tinyv.load(cache_dir=None), scene, max_new_tokens=4)[0] == tokens  # announce is optional


# -- vision graph opening ----------------------------------------------------------------------------

def test_vision_graph_opens_in_the_background_while_the_model_loads(b4, scene, monkeypatch):
    """The first new image must not wait seconds for the graph to be read: it opens on its own
    thread from the start of the load. preload_vision=False opens it at the first image."""
    from tinyv.engine import vision_native

    opened_on = []
    real = vision_native.open_vision_graph

    def spy(*args, **kw):
        opened_on.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(vision_native, "open_vision_graph", spy)
    early = Engine.load(b4, cache_dir=None)
    assert early.vision is early.vision  # waits for the background open; opened once
    assert opened_on == ["tinyv-vision-open"]
    lazy = Engine.load(b4, cache_dir=None, preload_vision=False)
    assert opened_on == ["tinyv-vision-open"]  # nothing opened for the lazy engine yet
    assert lazy.caption(scene, max_new_tokens=3) == early.caption(scene, max_new_tokens=3)
    assert opened_on[1:] and opened_on[1].startswith("tinyv-engine")  # on the engine's worker, when needed


def test_a_one_shot_engine_holds_the_vision_graph_and_the_language_model_in_turn(tiny_bundle, scene, monkeypatch):
    """tinyv caption of one image: the graph opens at the image and is dropped once it has encoded
    it, the language model is built only then; the answer is the usual engine's."""
    from tinyv.engine import vision_native

    bundle = tiny_bundle(4, "int8")
    opened = []
    real = vision_native.open_vision_graph
    monkeypatch.setattr(vision_native, "open_vision_graph", lambda *a, **kw: opened.append(1) or real(*a, **kw))
    want = _run(Engine.load(bundle, cache_dir=None), scene, max_new_tokens=6)[0]
    opened.clear()
    once = Engine.load(bundle, cache_dir=None, one_shot=True)
    assert once._phi is None and not opened  # nothing built or opened at load
    steps = iter(once.stream(scene, max_new_tokens=6))
    first = next(steps)
    assert once._vision is None and once._phi is not None and opened == [1]
    assert _tokens([first, *steps]) == want
    # an image whose embeddings are cached never opens the graph
    cached = Engine.load(bundle, cache_dir=None, one_shot=True)
    cached.cache.put(image_key(scene, cached.vision_id), once.encode_image(scene)[0])
    assert _run(cached, scene, max_new_tokens=6)[0] == want and opened == [1]


def test_a_vision_graph_that_fails_to_open_in_the_background_fails_the_first_image(b4, tmp_path, scene):
    folder = tmp_path / "broken"
    shutil.copytree(b4, folder)
    graph = folder / "vision.onnx"
    graph.write_bytes(b"\xff" * graph.stat().st_size)  # the size the manifest says; not a graph
    engine = Engine.load(str(folder), cache_dir=None)  # sizes are checked at load, the graph when opened
    with pytest.raises(TinyVError, match="cannot open the vision graph"):
        engine.caption(scene, max_new_tokens=2)


# -- bench ---------------------------------------------------------------------------------------

def test_run_bench_figures(e4):
    from tinyv.cli.bench_figures import format_bench, run_bench

    r = run_bench(e4, runs=1, pp=(8, 16), tg=4)
    figures = [r["image_encode_ms"]["uncached"], r["image_encode_ms"]["cached"], r["ttft_ms"]["image_uncached"],
               r["ttft_ms"]["image_cached"], r["pp8_tok_s"], r["pp16_tok_s"], r["tg4_tok_s"]]
    for f in figures:
        assert {"mean", "std"} <= set(f) and f["mean"] > 0 and f["std"] >= 0 and f["runs"] == 1
    assert r["achieved_gb_s"] > 0 and r["llm_weight_bytes"] == e4.weight_bytes
    assert 4 < r["bits_per_weight"] < 6 and r["peak_rss_mb"] > 0 and r["vision"] == "fp32"
    assert r["ttft_first_call_ms"] > 0
    text = format_bench(r, tg=4)
    assert "pp8" in text and "tg4" in text and "GB/s" in text and "first call after load" in text
    print(f"\n[bench tiny q4] {r['tg4_tok_s']['mean']:.0f} tok/s, {r['achieved_gb_s']:.3f} GB/s")


# -- CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def runner():
    return CliRunner()


def _ok(r):
    assert r.exit_code == 0, (r.exit_code, r.output, r.exception)
    return r


def test_cli_caption_json_equals_engine(runner, b4, e4, scene_path):
    r = _ok(runner.invoke(cli, ["caption", scene_path, "--bundle", b4, "--json"]))
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    tokens, text, last = _run(e4, scene_path)
    assert out["tokens"] == tokens and out["text"] == text.strip() and out["finish_reason"] == last.finish_reason
    assert out["image"] == scene_path and out["timings"]["prompt_tokens"] == last.timings["prompt_tokens"]
    assert "built-in demo model" not in r.stderr  # a bundle was named


def test_cli_caption_folder_with_a_corrupt_image(runner, b4, e4, scene, other_image, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    scene.save(folder / "a.png")
    other_image.save(folder / "b.png")
    (folder / "c.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("ignored")
    r = runner.invoke(cli, ["caption", str(folder), "--bundle", b4, "--json", "--max-new-tokens", "6"])
    assert r.exit_code == 1, r.output
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [os.path.basename(x["image"]) for x in lines] == ["a.png", "b.png", "c.png"]
    assert "error" in lines[2] and "cannot read" in lines[2]["error"] and "tokens" not in lines[2]
    for rec in lines[:2]:
        assert "error" not in rec and rec["tokens"] == _run(e4, rec["image"], max_new_tokens=6)[0]
    assert "1 of 3 images failed" in r.stderr and "Traceback" not in r.output


def test_cli_ask_json(runner, b4, e4, scene_path):
    r = _ok(runner.invoke(cli, ["ask", scene_path, "what colour?", "--bundle", b4, "--json", "--max-new-tokens", "8"]))
    out = json.loads(r.stdout)
    assert out["tokens"] == _run(e4, scene_path, "what colour?", task="vqa", max_new_tokens=8)[0]
    r = runner.invoke(cli, ["ask", scene_path, "  ", "--bundle", b4])
    assert r.exit_code == 1 and "question is empty" in r.output


def test_cli_chat_two_answers(runner, b4, e4, scene_path):
    r = _ok(runner.invoke(cli, ["chat", scene_path, "--bundle", b4, "--max-new-tokens", "6"], input="q1\nq2\n\nq3\n"))
    expected = "".join(_run(e4, scene_path, q, max_new_tokens=6)[1].lstrip() + "\n" for q in ("q1", "q2"))
    assert r.stdout == expected  # two answers; the empty line ended the chat before q3
    r = _ok(runner.invoke(cli, ["chat", scene_path, "--bundle", b4, "--max-new-tokens", "6", "--json"], input="q1\nq2\n"))
    recs = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [x["question"] for x in recs] == ["q1", "q2"]
    assert recs[1]["timings"]["prefix_reused"] is True and recs[1]["timings"]["image_ms"] == 0
    assert recs[0]["tokens"] == _run(e4, scene_path, "q1", max_new_tokens=6)[0]


def test_cli_bench_json(runner, b4):
    r = _ok(runner.invoke(cli, ["bench", "--bundle", b4, "--runs", "1", "--pp", "8", "--tg", "4", "--json"]))
    out = json.loads(r.stdout)
    assert out["pp8_tok_s"]["mean"] > 0 and out["tg4_tok_s"]["mean"] > 0 and out["achieved_gb_s"] > 0
    r = runner.invoke(cli, ["bench", "--bundle", b4, "--pp", "8,x"])
    assert r.exit_code == 1 and "--pp" in r.output


def test_cli_cache_info_and_clear(runner, b4, scene_path, tmp_path):
    cache = tmp_path / "tinyv-cache"
    empty = json.loads(_ok(runner.invoke(cli, ["cache", "info", "--json"])).stdout)
    assert empty["entries"] == 0 and empty["folder"].startswith(str(cache))
    _ok(runner.invoke(cli, ["caption", scene_path, "--bundle", b4, "--max-new-tokens", "2"]))
    info = json.loads(_ok(runner.invoke(cli, ["cache", "info", "--json"])).stdout)
    assert info["entries"] == 1 and info["bytes"] > 0
    r = _ok(runner.invoke(cli, ["cache", "info"]))
    assert "1 entries" in r.stdout
    r = _ok(runner.invoke(cli, ["cache", "clear"]))
    assert "removed 1 entries" in r.stdout
    assert json.loads(_ok(runner.invoke(cli, ["cache", "info", "--json"])).stdout)["entries"] == 0


def test_cli_errors(runner, b4, scene_path, tmp_path):
    r = runner.invoke(cli, ["caption", scene_path, "--bundle", b4, "--phi2", "X"])
    assert r.exit_code == 1 and "either --bundle" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(cli, ["caption", str(tmp_path / "missing.jpg")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(cli, ["caption", scene_path, "--bundle", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "bundle not found" in r.output and len(r.output.strip().splitlines()) == 1


# -- import weight -------------------------------------------------------------------------------

def test_engine_imports_no_heavy_libraries():
    code = ("import sys, tinyv.engine.engine, tinyv.cli.bench_figures, tinyv.cli.main; "
            "print([m for m in ('transformers', 'optimum', 'accelerate', 'bitsandbytes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _python(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_help_imports_no_torch():
    """``tinyv --help`` stays fast by not importing torch (or the model) at all."""
    # what the `tinyv` console script runs (tinyv.cli.main:main)
    out = _python("-c", "from tinyv.cli.main import main; main()", "--help")
    assert out.returncode == 0, out.stderr
    assert all(c in out.stdout for c in ("caption", "ask", "chat", "bench", "cache", "export"))
    out = subprocess.run([sys.executable, "-c", "import sys, tinyv.cli.main; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_python_m_cli_main_has_the_commands():
    """``python -m tinyv.cli.main`` runs the module as __main__: its commands must be registered
    on the group it invokes (the command modules import ``tinyv.cli.main``, a second copy)."""
    out = _python("-m", "tinyv.cli.main", "--help")
    assert out.returncode == 0, out.stderr
    assert "caption" in out.stdout and "chat" in out.stdout, out.stdout


def test_a_dropped_stream_leaves_autograd_on(e16, scene):
    """A stream read part way and abandoned must not leave inference mode on in the caller's thread."""
    stream = e16.stream(scene, max_new_tokens=8)
    next(stream)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    stream.close()
    assert torch.is_grad_enabled()


# -- prefix KV reuse across calls ------------------------------------------------------------------

def test_a_new_call_on_a_seen_image_prefills_only_its_question(b16, scene, other_image):
    cold = Engine.load(b16, cache_dir=None, prefix_cache_bytes=0)  # never keeps a prefix
    warm = Engine.load(b16, cache_dir=None)
    q1, q2 = "what is on the left?", "how many shapes are there?"
    for q in (q1, q2, q1):
        fresh = _run(cold, scene, q, max_new_tokens=10)
        got = _run(warm, scene, q, max_new_tokens=10)
        assert got[:2] == fresh[:2] and fresh[2].timings["prefix_reused"] is False
    t = got[2].timings  # the third call: the prefix came from the cache
    assert t["prefix_reused"] is True and t["image_ms"] == 0
    assert t["prefilled_tokens"] == len(warm.tokenizer.encode(warm.prompt_format.split(q1)[1]))
    assert len(warm.prefixes) == 1 and warm.prefixes.hits == 2 and len(cold.prefixes) == 0
    # a VQA question and a caption share the same prefix (the template's text before the image)
    assert warm.ask(scene, VQA_Q, max_new_tokens=6) == cold.ask(scene, VQA_Q, max_new_tokens=6)
    assert warm.prefixes.hits == 3
    # another image, another template: new entries, right answers
    assert _run(warm, other_image, q1, max_new_tokens=8)[0] == _run(cold, other_image, q1, max_new_tokens=8)[0]
    raw = "###Human: <Img><ImageHere></Img> hi###Assistant: "
    assert _run(warm, scene, prompt=raw, max_new_tokens=8)[0] == _run(cold, scene, prompt=raw, max_new_tokens=8)[0]
    assert len(warm.prefixes) == 3 and warm.prefixes.hits == 3


def test_the_prefix_cache_keeps_to_its_byte_bound(b16, scene, other_image):
    probe = Engine.load(b16, cache_dir=None)
    _run(probe, scene, max_new_tokens=2)
    one = probe.prefixes.nbytes
    engine = Engine.load(b16, cache_dir=None, prefix_cache_bytes=one + one // 2)  # room for one entry
    first = _run(engine, scene, max_new_tokens=6)[0]
    _run(engine, other_image, max_new_tokens=2)  # evicts the scene's prefix
    assert len(engine.prefixes) == 1 and engine.prefixes.nbytes <= one + one // 2
    again = _run(engine, scene, max_new_tokens=6)
    assert again[0] == first and again[2].timings["prefix_reused"] is False

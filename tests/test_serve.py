"""``tinyv serve`` with the official ``openai`` client (and raw HTTP where the wire format is the
point): the built-in model's answers equal ``tinyv caption``'s and the engine's, streamed or not;
a follow-up reuses the image's prefix; concurrent clients; a client that disconnects frees its
place; every error class in OpenAI's shape with its status; the API key; the command itself.
Servers run in-process on free loopback ports (one subprocess test for startup and Ctrl-C)."""
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading

import httpx2 as httpx
import openai
import pytest
from click.testing import CliRunner
from PIL import Image

import tinyv
from tinyv.cli.main import cli
from tinyv.demo.scenes import make_scene
from tinyv.serve.app import ServerSettings
from tinyv.serve.images import CheckedImages, ImagePolicy
from tinyv.serve.openai_shapes import ApiError
from tinyv.serve.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HANG_GUARD_S = 120
KEY = "sk-test-key"
# the repository's example (the installed package has no examples/)
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "red_circle_blue_square.png")
VQA = "[vqa] Based on the image, respond to this question with a short answer: {}"
SETTINGS = ServerSettings(model="tinyv-demo", api_key=KEY, max_batch=4, max_body_bytes=512 << 10,
                          images=ImagePolicy(max_pixels=100_000))


def data_url(image, fmt="PNG") -> str:
    if isinstance(image, str):
        with open(image, "rb") as f:
            raw = f.read()
    else:
        buf = io.BytesIO()
        image.save(buf, fmt)
        raw = buf.getvalue()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()


def image_message(url, text=None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


@pytest.fixture(scope="module")
def demo():
    engine = tinyv.load(cache_dir=None, threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(demo):
    with BackgroundServer(demo, SETTINGS) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=HANG_GUARD_S)


def alone(engine, image, prompt=None, question=None) -> str:
    """The engine's own greedy answer, stripped as the CLI and the server strip it."""
    return "".join(s.text for s in engine.stream(image, question, prompt=prompt, max_new_tokens=200)).strip()


def test_captions_equal_tinyv_caption(client, monkeypatch, tmp_path):
    monkeypatch.setenv("TINYV_CACHE", str(tmp_path / "cache"))
    cli_out = CliRunner().invoke(cli, ["caption", EXAMPLE])
    assert cli_out.exit_code == 0, cli_out.output
    want = cli_out.stdout.strip().splitlines()[-1]
    assert want == "a large red circle left of a small blue square"
    messages = [image_message(data_url(EXAMPLE))]
    r = client.chat.completions.create(model="any", messages=messages)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop" and r.model == "tinyv-demo"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="any", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_the_stream_is_openai_server_sent_events(server):
    body = {"model": "m", "stream": True, "messages": [image_message(data_url(EXAMPLE))]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=HANG_GUARD_S,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_follow_up_reuses_the_image_and_its_prefix(client, demo):
    url = data_url(EXAMPLE)
    first = client.chat.completions.create(model="m", messages=[image_message(url)]).choices[0].message.content
    hits, misses, encoded = demo.prefixes.hits, demo.prefixes.misses, demo.cache.misses
    question = VQA.format("what colour is the circle?")
    messages = [image_message(url), {"role": "assistant", "content": first}, {"role": "user", "content": question}]
    r = client.chat.completions.create(model="m", messages=messages)
    prompt = demo.prompt_format.conversation([(None, first), (question, None)])
    assert prompt.endswith("[/INST]" + first + "<s>[INST] " + question + " [/INST]")
    assert r.choices[0].message.content == alone(demo, EXAMPLE, prompt=prompt)
    assert (demo.prefixes.hits, demo.prefixes.misses, demo.cache.misses) == (hits + 2, misses, encoded)


def test_eight_concurrent_clients_all_get_their_answers(server, demo):
    rng = random.Random(5)
    jobs = []
    for i in range(8):
        scene = make_scene(rng)
        qa = scene.questions()[i % len(scene.questions())]
        text = None if i % 2 == 0 else VQA.format(qa.question)
        jobs.append((scene.render(), text, i % 3 == 0))
    want = [alone(demo, img, question=text) for img, text, _ in jobs]
    got = [None] * 8

    def run(i):
        img, text, stream = jobs[i]
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=HANG_GUARD_S)
        r = c.chat.completions.create(model="m", messages=[image_message(data_url(img), text)], stream=stream)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert got == want


def test_a_client_that_disconnects_frees_its_place(demo, gate_sampling):
    other = make_scene(random.Random(11)).render()
    want = alone(demo, other)
    gate = gate_sampling(3)
    with BackgroundServer(demo, ServerSettings(max_batch=1)) as s:
        batcher = s.app.state.batcher
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=HANG_GUARD_S)
        stream = c.chat.completions.create(model="m", messages=[image_message(data_url(EXAMPLE))], stream=True,
                                           max_tokens=100)
        next(iter(stream))  # the answer is under way; its third token waits at the gate
        assert gate.reached.wait(HANG_GUARD_S)
        (channel,) = batcher._active
        stream.close()  # the client goes away mid-answer
        assert channel.closed.wait(HANG_GUARD_S)
        gate.open.set()
        r = c.chat.completions.create(model="m", messages=[image_message(data_url(other))])  # needs the one place
        assert r.choices[0].message.content == want
        assert gate.calls == 3 + r.usage.completion_tokens  # the first answer stopped at the gate's token
        assert batcher.stats()["active"] == 0


def test_sampling_options(client):
    messages = [image_message(data_url(EXAMPLE))]
    a, b = (client.chat.completions.create(model="m", messages=messages, temperature=1.5, top_p=0.95, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded
    short = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    cut = client.chat.completions.create(model="m", messages=messages, stop=["circle"])
    assert cut.choices[0].message.content == "a large red" and cut.choices[0].finish_reason == "stop"
    also = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=3)
    assert also.usage.completion_tokens == 3


def _post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=HANG_GUARD_S,
                          **kw)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=HANG_GUARD_S, **kw)


def _error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert err["code"] == code, err
    return err


def _chat(*messages):
    return {"model": "m", "messages": list(messages)}


def test_errors_have_openai_shape_and_status(server, tmp_path):
    png = data_url(EXAMPLE)
    big = Image.new("RGB", (400, 300), "white")  # 120,000 pixels, the test server takes 100,000
    noise = Image.frombytes("RGB", (420, 420), os.urandom(420 * 420 * 3))  # an incompressible PNG over 512 KB
    gif = data_url(Image.new("RGB", (8, 8)), "GIF")
    path = tmp_path / "x.png"
    path.write_bytes(base64.b64decode(png.split(",", 1)[1]))
    _error(_post(server, b"{not json"), 400)
    _error(_post(server, b"[" * 100_000), 400)  # nested past the parser's depth
    _error(_post(server, b"\xff\xfe{}"), 400)
    _error(_post(server, _chat({"role": "user", "content": "what is it?"})), 400, "no_image")
    _error(_post(server, _chat(image_message("data:image/png;base64," + base64.b64encode(b"hello").decode()))),
           400, "invalid_image")
    _error(_post(server, _chat(image_message("data:image/png;base64,!!!"))), 400, "invalid_image")
    _error(_post(server, _chat(image_message(gif))), 400, "invalid_image")
    _error(_post(server, _chat(image_message(data_url(big)))), 400, "image_too_large")
    _error(_post(server, _chat(image_message(png, "word " * 400))), 400, "context_length_exceeded")
    _error(_post(server, _chat(image_message(data_url(noise)))), 413, "request_too_large")
    _error(_post(server, _chat(image_message("https://example.com/cat.png"))), 400, "image_url_not_allowed")
    _error(_post(server, _chat(image_message(path.as_uri()))), 400, "image_url_not_allowed")
    _error(_post(server, _chat(image_message(png), image_message(data_url(big)))), 400, "too_many_images")
    err = _error(_post(server, {**_chat(image_message(png)), "temperature": 5}), 400)
    assert err["param"] == "temperature"
    _error(_post(server, {**_chat(image_message(png)), "n": 2}), 400, "unsupported_parameter")
    _error(_post(server, {**_chat(image_message(png)), "tools": [{"type": "function"}]}), 400,
           "unsupported_parameter")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{}", timeout=HANG_GUARD_S,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    _error(r, 415)
    _error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _error(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_the_openai_client_sees_the_statuses(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "no image here"}])
    assert e.value.status_code == 400 and e.value.code == "no_image"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=[image_message(data_url(EXAMPLE), "word " * 400)],
                                       stream=True)


@pytest.mark.parametrize("body", [
    [], "text", 3, None, {"messages": "hi"}, {"messages": [None]}, {"messages": [{"role": 5}]},
    {"messages": [{"role": "tool", "content": "x"}]}, {"messages": [{"role": "user", "content": 7}]},
    {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "ftp://x"}]}]},
    {"messages": [{"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": True},
    {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
    {"messages": [{"role": "user", "content": "x"}], "stop": [1]},
    {"messages": [{"role": "user", "content": "x"}], "seed": 1.5},
    {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
])
def test_malformed_requests_are_client_errors(server, body):
    _error(_post(server, json.dumps(body).encode()), 400)


def test_the_api_key(server):
    body = _chat(image_message(data_url(EXAMPLE)))
    _error(_post(server, body, key="wrong"), 401, "invalid_api_key")
    _error(_post(server, body, key=None), 401, "invalid_api_key")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed to see it is up
    assert _post(server, body).status_code == 200


def test_only_localhost_names_reach_a_loopback_server(server):
    r = httpx.get(server.url + "/health", headers={"Host": "attacker.example"})
    _error(r, 403)


def test_file_urls_when_the_operator_allows_them(demo, tmp_path):
    path = tmp_path / "scene.png"
    with open(EXAMPLE, "rb") as src:
        path.write_bytes(src.read())
    with BackgroundServer(demo, ServerSettings(images=ImagePolicy(allow_file=True))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=HANG_GUARD_S)
        r = c.chat.completions.create(model="m", messages=[image_message(path.as_uri())])
        assert r.choices[0].message.content == "a large red circle left of a small blue square"
        with pytest.raises(openai.BadRequestError, match="cannot read"):
            c.chat.completions.create(model="m", messages=[image_message((tmp_path / "none.png").as_uri())])


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tinyv-demo"]
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": "tinyv-demo", "active": 0, "waiting": 0, "max_batch": 4}


def test_a_network_address_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("TINYV_API_KEY", raising=False)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "--api-key" in r.output and "Traceback" not in r.output


def test_the_command_starts_prints_its_url_and_stops_on_ctrl_c(tmp_path):
    env = {**os.environ, "TINYV_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("TINYV_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "tinyv.cli.main", "serve", "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "http://" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before printing its URL"
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and "tinyv-demo" in line
        assert httpx.get(url[:-3] + "/health", timeout=HANG_GUARD_S).json()["model"] == "tinyv-demo"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=HANG_GUARD_S)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in rest and "Traceback" not in rest


def test_jpeg_and_webp_images(client, demo):
    img = Image.open(EXAMPLE).convert("RGB")
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        url = f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
        r = client.chat.completions.create(model="m", messages=[image_message(url)])
        assert r.choices[0].message.content == alone(demo, buf.getvalue())


def test_an_image_that_passed_is_not_decoded_again(monkeypatch):
    """Every turn of a conversation resends its image: the check decodes it once; bytes that fail
    are refused every time; only the last ``size`` images are remembered."""
    import tinyv.serve.images as images

    decoded = []
    real = images.check_image
    monkeypatch.setattr(images, "check_image", lambda data, limit: (decoded.append(data), real(data, limit)))
    pngs = []
    for colour in ("red", "green", "blue"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, "PNG")
        pngs.append(buf.getvalue())
    checked = CheckedImages(size=2)
    checked.check(pngs[0], 1000)
    checked.check(pngs[0], 1000)
    assert decoded == [pngs[0]]
    for _ in range(2):
        with pytest.raises(ApiError, match="not a readable"):
            checked.check(pngs[1][:40], 1000)
    assert len(decoded) == 3
    checked.check(pngs[1], 1000)
    checked.check(pngs[2], 1000)  # pushes pngs[0] out
    checked.check(pngs[0], 1000)
    assert decoded[3:] == [pngs[1], pngs[2], pngs[0]]
    too_big = io.BytesIO()
    Image.new("RGB", (40, 40)).save(too_big, "PNG")
    with pytest.raises(ApiError, match="over this server's limit"):
        checked.check(too_big.getvalue(), 1000)


@pytest.mark.parametrize("stage, want", [
    (4, "<s>[INST] <Img><ImageHere></Img> [caption] please describe this image? [/INST]a red circle"
        "<s>[INST] how many? [/INST]two<s>[INST] and now? [/INST]"),
    (3, "###Human: <Img><ImageHere></Img> Describe this image.###Assistant: a red circle"
        "###Human: how many?###Assistant: two###Human: and now?###Assistant: "),
])
def test_a_conversation_is_laid_out_as_the_demo_lays_out_a_chat(stage, want):
    """minigpt4's Conversation, single style: stage 4 roles "<s>[INST] " / " [/INST]" with no
    separator (TinyGPT-V's demo_v2.py), stages 1-3 "Human: " / "Assistant: " with "###"."""
    from tinyv.engine.prompts import PromptFormat

    turns = [(None, "a red circle"), ("how many?", "two"), ("and now?", None)]
    assert PromptFormat.for_stage(stage).conversation(turns) == want

"""The batch scheduler (engine/batching.py): answers decoded together give the very tokens they give
alone; a request arriving mid-answer joins the batch; a closed stream leaves it within a token; a
failing request fails alone; the batch never exceeds its size. Gated samplers hold the engine's
worker at known points, so nothing depends on timing."""
import asyncio

import pytest

from tinyv import TinyVError
from tinyv.engine.batching import Batcher
from tinyv.engine.engine import Engine

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_torch_thread")

HANG_GUARD_S = 120  # a wait that outlives this is a hang, not a slow machine
QUESTIONS = [None, "what is it?", "how many?", "which colour is the big one?", None, "where?"]


@pytest.fixture(scope="module")
def e4(tiny_bundle):
    return Engine.load(tiny_bundle(4), cache_dir=None)


def _ask(e, image, question, n):
    kw = {"task": "vqa"} if question else {}
    return [s.token for s in e.stream(image, question, max_new_tokens=n, **kw)]


def _submit(b, image, question, n):
    return b.submit(image, question, max_new_tokens=n, **({"task": "vqa"} if question else {}))


def test_batched_answers_are_the_answers_alone(e4, scene, other_image):
    images = [scene, other_image, scene, other_image, scene, scene]
    want = [_ask(e4, img, q, 12) for img, q in zip(images, QUESTIONS)]
    b = Batcher(e4, max_batch=4)
    streams = [_submit(b, img, q, 12) for img, q in zip(images, QUESTIONS)]
    got = [[s.token for s in st] for st in streams]
    assert got == want
    assert b.stepped_tokens > b.steps  # steps carried more than one answer
    assert b.stats() == {"active": 0, "waiting": 0, "max_batch": 4}


def test_the_batch_never_exceeds_its_size(e4, scene, monkeypatch):
    sizes = []
    original = e4.phi.decode_batch

    def recording(embeds, positions, caches):
        sizes.append(len(positions))
        return original(embeds, positions, caches)

    monkeypatch.setattr(e4.phi, "decode_batch", recording)
    b = Batcher(e4, max_batch=2)
    for st in [_submit(b, scene, q, 8) for q in QUESTIONS[:5]]:
        list(st)
    assert max(sizes) == 2


def test_a_request_arriving_mid_answer_joins_the_batch(e4, scene, other_image, gate_sampling):
    want_a, want_b = _ask(e4, scene, None, 16), _ask(e4, other_image, "what is it?", 10)
    gate = gate_sampling(3)
    b = Batcher(e4, max_batch=4)
    a = _submit(b, scene, None, 16)
    first = [next(a).token, next(a).token]  # A is being decoded; its third token waits at the gate
    assert gate.reached.wait(HANG_GUARD_S)
    steps_before = b.steps
    late = _submit(b, other_image, "what is it?", 10)
    assert b.stats()["waiting"] == 1
    gate.open.set()
    assert first + [s.token for s in a] == want_a
    assert [s.token for s in late] == want_b
    assert b.stepped_tokens - steps_before > b.steps - steps_before  # it decoded together with A


def test_a_closed_stream_leaves_within_one_token(e4, scene, other_image, gate_sampling):
    want_b = _ask(e4, other_image, None, 12)
    gate = gate_sampling(5)
    b = Batcher(e4, max_batch=1)  # B can only start once A's place is free
    a = _submit(b, scene, None, 40)
    late = _submit(b, other_image, None, 12)
    assert gate.reached.wait(HANG_GUARD_S)  # A's 5th token is in progress
    a.close()
    gate.open.set()
    assert [s.token for s in late] == want_b
    assert gate.calls == 5 + len(want_b)  # A sampled nothing after the token in progress
    assert len(list(a)) <= 5
    assert b.stats()["active"] == 0


def test_a_dropped_stream_closes(e4, scene, gate_sampling):
    gate = gate_sampling(2)
    b = Batcher(e4, max_batch=2)
    a = _submit(b, scene, None, 40)
    assert gate.reached.wait(HANG_GUARD_S)
    channel = b._active[0]
    del a
    assert channel.closed.is_set()
    gate.open.set()
    assert list(_submit(b, scene, None, 3))  # the loop went on


def test_a_failing_request_fails_alone(e4, scene, other_image):
    want = _ask(e4, other_image, None, 10)
    b = Batcher(e4, max_batch=4)
    limit = e4.phi.cfg.max_positions
    too_long = b.submit(scene, prompt="<ImageHere>" + " word" * limit, max_new_tokens=4)
    fine = _submit(b, other_image, None, 10)
    with pytest.raises(TinyVError, match="context"):
        list(too_long)
    assert [s.token for s in fine] == want


def test_bad_arguments_are_raised_at_submit(e4, scene):
    b = Batcher(e4)
    with pytest.raises(TinyVError, match="max_new_tokens"):
        b.submit(scene, max_new_tokens=0)
    with pytest.raises(TinyVError, match="ImageHere"):
        b.submit(scene, prompt="no placeholder")
    with pytest.raises(TinyVError, match="at least 1"):
        Batcher(e4, max_batch=0)
    b.close()
    with pytest.raises(TinyVError, match="shutting down"):
        b.submit(scene)


def test_streams_are_read_from_an_event_loop(e4, scene, other_image):
    want = [_ask(e4, scene, None, 8), _ask(e4, other_image, "how many?", 8)]
    b = Batcher(e4, max_batch=4)

    async def read(stream):
        return [s.token async for s in stream]

    async def both():
        streams = [_submit(b, scene, None, 8), _submit(b, other_image, "how many?", 8)]
        return await asyncio.gather(*(read(s) for s in streams))

    assert asyncio.run(both()) == want


def test_answers_keep_their_text_rules(e4, scene):
    """Stop strings a request adds end its answer (cut off, as the model's own ``###``), and the
    last step carries the figures a server reports."""
    full = "".join(s.text for s in e4.stream(scene, max_new_tokens=12))
    b = Batcher(e4)
    steps = list(b.submit(scene, max_new_tokens=12))
    assert "".join(s.text for s in steps) == full
    last = steps[-1]
    assert last.finish_reason in ("stop", "eos", "length")
    assert last.timings["new_tokens"] == len(steps) and last.timings["prompt_tokens"] > 0
    if len(full.strip()) >= 2:
        stop = full.strip()[1]
        cut = "".join(s.text for s in b.submit(scene, max_new_tokens=12, stop_strings=[stop]))
        assert cut == full[:full.index(stop)]


def test_ready_hands_out_the_steps_already_made(e4, scene):
    b = Batcher(e4)
    want = [s.token for s in b.submit(scene, max_new_tokens=10)]
    stream, got = b.submit(scene, max_new_tokens=10), []
    for step in stream:  # whatever came meanwhile, in order; the end is kept for the loop
        got += [step.token] + [s.token for s in stream.ready()]
    assert got == want and stream.ready() == []

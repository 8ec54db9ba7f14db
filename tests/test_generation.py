"""Prompts, sampling, streaming and stopping on the tiny model."""
import pytest
import torch

import tinyv.engine.generate as generate_mod
from tinyv import TinyVError
from tinyv.engine.prompts import (
    STAGE4_CHAT, build_prompt, cut_at_stop, held_back, split_prompt,
)
from tinyv.engine.sampling import apply_repetition_penalty, make_sampler, top_p_filter
from tinyv.engine.tokenizer import StreamDecoder


def test_templates():
    assert build_prompt(4) == "<s>[INST] <Img><ImageHere></Img> [caption] please describe this image? [/INST]"
    assert build_prompt(4, "What is it?") == "<s>[INST] <Img><ImageHere></Img> What is it? [/INST]"
    assert build_prompt(4, "Colour?", task="vqa").endswith(
        "[vqa] Based on the image, respond to this question with a short answer: Colour? [/INST]"
    )
    assert build_prompt(3, "Hi") == "###Human: <Img><ImageHere></Img> Hi###Assistant: "
    assert split_prompt(STAGE4_CHAT) == ("<s>[INST] <Img>", "</Img> {question} [/INST]")
    with pytest.raises(TinyVError, match="exactly once"):
        split_prompt("no image here")
    with pytest.raises(TinyVError, match="exactly once"):
        split_prompt("<ImageHere><ImageHere>")


def test_prompt_segments_tokenized_separately_without_bos(tiny_model, scene):
    tok = tiny_model.tokenizer
    prompt = build_prompt(4)
    before, after = split_prompt(prompt)
    img = tiny_model.encode_image(scene)
    embeds = tiny_model.prompt_embeds(prompt, img)
    nb, na = len(tok.encode(before)), len(tok.encode(after))
    assert embeds.shape == (1, nb + img.shape[1] + na, tiny_model.config.phi.hidden)
    assert torch.equal(embeds[:, nb : nb + img.shape[1]], img)
    emb = tiny_model.phi.embed_tokens.weight
    assert torch.equal(embeds[0, :nb], emb[tok.encode(before)])  # "<s>" is plain text, no BOS id
    assert tok.eos_id not in tok.encode(before)


def test_kv_cache_generation_equals_full_recompute(tiny_model, scene, scene_embeds):
    prompt = build_prompt(4)
    ids = tiny_model.generate(scene_embeds, prompt, max_new_tokens=12, greedy=True)
    # naive: recompute the whole sequence every step, no cache
    with torch.inference_mode():
        embeds = tiny_model.prompt_embeds(prompt, scene_embeds)
        naive = []
        for _ in range(12):
            logits = tiny_model.phi.logits(tiny_model.phi(embeds)[0, -1])
            t = int(torch.argmax(logits))
            naive.append(t)
            if t == tiny_model.tokenizer.eos_id:
                break
            embeds = torch.cat([embeds, tiny_model.phi.embed_tokens.weight[t].view(1, 1, -1)], dim=1)
    assert ids == naive[: len(ids)]
    assert len(ids) >= 1


def test_next_token_logits_is_first_greedy_token(tiny_model, scene):
    prompt = build_prompt(4)
    logits = tiny_model.next_token_logits(scene, prompt)
    assert logits.shape == (tiny_model.config.phi.vocab_size,)
    assert tiny_model.generate(scene, prompt, max_new_tokens=1)[0] == int(torch.argmax(logits))


def test_precomputed_embeddings_give_same_tokens(tiny_model, scene):
    emb = tiny_model.encode_image(scene)
    assert tiny_model.generate(emb, build_prompt(4), 6) == tiny_model.generate(scene, build_prompt(4), 6)


def test_sampling_seeded_and_reproducible(tiny_model, scene):
    image = tiny_model.encode_image(scene)  # the vision side once: sampling is what is tested
    kw = dict(max_new_tokens=10, greedy=False, temperature=1.5, top_p=1.0)
    a = tiny_model.generate(image, build_prompt(4), seed=1, **kw)
    b = tiny_model.generate(image, build_prompt(4), seed=1, **kw)
    assert a == b
    others = {tuple(tiny_model.generate(image, build_prompt(4), seed=s, **kw)) for s in range(2, 6)}
    assert len(others | {tuple(a)}) > 1
    greedy = tiny_model.generate(image, build_prompt(4), max_new_tokens=10)
    assert tiny_model.generate(image, build_prompt(4), max_new_tokens=10, greedy=False, temperature=0) == greedy


def test_top_p_keeps_smallest_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # at least the top one
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_transformers_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0)])
def test_bad_sampling_options(kw):
    with pytest.raises(TinyVError):
        make_sampler(greedy=False, **kw)


def test_stop_string_helpers():
    assert cut_at_stop("a cat###Human") == ("a cat", True)
    assert cut_at_stop("a cat") == ("a cat", False)
    assert held_back("a cat #") == 1 and held_back("a cat ##") == 2 and held_back("a cat") == 0


def _scripted(monkeypatch, ids):
    """Make the model 'choose' these ids in order, whatever its logits."""
    it = iter(ids)
    monkeypatch.setattr(generate_mod, "make_sampler", lambda *a, **k: (lambda logits, hist: next(it)))


def test_stream_stops_at_hashes_and_never_streams_them(tiny_model, scene, monkeypatch, scene_embeds):
    tok = tiny_model.tokenizer
    ids = tok.encode(" a red circle###Human: more")
    _scripted(monkeypatch, ids)
    steps = list(tiny_model.stream(scene_embeds, max_new_tokens=50))
    text = "".join(s.text for s in steps)
    assert text == " a red circle"
    assert all("#" not in s.text for s in steps)
    assert steps[-1].finish_reason == "stop"
    assert steps[-1].timings["new_tokens"] == len(steps) <= len(ids)
    assert all(s.timings is None for s in steps[:-1])


def test_stream_ends_at_eos(tiny_model, scene, monkeypatch, scene_embeds):
    tok = tiny_model.tokenizer
    _scripted(monkeypatch, tok.encode(" two shapes #") + [tok.eos_id, 5, 6])
    steps = list(tiny_model.stream(scene_embeds, max_new_tokens=50))
    assert steps[-1].finish_reason == "eos" and steps[-1].token == tok.eos_id
    assert "".join(s.text for s in steps) == " two shapes #"  # held-back '#' flushed at the end


def test_max_new_tokens_and_length_finish(tiny_model, scene, monkeypatch, scene_embeds):
    tok = tiny_model.tokenizer
    _scripted(monkeypatch, tok.encode(" circle square circle square circle"))
    steps = list(tiny_model.stream(scene_embeds, max_new_tokens=3))
    assert len(steps) == 3 and steps[-1].finish_reason == "length"
    t = steps[-1].timings
    assert t["prompt_tokens"] > 8 and t["peak_rss_mb"] > 0 and t["ttft_ms"] >= t["image_ms"]


def test_ids_without_tokenizer_entry_decode_to_nothing(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.size < tiny_model.config.phi.vocab_size  # like Phi-2: 50295 entries, 51200 logits
    assert tok.decode([tok.size, tiny_model.config.phi.vocab_size - 1]) == ""
    assert tok.decode(tok.encode("a cat") + [tok.size + 3]) == "a cat"


def test_stream_decoder_holds_split_utf8_characters(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("é€")
    assert len(ids) >= 2  # multi-byte characters are split over byte tokens
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) == "é€"
    assert all("\ufffd" not in d for d in deltas)


def test_prompt_longer_than_context_is_a_clear_error(tiny_model, scene, scene_embeds):
    with pytest.raises(TinyVError, match="context"):
        tiny_model.next_token_logits(scene, "<ImageHere>" + " circle" * 2100)
    with pytest.raises(TinyVError, match="context"):
        list(tiny_model.stream(scene_embeds, question=" square" * 2100))


def test_caption_strips_and_uses_caption_template(tiny_model, scene, monkeypatch, scene_embeds):
    tok = tiny_model.tokenizer
    _scripted(monkeypatch, tok.encode(" a red circle ###"))
    assert tiny_model.caption(scene) == "a red circle"


MULTILINGUAL = ("A cat sat on the mat. Le chat était là — très « calme ». Die Straße ist grün. "
                "Кошка спит. 猫が寝ている。 고양이가 잔다. القط نائم. 🐱🐈‍⬛ naïve café, ½ ≠ ∞. ") * 3


def test_stream_decoder_equals_a_full_decode_at_every_prefix(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode(MULTILINGUAL)
    assert len(ids) > 200
    dec = StreamDecoder(tok)
    for n, i in enumerate(ids, 1):
        dec.push(i)
        full = tok.decode(ids[:n])
        # everything but an incomplete character at the end is out, byte for byte
        assert dec.text == full.rstrip("\ufffd") if full.endswith("\ufffd") else dec.text == full
    assert dec.text == MULTILINGUAL


def test_stream_decoder_work_per_token_does_not_grow(tiny_model, monkeypatch):
    """Each push decodes a short window, not the whole answer (an O(n^2) answer otherwise)."""
    tok = tiny_model.tokenizer
    ids = tok.encode(MULTILINGUAL)
    decoded = []
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda w: decoded.append(len(w)) or real(w))
    dec = StreamDecoder(tok)
    for i in ids:
        dec.push(i)
    assert max(decoded) <= 8 and dec.text == MULTILINGUAL

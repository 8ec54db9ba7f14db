"""The fused decode step (``tv_decode_step``) against the per-layer path, and the fp16 KV cache.

The per-layer path on the same compiled kernels quantizes the same activations the same way, so
the fused step agrees with it to float summation order (logits, cache contents, greedy tokens),
except where that order moves an int8 activation code by one step (rare, ~1% of the logits'
range, and then still close); against the pure-torch reference (dequantize + fp32 matmul) the int8 activations leave
a small, bounded difference. Every ISA this CPU runs, 1–4 threads, int4 and int8, at position 0,
mid-cache and the context limit. Then fp16 vs fp32 KV: the same greedy tokens on tiny bundles
and on the shipped demo model's held-out scenes.
"""
import pytest
import torch

from tinyv.engine.config import PhiConfig
from tinyv.engine.llm import build_quant_phi, linear_names
from tinyv.engine.phi import PhiForCausalLM
from tinyv.errors import TinyVError
from tinyv.kernels import native
from tinyv.kernels.quant import QuantConfig, quantize_weight

# tiny: the test preset's LLM (head_dim 20, rotary 8); reduced: wider heads, rotary 24, g64/g128
CONFIGS = {
    "tiny": (PhiConfig(hidden=160, layers=3, heads=8, intermediate=256, vocab_size=1024, rotary_dim=8,
                       max_positions=24), 32),
    "reduced": (PhiConfig(hidden=256, layers=2, heads=4, intermediate=640, vocab_size=512, rotary_dim=24,
                          max_positions=40), 128),
}


@pytest.fixture(autouse=True)
def _defaults(monkeypatch, one_torch_thread):
    monkeypatch.delenv("TINYV_KERNELS", raising=False)
    monkeypatch.delenv("TINYV_DECODE", raising=False)


def isas():
    have = native.cpu_features()
    return [setting for setting, isa in native.PATH_OF_SETTING.items() if isa == "scalar" or isa in have]


def bundle_tensors(cfg: PhiConfig, qcfg: QuantConfig, seed: int = 0) -> dict:
    """A random model in the bundle's stored form; norm weights and biases scaled away from 1 / 0
    so a wrong eps or a dropped bias shows (SPEC §1, detail 16)."""
    torch.manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in PhiForCausalLM(cfg).state_dict().items()}
    for k, v in sd.items():
        if "layernorm" in k:
            sd[k] = 1 + 0.3 * torch.randn_like(v) if k.endswith("weight") else 0.3 * torch.randn_like(v)
    linears = set(linear_names(cfg))
    out = {k: (v.half() if k.startswith("embed") else v) for k, v in sd.items() if k.rsplit(".", 1)[0] not in linears}
    for name in linears:
        out.update({f"{name}.{k}": v for k, v in quantize_weight(sd[f"{name}.weight"], qcfg).items()})
        out[f"{name}.bias"] = sd[f"{name}.bias"]
    return out


def models(cfg_name, bits, setting, threads, monkeypatch):
    """(fused, per-layer native, torch reference) over the same stored weights."""
    cfg, group = CONFIGS[cfg_name]
    qcfg = QuantConfig(bits, group if bits == 4 else min(group, 64))
    tensors = bundle_tensors(cfg, qcfg)
    kernels = native.open_kernels(threads, setting=setting)
    assert kernels is not None, native.describe(None, setting)
    fused = build_quant_phi(cfg, tensors, qcfg, kernels=kernels)
    monkeypatch.setenv("TINYV_DECODE", "unfused")
    layered = build_quant_phi(cfg, tensors, qcfg, kernels=kernels)
    reference = build_quant_phi(cfg, tensors, qcfg, kernels=None)
    assert fused.decoder is not None and layered.decoder is None and reference.decoder is None
    assert fused.kv_dtype == torch.float16 and layered.kv_dtype == torch.float32
    return fused, layered, reference


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("setting", isas())
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@torch.inference_mode()
def test_fused_step_matches_the_layer_path(cfg_name, bits, setting, threads, monkeypatch):
    fused, layered, reference = models(cfg_name, bits, setting, threads, monkeypatch)
    cfg = fused.cfg
    limit = cfg.max_positions
    gen = torch.Generator().manual_seed(1)
    loose = 0  # steps where a summation-order difference moved an int8 activation code by one
    for prompt in (0, limit // 2, limit - 1):  # first decoded position: 0, mid-cache, the last one
        embeds = torch.randn(1, prompt + 3, cfg.hidden, generator=gen)
        fused.kv_dtype = torch.float32  # first like for like, then the fp16 cache
        caches = [m.new_cache() for m in (fused, layered, reference)]
        half = fused.new_cache()
        half.k, half.v = half.k.half(), half.v.half()
        if prompt:
            for m, c in zip((fused, layered, reference, fused), caches + [half]):
                m(embeds[:, :prompt], 0, c)
        for pos in range(prompt, min(prompt + 3, limit)):
            x = embeds[:, pos:pos + 1]
            got, want, ref = (m.decode(x, pos, c) for m, c in zip((fused, layered, reference), caches))
            loose += not (close(got, want, 1e-5) and all(
                close(a[:, :, :, pos], b[:, :, :, pos], 1e-5) for a, b in ((caches[0].k, caches[1].k),
                                                                           (caches[0].v, caches[1].v))))
            assert close(got, want, 0.02)
            caches[0].k.copy_(caches[1].k), caches[0].v.copy_(caches[1].v)  # a step's flip stays its own
            assert close(got, ref, 0.04)  # int8 activations vs fp32 ones: ~1.2% measured
            got16 = fused.decode(x, pos, half)
            # fp16 k, v move some int8 activation codes by one step (1/127 of a group's range)
            assert half.k.dtype == torch.float16 and close(got16, ref, 0.04)
            # the cache holds the fp32 path's keys/values rounded to fp16 (layer 0: same input)
            for fp16, fp32 in ((half.k, caches[1].k), (half.v, caches[1].v)):
                assert close(fp16[0, :, :, pos].float(), fp32[0, :, :, pos], 1e-3)
            assert caches[0].length == half.length == pos + 1
        with pytest.raises(ValueError, match="exceeds the context length"):
            fused.decode(embeds[:, :1], limit, half)
    assert loose <= 2  # rare (measured: 0-1 in 40 steps); a wrong eps, bias or rotary fails every step


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("setting", isas())
@torch.inference_mode()
def test_greedy_tokens_equal_the_layer_path(bits, setting, monkeypatch):
    """The layer path's greedy tokens, fed to the fused step (fp32 and fp16 KV): the same argmax at
    every step, except where the layer path's top two logits are closer than the bound a one-step
    int8 code flip can move them by (random weights make such near-ties; a trained model rarely)."""
    from tinyv.engine.generate import decode_one, prefill

    fused, layered, _ = models("tiny", bits, setting, 2, monkeypatch)
    prompt = torch.randn(1, 5, fused.cfg.hidden, generator=torch.Generator().manual_seed(2))
    cache = layered.new_cache()
    logits, tokens, margins = prefill(layered, prompt, cache), [], []
    for pos in range(5, layered.cfg.max_positions):
        top2 = torch.topk(logits, 2).values
        tokens.append(int(torch.argmax(logits)))
        margins.append((top2[0] - top2[1]).item() / logits.abs().max().item())
        logits = decode_one(layered, tokens[-1], pos, cache)
    for kv in (torch.float32, torch.float16):
        fused.kv_dtype = kv
        cache = fused.new_cache()
        logits, checked = prefill(fused, prompt, cache), 0
        for pos, (token, margin) in enumerate(zip(tokens, margins), start=5):
            if margin > 0.04:
                assert int(torch.argmax(logits)) == token, (kv, pos)
                checked += 1
            logits = decode_one(fused, token, pos, cache)
        assert checked >= len(tokens) // 2


@torch.inference_mode()
def test_profile_counts_steps_and_phases(monkeypatch):
    fused, _, _ = models("tiny", 4, "auto", 2, monkeypatch)
    fused.decoder.profile(reset=True)
    cache = fused.new_cache()
    for pos in range(3):
        fused.decode(torch.randn(1, 1, fused.cfg.hidden), pos, cache)
    p = fused.decoder.profile()
    assert p["steps"] == 3 and min(p["gemv_ms"], p["attention_ms"], p["other_ms"]) >= 0
    assert fused.decoder.profile()["steps"] == 0  # reset


def test_decode_setting(monkeypatch, tiny_bundle):
    import tinyv

    monkeypatch.setenv("TINYV_DECODE", "sideways")
    with pytest.raises(TinyVError, match="TINYV_DECODE"):
        tinyv.load(tiny_bundle(4), cache_dir=None)
    for setting, kernels, fused in (("fused", None, True), ("unfused", None, False), ("fused", "torch", False)):
        monkeypatch.setenv("TINYV_DECODE", setting)
        if kernels:
            monkeypatch.setenv("TINYV_KERNELS", kernels)
        with tinyv.load(tiny_bundle(4), cache_dir=None) as engine:
            assert (engine.phi.decoder is not None) == fused
            assert engine.phi.kv_dtype == (torch.float16 if fused else torch.float32)


def caption_tokens(engine, images) -> list[list[int]]:
    return [[s.token for s in engine.stream(image, max_new_tokens=40)] for image in images]


def fp32_kv(engine):
    engine.phi.kv_dtype = torch.float32  # before any call: every cache it makes from now on
    return engine


def greedy_run(engine, image, forced: list[int] | None = None, steps: int = 40):
    """Greedy caption tokens with each step's top-two margin (relative to the logits' range), or
    with ``forced`` tokens fed in: then whether each step's argmax equals the forced token."""
    from tinyv.engine.generate import embed_text, prefill, prefix_embeds

    embeds, _ = engine.encode_image(image)
    before, after = engine.prompt_format.split(None, "caption")
    phi, tok = engine.phi, engine.tokenizer

    @torch.inference_mode()
    def work():
        x = torch.cat([prefix_embeds(phi, tok, before, embeds), embed_text(phi, tok, after)], dim=1)
        cache = phi.new_cache(x.shape[1] + steps)
        logits, out = prefill(phi, x, cache), []
        for i in range(steps):
            top2 = torch.topk(logits, 2).values
            token = int(torch.argmax(logits)) if forced is None else forced[i]
            out.append((token, (top2[0] - top2[1]).item() / logits.abs().max().item()) if forced is None
                       else int(torch.argmax(logits)) == token)
            logits = phi.decode(phi.embed(torch.tensor([[token]])), x.shape[1] + i, cache)
        return out

    return engine.run(work)


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_kv_gives_the_fp32_kv_tokens_on_tiny_bundles(bits, tiny_bundle, scene, other_image):
    """The tiny bundles hold random weights, whose greedy runs meet near-ties that rounding of any
    kind may break either way: the fp32-KV tokens are fed to the fp16-KV engine, whose argmax must
    match wherever the fp32 run's top two logits are apart by more than 1% of their range."""
    import tinyv

    with tinyv.load(tiny_bundle(bits), cache_dir=None) as half, fp32_kv(tinyv.load(tiny_bundle(bits), cache_dir=None)) as full:
        assert half.phi.kv_dtype == torch.float16 and half.phi.decoder is not None
        for image in (scene, other_image):
            run = greedy_run(full, image)
            same = greedy_run(half, image, forced=[t for t, _ in run])
            assert all(ok for ok, (_, margin) in zip(same, run) if margin > 0.01)
            assert sum(same) >= 0.9 * len(same)  # near-ties are few (seen: 3 of 40, margins 0.2-0.3 %)


def test_fp16_kv_gives_the_fp32_kv_tokens_on_the_demo_model():
    import tinyv
    from tinyv.demo.evaluate import HELD_OUT_SEED
    from tinyv.demo.scenes import make_scenes

    images = [s.render() for s in make_scenes(20, HELD_OUT_SEED)]
    with tinyv.load(cache_dir=None) as half, fp32_kv(tinyv.load(cache_dir=None)) as full:
        assert half.phi.decoder is not None and half.phi.kv_dtype == torch.float16
        assert caption_tokens(half, images) == caption_tokens(full, images)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("setting", isas())
@torch.inference_mode()
def test_a_batched_step_gives_each_sequence_its_single_step(bits, setting, monkeypatch):
    """``decode_batch``: M sequences at their own positions over their own caches of different
    lengths in one step. On the fused step (``tv_decode_batch``) every row's logits and cache
    entries are bit for bit the one-sequence step's, for M = 1..6 (4-row passes and 1-3 row
    remainders); the per-layer path's batch (Linears over all rows, attention per sequence) agrees
    with its own single steps."""
    fused, layered, _ = models("tiny", bits, setting, 3, monkeypatch)  # 3 threads: uneven splits
    cfg = fused.cfg
    gen = torch.Generator().manual_seed(3)
    for model in (fused, layered):
        for M in range(1, 7):
            prompts = [torch.randn(1, 1 + (5 * i + M) % 13, cfg.hidden, generator=gen) for i in range(M)]
            alone, together = [], []
            for p in prompts:
                for caches in (alone, together):
                    caches.append(model.new_cache(p.shape[1] + 1 + len(caches) % 3))
                    model(p, 0, caches[-1])
            x = torch.randn(M, 1, cfg.hidden, generator=gen)
            positions = [p.shape[1] for p in prompts]
            got = model.decode_batch(x, positions, together)
            assert got.shape == (M, cfg.vocab_size)
            for i in range(M):
                want = model.decode(x[i:i + 1], positions[i], alone[i])
                if model is fused:
                    assert torch.equal(got[i], want), (M, i)
                    assert torch.equal(together[i].k, alone[i].k) and torch.equal(together[i].v, alone[i].v)
                else:
                    assert close(got[i], want, 1e-5), (M, i)
                assert together[i].length == positions[i] + 1
    cache = fused.new_cache(4)
    with pytest.raises(ValueError, match="exceeds the context length"):
        fused.decode_batch(torch.zeros(1, 1, cfg.hidden), [4], [cache])
    with pytest.raises(ValueError, match="positions"):
        fused.decode_batch(torch.zeros(2, 1, cfg.hidden), [0], [cache])

"""The figures of ``tinyv bench``: llama-bench's (pp, tg) plus the vision stage llama-bench lacks.

Every figure is mean ± std over ``runs``, prefill and decode apart, with peak RSS, bits per weight
and the achieved bandwidth (LLM weight bytes read per token × tokens/s).
"""
from __future__ import annotations

import statistics
import time

import torch

from tinyv.engine.cache import image_key
from tinyv.engine.generate import decode_one, prefill, torch_threads
from tinyv.engine.memory import peak_rss_mb


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
        "runs": len(values),
    }


def bench_image(size: int = 448):
    """A deterministic photo-like test image (shapes over a gradient)."""
    from PIL import Image, ImageDraw

    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((size // 8, size // 3, size // 2, 2 * size // 3), fill=(220, 30, 30))
    d.rectangle((5 * size // 8, size // 3, 7 * size // 8, 2 * size // 3), fill=(30, 60, 220))
    return img


def run_bench(engine, image=None, runs: int = 3, pp=(64, 512), tg: int = 128, seed: int = 0, progress=None,
              llm_only: bool = False) -> dict:
    """The figures as a dict; ``llm_only`` skips the vision graph (never loaded), so the peak RSS
    is the language model's alone."""
    say = progress or (lambda msg: None)
    image = image if image is not None else bench_image()
    out: dict = {"bundle": engine.bundle, "threads": engine.threads, "llm_only": llm_only}
    gpu = engine.placement.torch_device if engine.placement is not None and engine.placement.on_gpu else None
    if gpu is not None:
        out.update(_gpu_load_figures(engine, gpu))
    if not llm_only:
        say("first call")
        out["ttft_first_call_ms"] = _first_call_ttft(engine, image)
        _bench_vision(engine, image, runs, out, say)
    engine.run(lambda: _bench_llm(engine, runs, pp, tg, seed, out, say))  # where the engine's model work runs
    wb = engine.weight_bytes
    q = engine.manifest["quantization"]
    out.update({
        "bits_per_weight": q["bits_per_weight"],
        "llm_weight_bytes": wb,
        "achieved_gb_s": wb * out[f"tg{tg}_tok_s"]["mean"] / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "kernels": engine.kernel_path,
        "vision": engine.manifest["vision"]["precision"],
    })
    if not llm_only:
        out["vision_runtime"] = engine.vision_path
    if gpu is not None:
        from tinyv.engine.gpu import gpu_memory_figures

        out.update(gpu_memory_figures(gpu))  # peaks since the load's were read: inference alone
        if not llm_only:
            out["vision_provider"] = engine.vision.get_providers()[0]
    return out


def _gpu_load_figures(engine, device) -> dict:
    """The plan and the GPU memory after loading (peak during the conversion too); the peak
    counters are then reset, so the figures at the end are those of inference."""
    from tinyv.engine.gpu import gpu_memory_figures

    plan = engine.placement.plan
    out = {"device": str(device), "gpu_plan": {"budget_mb": plan.budget / 2**20, "total_mb": plan.total / 2**20,
                                              "vision_on_gpu": plan.vision_on_gpu, "kv_positions": plan.kv_positions,
                                              "parts_mb": {k: v / 2**20 for k, v in plan.parts.items()}}}
    sqnr = list(engine.phi.conversion_sqnr().values())
    if sqnr:
        out["conversion_sqnr_db"] = {"min": min(sqnr), "mean": sum(sqnr) / len(sqnr)}
    if device.type == "cuda":
        out["gpu_after_load"] = gpu_memory_figures(device)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _first_call_ttft(engine, image) -> float:
    """Milliseconds from the engine's first ``stream`` call (a new image) to its first token: what
    a user who just loaded the model waits, the vision graph's opening included."""
    t = time.perf_counter()
    steps = iter(engine.stream(image, max_new_tokens=1))
    next(steps)
    ms = (time.perf_counter() - t) * 1000
    for _ in steps:
        pass
    return ms


def _bench_vision(engine, image, runs, out, say):
    key = image_key(image, engine.vision_id)
    say("vision")
    engine.encode_image(image, use_cache=False)  # warm-up
    uncached, cached = [], []
    for _ in range(runs):
        t = time.perf_counter()
        engine.encode_image(image, use_cache=False)
        uncached.append((time.perf_counter() - t) * 1000)
    engine.encode_image(image)
    for _ in range(runs):
        t = time.perf_counter()
        engine.encode_image(image)
        cached.append((time.perf_counter() - t) * 1000)
    out["image_encode_ms"] = {"uncached": _stats(uncached), "cached": _stats(cached)}

    say("ttft")
    ttft_cold, ttft_warm = [], []
    for _ in range(runs):
        engine.cache.drop(key)
        engine.run(engine.prefixes.clear)  # nor the image's prompt prefix (its KV holds the image)
        last = list(engine.stream(image, max_new_tokens=1))[-1]
        ttft_cold.append(last.timings["ttft_ms"])
        last = list(engine.stream(image, max_new_tokens=1))[-1]
        ttft_warm.append(last.timings["ttft_ms"])
    out["ttft_ms"] = {"image_uncached": _stats(ttft_cold), "image_cached": _stats(ttft_warm)}


def _bench_llm(engine, runs, pp, tg, seed, out, say):
    with torch_threads(engine.llm_torch_threads):  # as the engine's worker runs the LLM
        _bench_llm_figures(engine, runs, pp, tg, seed, out, say)


def _bench_llm_figures(engine, runs, pp, tg, seed, out, say):
    phi = engine.phi
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.tokenizer.size

    def random_embeds(n):
        return phi.embed(torch.randint(0, vocab, (1, n), generator=gen))

    for n in pp:
        say(f"pp{n}")
        prefill(phi, random_embeds(8), phi.new_cache(8))  # warm-up
        times = []
        for _ in range(runs):
            x = random_embeds(n)
            cache = phi.new_cache(n)
            t = time.perf_counter()
            prefill(phi, x, cache)
            times.append(n / (time.perf_counter() - t))
        out[f"pp{n}_tok_s"] = _stats(times)

    say(f"tg{tg}")
    rates = []
    for _ in range(runs):
        cache = phi.new_cache(64 + tg)
        logits = prefill(phi, random_embeds(64), cache)
        t = time.perf_counter()
        for i in range(tg):
            logits = decode_one(phi, int(torch.argmax(logits)), 64 + i, cache)
        rates.append(tg / (time.perf_counter() - t))
    out[f"tg{tg}_tok_s"] = _stats(rates)


def format_bench(r: dict, tg: int = 128) -> str:
    def ms(s):
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    loaded = f", loaded in {r['load_ms'] / 1000:.1f} s" if "load_ms" in r else ""
    lines = [
        f"bundle {r['bundle']}  ({r['bits_per_weight']:.2f} bits/weight, vision {r['vision']}, {r['threads']} threads"
        f"{loaded})",
        f"kernels: {r['kernels']}",
    ]
    if not r.get("llm_only"):
        lines += [
            f"vision: {r['vision_runtime']}",
            f"image encode   uncached {ms(r['image_encode_ms']['uncached'])} ms   cached {ms(r['image_encode_ms']['cached'])} ms",
            f"TTFT           image uncached {ms(r['ttft_ms']['image_uncached'])} ms   cached {ms(r['ttft_ms']['image_cached'])} ms"
            f"   first call after load {r['ttft_first_call_ms']:.0f} ms",
        ]
    for k in sorted(k for k in r if k.startswith("pp")):
        lines.append(f"{k[:-6]:<14} {ms(r[k])} tok/s")
    lines.append(f"tg{tg:<12} {ms(r[f'tg{tg}_tok_s'])} tok/s   ({r['achieved_gb_s']:.2f} GB/s of "
                 f"{r['llm_weight_bytes'] / 1e6:.1f} MB weights per token)")
    lines.append(f"peak RSS       {r['peak_rss_mb']:.0f} MB" + ("  (language model alone: vision not loaded)" if r.get("llm_only") else ""))
    if "gpu_peak_allocated_mb" in r:
        lines.append(f"peak GPU       {r['gpu_peak_allocated_mb']:.0f} MB allocated by torch while running "
                     f"({r['gpu_after_load']['gpu_peak_allocated_mb']:.0f} MB while loading); device memory in use "
                     f"{r['gpu_used_mb']:.0f} MB (every allocator and context; plan {r['gpu_plan']['total_mb']:.0f} MB)")
    return "\n".join(lines)

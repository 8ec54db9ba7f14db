"""The GPU figures of issue 18, on a machine with a CUDA GPU: full-size random checkpoints, export,
then per bundle the GPU tests, ``tinyv bench --device cuda`` and greedy agreement with the CPU path.

    pip install ".[gpu]"                  # bitsandbytes; a CUDA build of torch must be installed
    pip install onnxruntime-gpu           # optional: the vision graph on the GPU too
    python benchmarks/gpu_end_to_end.py --preset small --dir /tmp/tinyv-small --bits 4   # ~a minute: the code paths
    python benchmarks/gpu_end_to_end.py --dir /tmp/tinyv-full --bits 4 8                 # the figures (full size)

Time: the full-size checkpoints are ~16 GB to write and a 4-bit export took 454 s on a 2-core
CPU (8-bit: 586 s); with a short device lease run ``--bits 4`` alone (and ``--skip-tests``).

Steps (each bundle in its own processes; prints one JSON object at the end, and a line per step
on stderr as it goes):

1. ``benchmarks/end_to_end.py --preset stage4 --skip-bench``: writes the full-size random
   checkpoints (once, kept in ``--dir``) and exports ``--bits`` with ``--vision`` (fp32 default);
   an existing bundle is reused with ``--reuse``.
2. ``pytest -m gpu tests/test_gpu.py`` (the marked tests: tiny bundles and the demo model on CUDA).
3. ``tinyv bench --device cuda --json`` per bundle: TTFT (image uncached / cached), prefill,
   decode tok/s, peak GPU memory (torch's peak while loading and while running, and the device's
   memory in use: CUDA context and ONNX Runtime's arena included), against the plan.
4. Agreement: the same image embeddings through the CPU engine and the CUDA engine; greedy tokens
   of the CPU path teacher-forced through both (caption and VQA prompts, ``--steps`` tokens), and
   whether free-running greedy outputs are identical; the bundle's own agreement with fp32
   (``manifest.quality``) for scale.

Targets (issue 18): the whole pipeline <= 7 GB at 4 bits (``gpu_used_mb``), decode >= 60 tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def say(msg: str) -> None:
    print(f"[gpu_end_to_end] {msg}", file=sys.stderr, flush=True)


def run_json(cmd: list[str], timeout: float | None = None) -> dict:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"failed": " ".join(cmd[-6:]), "rc": p.returncode, "stderr_tail": p.stderr[-3000:]}
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return {**out, "wall_s": round(time.perf_counter() - t, 1)}


def agreement(bundle: str, steps: int) -> dict:
    """CPU engine vs CUDA engine on one bundle (run in its own process: ``--agreement``)."""
    import torch

    import tinyv
    from tinyv.cli.bench_figures import bench_image
    from tinyv.engine.generate import GenerationOptions, build_prompt_embeds, generate
    from tinyv.engine.prompts import build_prompt, split_prompt

    image = bench_image()
    cpu = tinyv.load(bundle, cache_dir=None)
    dev = tinyv.load(bundle, device="cuda", cache_dir=None)
    embeds, _ = cpu.encode_image(image)
    dev_embeds, _ = dev.encode_image(image)
    cos = torch.nn.functional.cosine_similarity(embeds.flatten().double(), dev_embeds.flatten().double(), dim=0)

    def greedy(phi, tok, prompt):
        before, after = split_prompt(prompt)
        return [s.token for s in generate(phi, tok, before, embeds, after, GenerationOptions(max_new_tokens=steps),
                                          stop_strings=("\0",))]

    def forced(phi, tok, prompt, tokens):
        with torch.inference_mode():
            x = build_prompt_embeds(phi, tok, prompt, embeds)
            seq = torch.cat([x, phi.embed(torch.tensor([tokens[:-1]]))], dim=1)
            return phi.logits(phi(seq, 0, phi.new_cache(seq.shape[1]))[0, x.shape[1] - 1:]).float()

    out = {"vision_cosine_gpu_vs_cpu": cos.item(), "prompts": []}
    for prompt in (build_prompt(4), build_prompt(4, "what colour is the circle?", task="vqa")):
        tokens = greedy(cpu.phi, cpu.tokenizer, prompt)
        a, b = forced(cpu.phi, cpu.tokenizer, prompt, tokens), forced(dev.phi, dev.tokenizer, prompt, tokens)
        ra, rb = a.log_softmax(-1), b.log_softmax(-1)
        dev_tokens = greedy(dev.phi, dev.tokenizer, prompt)
        first_diff = next((i for i, (x, y) in enumerate(zip(tokens, dev_tokens)) if x != y), None)
        out["prompts"].append({
            "prompt": prompt[-40:], "tokens": len(tokens),
            "teacher_forced_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "kl_mean": (ra.exp() * (ra - rb)).sum(-1).mean().item(),
            "greedy_identical": tokens == dev_tokens, "first_divergence": first_diff,
        })
    out["bundle_vs_fp32"] = {k: cpu.manifest.get("quality", {}).get(k) for k in ("token_agreement", "kl_mean", "steps")}
    out["conversion_sqnr_db_min"] = min(dev.phi.conversion_sqnr().values(), default=None)
    out["plan"] = dev.placement.plan.describe()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="stage4", help="stage4 = full size (the figures); small = a quick check")
    ap.add_argument("--dir", default="/tmp/tinyv-full", help="checkpoints (written if absent)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--vision", default="fp32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="tokens for the agreement check")
    ap.add_argument("--max-gpu-memory", default="8GB")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already exported in <dir>-bundle-q*")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--agreement", metavar="BUNDLE", help=argparse.SUPPRESS)  # internal: one bundle's check
    args = ap.parse_args()
    if args.agreement:
        print(json.dumps(agreement(args.agreement, args.steps)))
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU visible to torch {torch.__version__}: run this on a GPU machine")
    result = {"preset": args.preset, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "gpu_total_mb": torch.cuda.get_device_properties(0).total_memory / 2**20}
    try:
        import bitsandbytes
        import onnxruntime

        result.update(bitsandbytes=bitsandbytes.__version__, onnxruntime=onnxruntime.__version__,
                      ort_providers=onnxruntime.get_available_providers())
    except ImportError as e:
        raise SystemExit(f"{e}: pip install '.[gpu]' first")
    py = sys.executable
    bundles = {b: f"{args.dir}-bundle-q{b}-{args.vision}" for b in args.bits}
    todo = [b for b in args.bits if not (args.reuse and os.path.exists(os.path.join(bundles[b], "manifest.json")))]
    if todo:
        say(f"checkpoints + export {todo} (full size: minutes)")
        p = subprocess.run([py, os.path.join(HERE, "end_to_end.py"), "--preset", args.preset, "--dir", args.dir,
                            "--vision", args.vision, "--skip-bench", "--bits", *map(str, todo)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"export failed:\n{p.stderr[-3000:]}")
        result["export"] = json.loads(p.stdout)
    if not args.skip_tests:
        say("pytest -m gpu")
        p = subprocess.run([py, "-m", "pytest", "-q", "-m", "gpu", "-n", "0", "-s", "tests/test_gpu.py"],
                           capture_output=True, text=True, cwd=REPO)
        result["gpu_tests"] = {"rc": p.returncode, "tail": p.stdout[-2500:]}
    tinyv = [py, "-m", "tinyv.cli.main"]
    for bits in args.bits:
        say(f"bench q{bits}")
        bench = run_json(tinyv + ["bench", "--bundle", bundles[bits], "--device", "cuda", "--max-gpu-memory",
                                  args.max_gpu_memory, "--runs", str(args.runs), "--json"])
        say(f"agreement q{bits}")
        agree = run_json([py, __file__, "--agreement", bundles[bits], "--steps", str(args.steps)])
        entry = {"bench": bench, "agreement": agree}
        if "tg128_tok_s" in bench:
            entry["targets"] = {
                "decode_tok_s": bench["tg128_tok_s"]["mean"], "decode_ge_60": bench["tg128_tok_s"]["mean"] >= 60,
                "device_used_mb": bench.get("gpu_used_mb"), "whole_pipeline_le_7gb": bench.get("gpu_used_mb", 1e9) <= 7 * 1024,
                "ttft_ms": bench.get("ttft_ms"), "plan_total_mb": bench["gpu_plan"]["total_mb"],
            }
        result[f"q{bits}"] = entry
        say(json.dumps({f"q{bits}": entry.get("targets", entry)}))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

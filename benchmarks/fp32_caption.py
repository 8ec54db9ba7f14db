"""Load and caption with random checkpoints in the real formats, fp32 (the foundation's figures).

    python benchmarks/fp32_caption.py --preset stage4 --dir /tmp/tinyv-full   # full size
    python benchmarks/fp32_caption.py --preset small                          # minutes, not hours

Writes the checkpoints once (kept in --dir), then loads and captions in a fresh process so its
peak RSS is the load + caption alone. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "red_circle_blue_square.png")


def measure(args) -> dict:
    import torch

    import tinyv
    from tinyv.engine.memory import peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = dict(phi2=f"{args.dir}/phi-2", vit=f"{args.dir}/eva_vit_g.pth",
                 qformer=f"{args.dir}/blip2_pretrained_flant5xxl.pth", stage=f"{args.dir}/TinyGPT-V_for_Stage4.pth")
    t = time.perf_counter()
    model = tinyv.TinyGPTV.from_checkpoints(**paths, preset=args.preset)
    load_s = time.perf_counter() - t
    rss_after_load = peak_rss_mb()
    n_params = sum(p.numel() for p in model.parameters())
    runs = []
    for _ in range(args.runs):
        steps = list(model.stream(EXAMPLE, max_new_tokens=args.tokens, greedy=True))
        runs.append(steps[-1].timings)
    med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2]  # noqa: E731
    return {
        "preset": args.preset,
        "params": n_params,
        "load_s": round(load_s, 2),
        "peak_rss_after_load_mb": round(rss_after_load),
        "image_ms_median": round(med("image_ms")),
        "ttft_ms_median": round(med("ttft_ms")),
        "prefill_tok_s_median": round(med("prefill_tok_s"), 1),
        "decode_tok_s_median": round(med("decode_tok_s"), 2),
        "new_tokens": runs[0]["new_tokens"],
        "peak_rss_mb": round(peak_rss_mb()),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = args.dir or f"/tmp/tinyv-ckpt-{args.preset}"
    if args.measure_only:
        print(json.dumps(measure(args)))
        return
    write_s = None
    if not os.path.exists(os.path.join(args.dir, "TinyGPT-V_for_Stage4.pth")):
        from tinyv.testing import write_checkpoints

        t = time.perf_counter()
        write_checkpoints(args.dir, args.preset, seed=0)
        write_s = round(time.perf_counter() - t, 1)
    cmd = [sys.executable, __file__, "--measure-only", "--preset", args.preset, "--dir", args.dir,
           "--tokens", str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads)]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out["write_checkpoints_s"] = write_s
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""End to end on random checkpoints in the real formats: write, export at each --bits, bench.

    python benchmarks/end_to_end.py --preset stage4 --dir /tmp/tinyv-full --bits 4 8   # full size
    python benchmarks/end_to_end.py --preset small --bits 4                             # minutes

Each export and each bench runs in its own process; its peak RSS is read from the kernel
(``RUSAGE_CHILDREN`` of a helper process that runs just that command). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RSS_WRAPPER = (
    "import resource, subprocess, sys, json;"
    "rc = subprocess.run(sys.argv[1:]).returncode;"
    "print(json.dumps({'rc': rc, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}), file=sys.stderr)"
)


def run(cmd: list[str]) -> tuple[dict | None, float, float]:
    """(stdout JSON, seconds, peak RSS MB) of a command."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RSS_WRAPPER] + cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    meta = json.loads(p.stderr.strip().splitlines()[-1])
    if meta["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return (json.loads(p.stdout) if p.stdout.strip() else None), seconds, meta["peak_rss_mb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--vision", default="fp32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bundles", default=None, help="bundle folder prefix (default: <dir>-bundle)")
    args = ap.parse_args()
    folder = args.dir or f"/tmp/tinyv-ckpt-{args.preset}"
    result = {"preset": args.preset, "checkpoints": folder}
    if not os.path.exists(os.path.join(folder, "TinyGPT-V_for_Stage4.pth")):
        from tinyv.testing import write_checkpoints

        t = time.perf_counter()
        write_checkpoints(folder, args.preset, seed=0)
        result["write_checkpoints_s"] = round(time.perf_counter() - t, 1)
    ck = ["--phi2", f"{folder}/phi-2", "--vit", f"{folder}/eva_vit_g.pth",
          "--qformer", f"{folder}/blip2_pretrained_flant5xxl.pth", "--stage", f"{folder}/TinyGPT-V_for_Stage4.pth",
          "--preset", args.preset]
    tinyv = [sys.executable, "-m", "tinyv.cli.main"]
    for bits in args.bits:
        out = f"{args.bundles or folder + '-bundle'}-q{bits}-{args.vision}"
        summary, seconds, rss = run(tinyv + ["export", "--bits", str(bits), "--vision", args.vision, "-o", out,
                                             "--force", "--json"] + ck)
        entry = {"export": {**summary, "wall_s": round(seconds, 1), "peak_rss_mb": round(rss)}}
        if not args.skip_bench:
            cmd = tinyv + ["bench", "--bundle", out, "--runs", str(args.runs), "--json"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            bench, seconds, rss = run(cmd)
            entry["bench"] = {**bench, "process_peak_rss_mb": round(rss)}
        result[f"q{bits}"] = entry
        print(json.dumps({f"q{bits}": entry}), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

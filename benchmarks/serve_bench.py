"""``tinyv serve`` under load: batched decode speed, the server's added latency, greedy identity.

    python benchmarks/serve_bench.py                                  # the built-in model
    python benchmarks/serve_bench.py --bundle tinygptv-q4 --threads 2 # a full-size bundle

Measures (the engine here and ``tinyv serve`` in a process of its own — so its clients here never
share its interpreter — then ``tinyv caption`` in-process, all on one embedding cache, so the
image is encoded once; the weights are memory-mapped, so the loads share their pages):

1. the batched decode step alone (``PhiForCausalLM.decode_batch`` on the engine's worker): step
   time and aggregate tok/s for 1, 2, 4 and 8 sequences over real prompt caches;
2. through the server with the official ``openai`` client, the image's prefix cached: one
   stream's decode tok/s, then ``--streams`` concurrent streams' aggregate decode tok/s (tokens
   emitted while all of them were decoding, over that window); these answers run to ``--tokens``
   (``ignore_eos``: the built-in model would stop after a dozen);
3. TTFT of ``Engine.stream`` here and of the same request through the server (HTTP, JSON, base64,
   image check and scheduling included), in turns, prefix cached, ``--ttft-runs`` pairs; the
   median of the pairs' differences is the server's added latency;
4. the server's greedy answer against ``tinyv caption --json``'s.

Medians of ``--runs``. Prints a table and one JSON object (``--json``: the object only). The
machine's load average is printed with the figures: on a shared machine they move with it.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

QUESTIONS = ["What is in this picture?", "Describe the colours.", "What is on the left?", "Is there a person?",
             "What shape is it?", "How many objects are there?", "Where was this taken?", "What is it made of?"]


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def demo_image():
    from tinyv.demo.scenes import make_scene
    import random

    return make_scene(random.Random(3)).render()


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def step_scaling(engine, image, runs: int, sizes=(1, 2, 4, 8)) -> list[dict]:
    """decode_batch step time for M sequences whose caches hold the prompt of ``image``; the sizes
    take turns step by step, so a busy machine weighs on all of them alike."""
    import torch

    from tinyv.engine.generate import start_answer, torch_threads

    phi, tok = engine.phi, engine.tokenizer

    def measure():
        before, after = engine.prompt_format.split()
        ids = tok.encode(after)
        batches = {}
        for M in sizes:
            starts = []
            for _ in range(M):
                prefix, _ = engine._prefix(image, before, len(ids) + runs + 4)
                starts.append(start_answer(phi, tok, prefix, ids, runs + 2, room=runs + 2))
            batches[M] = starts
        token = int(torch.argmax(batches[sizes[0]][0].logits))
        times = {M: [] for M in sizes}
        # torch's own pool as the engine has it while decoding (its spinning threads would take the
        # kernels' cores)
        with torch.inference_mode(), torch_threads(engine.llm_torch_threads):
            for r in range(runs + 1):  # the first round warms each size's scratch
                for M, starts in batches.items():
                    embeds = phi.embed(torch.full((M, 1), token, dtype=torch.long))
                    t0 = time.perf_counter()
                    phi.decode_batch(embeds, [s.length + r for s in starts], [s.cache for s in starts])
                    times[M].append(time.perf_counter() - t0)
        out = []
        for M in sizes:
            step = statistics.median(times[M][1:])
            out.append({"sequences": M, "step_ms": step * 1000, "aggregate_tok_s": M / step})
        for row in out:
            row["vs_one"] = row["aggregate_tok_s"] / out[0]["aggregate_tok_s"]
        return out

    return engine.run(measure)


def stream_times(client, image_url: str, question: str, tokens: int, temperature: float,
                 start: threading.Barrier | None = None) -> dict:
    """One streamed answer's times: ``sent``, ``first`` (the first chunk, sent once the first token
    exists: the TTFT), ``last`` (the chunk with the finish reason) and its token count."""
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="m", stream=True, max_tokens=tokens, temperature=temperature, seed=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": question}]}])
    first = last = usage = None
    for chunk in stream:
        first = first or time.perf_counter()
        if chunk.choices and chunk.choices[0].finish_reason:
            last, usage = time.perf_counter(), chunk.usage
    return {"sent": t0, "first": first, "last": last, "tokens": usage.completion_tokens}


def decode_rate(r: dict) -> float:
    """Tokens after the first, per second (the answer's own steps come at a steady pace)."""
    return (r["tokens"] - 1) / (r["last"] - r["first"])


def concurrent(client, image_url: str, n: int, tokens: int, temperature: float) -> dict:
    """``n`` streams started together: tokens made while all of them were decoding (each at its
    own steady pace over that window), per second."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        results[i] = stream_times(client, image_url, QUESTIONS[i % len(QUESTIONS)], tokens, temperature, barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lo = max(r["first"] for r in results)  # all have their first token
    hi = min(r["last"] for r in results)  # none has finished
    inside = sum(decode_rate(r) * (hi - lo) for r in results) if hi > lo else 0.0
    return {"streams": n, "window_s": hi - lo, "tokens_in_window": inside,
            "aggregate_tok_s": inside / (hi - lo) if hi > lo else None, "tokens": [r["tokens"] for r in results]}


def progress(what: str, value) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {json.dumps(value)}", file=sys.stderr, flush=True)


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``tinyv serve`` in its own process (its clients here do not share its interpreter)."""
    cmd = [sys.executable, "-m", "tinyv.cli.main", "serve", "--port", "0", "--threads", str(args.threads),
           "--max-batch", str(max(8, args.streams))] + (["--bundle", args.bundle] if args.bundle else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = ""
    while "http://" not in line:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"tinyv serve ended before it printed its URL (exit {proc.wait()})")
    return proc, line.split(" at ", 1)[1].split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the built-in model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per answer")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ttft-runs", type=int, default=20, help="pairs of TTFT measurements (part 3)")
    ap.add_argument("--step-runs", type=int, default=10, help="rounds of batched steps (part 1)")
    ap.add_argument("--image", default=None, help="an image file (default: a generated scene)")
    ap.add_argument("--temperature", type=float, default=0.0, help="for the speed runs (greedy by default)")
    ap.add_argument("--cache", default=None, help="embedding cache folder (default: a new one; give one to "
                    "keep a full-size image's embeddings between runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # one embedding cache for this process, the CLI and the server: the image is encoded once
    os.environ["TINYV_CACHE"] = args.cache or tempfile.mkdtemp(prefix="tinyv-serve-bench-")

    import openai
    import tinyv
    from click.testing import CliRunner
    from PIL import Image

    from tinyv.cli.main import cli

    if args.image:  # its own bytes, as an app would send the photo
        raw = open(args.image, "rb").read()
        mime = Image.MIME[Image.open(io.BytesIO(raw)).format]
    else:
        raw, mime = png_bytes(demo_image()), "image/png"
    image_url = f"data:{mime};base64," + base64.b64encode(raw).decode()
    t = time.perf_counter()
    engine = tinyv.load(args.bundle, threads=args.threads)
    out = {"bundle": args.bundle or "built-in demo", "threads": args.threads, "temperature": args.temperature,
           "load_s": time.perf_counter() - t, "kernels": engine.kernel_path, "load_avg_start": load_avg()}
    t = time.perf_counter()
    engine.encode_image(raw)  # vision once; everything after meets cached embeddings
    out["image_encode_s"] = time.perf_counter() - t
    progress("image encoded, s", out["image_encode_s"])
    out["step"] = step_scaling(engine, raw, args.step_runs)
    progress("batched steps", out["step"])

    def engine_ttft():  # Engine.stream, the image's prefix cached (the first call caches it)
        t0 = time.perf_counter()
        it = engine.stream(raw, QUESTIONS[0], max_new_tokens=2)
        next(it)
        ttft = time.perf_counter() - t0
        for _ in it:
            pass
        return ttft

    # TTFT: the same request through Engine.stream here and through the server in its own process
    # (its event loop never waits for this interpreter), in turns, so a busy machine weighs on both
    proc, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
        for _ in range(2):  # both prefix caches warm, both sides' first-call costs paid
            engine_ttft()
            stream_times(client, image_url, QUESTIONS[0], 2, 0.0)
        pairs = []
        for _ in range(args.ttft_runs):
            e_ttft = engine_ttft()
            s = stream_times(client, image_url, QUESTIONS[0], 2, 0.0)
            pairs.append((e_ttft, s["first"] - s["sent"]))
        out["engine_ttft_ms"] = statistics.median(p[0] for p in pairs) * 1000
        out["server_ttft_ms"] = statistics.median(p[1] for p in pairs) * 1000
        out["server_added_ms"] = statistics.median(p[1] - p[0] for p in pairs) * 1000
        out["server_added_pct_of_ttft"] = 100 * out["server_added_ms"] / out["engine_ttft_ms"]
        progress("TTFT pairs (Engine.stream, server), ms", [[round(x * 1000, 1) for x in p] for p in pairs])
        engine.close()
        del engine
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(raw)
            f.flush()
            r = CliRunner().invoke(cli, ["caption", f.name, "--json", "--max-new-tokens", str(args.tokens),
                                         "--threads", str(args.threads)] + (["--bundle", args.bundle] if args.bundle else []))
            assert r.exit_code == 0, r.output
            cli_text = json.loads(r.stdout.strip().splitlines()[-1])["text"]
        singles, runs = [], []
        for _ in range(args.runs):  # one stream, then several, in turns: load moves both alike
            singles.append(stream_times(client, image_url, QUESTIONS[0], args.tokens, args.temperature))
            runs.append(concurrent(client, image_url, args.streams, args.tokens, args.temperature))
            progress("one stream, tok/s", decode_rate(singles[-1]))
            progress(f"{args.streams} streams", runs[-1])
        out["one_stream_decode_tok_s"] = statistics.median(decode_rate(s) for s in singles)
        out["one_stream_tokens"] = [s["tokens"] for s in singles]
        out["concurrent"] = runs
        paired = [(r["aggregate_tok_s"], decode_rate(s)) for r, s in zip(runs, singles) if r["aggregate_tok_s"]]
        if not paired:
            raise SystemExit("the concurrent streams never all decoded at once: give more --tokens")
        agg = statistics.median(p[0] for p in paired)
        out[f"{args.streams}_streams_aggregate_tok_s"] = agg
        out["aggregate_vs_one"] = statistics.median(a / one for a, one in paired)  # each run against its own turn
        # greedy identity: the default caption request through the server, against the CLI's
        r = client.chat.completions.create(model="m", max_tokens=args.tokens, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}])
        out["greedy_identical_to_cli"] = r.choices[0].message.content == cli_text
        out["cli_text"] = cli_text[:80]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    out["load_avg_end"] = load_avg()
    if not args.json:
        print(f"{out['bundle']}, {args.threads} threads, {out['kernels']}; load average {out['load_avg_start']} -> "
              f"{out['load_avg_end']}")
        for row in out["step"]:
            print(f"  decode_batch x{row['sequences']}: {row['step_ms']:.1f} ms/step, "
                  f"{row['aggregate_tok_s']:.1f} tok/s ({row['vs_one']:.2f}x one)")
        print(f"  server, one stream: {out['one_stream_decode_tok_s']:.1f} tok/s; {args.streams} streams: "
              f"{agg:.1f} tok/s aggregate ({out['aggregate_vs_one']:.2f}x, median of each run against its turn)")
        print(f"  TTFT (prefix cached): Engine.stream {out['engine_ttft_ms']:.1f} ms, server {out['server_ttft_ms']:.1f}"
              f" ms: added {out['server_added_ms']:.1f} ms = {out['server_added_pct_of_ttft']:.1f} % of TTFT")
        print(f"  greedy answer identical to tinyv caption's: {out['greedy_identical_to_cli']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

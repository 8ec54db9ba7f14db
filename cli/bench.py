"""tinyv bench: speed and memory of a bundle."""
from __future__ import annotations

import json
import time

import click

from tinyv.cli.main import cli, device_options, use_tinyv_image_limit


@cli.command("bench")
@click.option("--bundle", "-b", help="Bundle to measure, a folder or hf://owner/repo (default: the built-in model).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Image for the vision figures.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads.")
@click.option("--pp", default="64,512", show_default=True, help="Prompt lengths for prefill figures.")
@click.option("--tg", type=click.IntRange(min=1), default=128, show_default=True, help="Tokens to decode.")
@click.option("--llm-only", is_flag=True, help="Skip the vision graph (never loaded): the language model's own speed and peak RSS.")
@click.option("--json", "as_json", is_flag=True)
@device_options
def bench_cmd(bundle, image, runs, threads, pp, tg, llm_only, as_json, device, max_gpu_memory):
    """Image encode (uncached/cached), TTFT, prefill pp64/pp512 and decode tg128, mean ± std (on
    --device cuda also the peak GPU memory)."""
    from tinyv.cli.bench_figures import format_bench, run_bench
    import tinyv
    from tinyv.errors import TinyVError

    try:
        lengths = tuple(int(x) for x in pp.split(",") if x.strip())
    except ValueError:
        raise TinyVError(f"--pp takes comma-separated token counts, e.g. 64,512; got {pp!r}") from None
    if image is not None:
        from tinyv.engine.image import check_image

        use_tinyv_image_limit()
        check_image(image)  # before minutes of measuring
    started = time.perf_counter()
    engine = tinyv.load(bundle, threads=threads, cache_dir=None, announce=lambda m: click.echo(m, err=True),
                        device=device, max_gpu_memory=max_gpu_memory, preload_vision=not llm_only)
    load_ms = (time.perf_counter() - started) * 1000
    limit = engine.config.phi.max_positions
    if any(n < 1 or n + tg > limit for n in lengths) or 64 + tg > limit:
        raise TinyVError(f"prompt lengths plus --tg must fit the context of {limit} tokens")
    r = {"load_ms": load_ms, **run_bench(engine, image, runs=runs, pp=lengths, tg=tg, llm_only=llm_only,
                                         progress=lambda m: click.echo(f"bench: {m}", err=True))}
    click.echo(json.dumps(r) if as_json else format_bench(r, tg))

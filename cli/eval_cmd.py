"""tinyv eval: accuracy on held-out generated scenes (the demo model's task), as a table or JSON."""
from __future__ import annotations

import json
import sys

import click

from tinyv.cli.main import CHECKPOINT_OPTIONS, checkpoint_options, checkpoint_sources, cli
from tinyv.demo.evaluate import DEFAULT_IMAGES, HELD_OUT_SEED  # a light import: torch loads on use


@cli.command("eval")
@click.option("--bundle", "-b", "bundles", multiple=True,
              help="Bundle to score, a folder or hf://owner/repo (repeatable). Default, with no checkpoints "
                   "either: the built-in demo bundle.")
@checkpoint_options
@click.option("--images", "-n", type=click.IntRange(min=1), default=DEFAULT_IMAGES, show_default=True,
              help="Held-out scenes to generate.")
@click.option("--seed", type=int, default=HELD_OUT_SEED, show_default=True,
              help="Seed of the held-out scenes (the demo model was trained on seed 0).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def eval_cmd(bundles, images, seed, threads, as_json, **ckpt):
    """Score models on generated scenes: caption exact match and token F1, VQA accuracy by type.

    The checkpoint options (--phi2 --vit --qformer --stage, --preset default demo) add the fp32
    torch reference; each --bundle adds a bundle.
    """
    from tinyv.demo.evaluate import evaluate, format_table, open_bundle, open_checkpoints

    if threads:
        import torch

        torch.set_num_threads(threads)
    models = []
    if any(ckpt.get(k) for k in CHECKPOINT_OPTIONS):
        given = checkpoint_sources(ckpt, "the fp32 reference")
        models.append(open_checkpoints(**given, preset=ckpt.get("preset") or "demo", image_size=ckpt.get("image_size")))
    models += [open_bundle(b, threads) for b in bundles]
    if not models:
        models.append(open_bundle(None, threads))
    results = [evaluate(m, images, seed, progress=_progress(m.label)) for m in models]
    if as_json:
        click.echo(json.dumps({"images": images, "seed": seed, "results": results}))
    else:
        click.echo(f"{images} held-out scenes (seed {seed}), greedy; percentages")
        click.echo(format_table(results))


def _progress(label: str):
    """A progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(desc=label, file=sys.stderr, unit="scene")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update

"""``tinyv`` command line. Only parsing and printing here; torch loads when a command runs."""
from __future__ import annotations

import json
import os
import sys

import click

from tinyv._version import __version__

DEBUG_ENV = "TINYV_DEBUG"
CHECKPOINT_OPTIONS = ("phi2", "vit", "qformer", "stage")


class TinyVGroup(click.Group):
    """Turns TinyVError into one line on stderr and exit code 1 (traceback with TINYV_DEBUG=1)."""

    def invoke(self, ctx):
        from tinyv.engine.errors import TinyVError

        try:
            return super().invoke(ctx)
        except TinyVError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException(str(e)) from None
        except MemoryError:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException("out of memory; close other programs or use a smaller model") from None


@click.group(cls=TinyVGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyv")
def cli():
    """tinyv: TinyGPT-V on a laptop CPU. Set TINYV_DEBUG=1 for tracebacks."""


def _checkpoint_options(f):
    opts = [
        click.option("--phi2", help="Phi-2 folder (transformers format), or hf://owner/repo."),
        click.option("--vit", help="eva_vit_g.pth, or an hf:// / https:// name."),
        click.option("--qformer", help="blip2_pretrained_flant5xxl.pth, or an hf:// / https:// name."),
        click.option("--stage", help="TinyGPT-V stage checkpoint, e.g. TinyGPT-V_for_Stage4.pth."),
        click.option(
            "--preset",
            type=click.Choice(["stage4", "stage3", "tiny", "tiny-stage3", "small"]),
            help="Vision/Q-Former architecture of the checkpoints (default: the real TinyGPT-V).",
        ),
        click.option("--image-size", type=click.IntRange(14, 4480), help="Input resolution (448 stage 4, 224 stages 1-3)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_model(opts: dict, echo=None):
    """The model named by the checkpoint options, or the random-weights default when none are given."""
    from tinyv.engine.errors import TinyVError
    from tinyv.engine.model import TinyGPTV

    given = {k: opts.get(k) for k in CHECKPOINT_OPTIONS}
    if not any(given.values()):
        from tinyv.engine.default import random_default_checkpoints

        paths, note = random_default_checkpoints()
        if echo:
            echo(note)
        return TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset="tiny")
    missing = [f"--{k}" for k, v in given.items() if not v]
    if missing:
        raise TinyVError(f"missing {', '.join(missing)}: a TinyGPT-V model needs --phi2, --vit, --qformer and --stage")
    return TinyGPTV.from_checkpoints(**given, image_size=opts.get("image_size"), preset=opts.get("preset"))


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--question", "-q", help="Ask this instead of asking for a caption.")
@click.option("--prompt", help="Raw prompt with <ImageHere> (overrides the template and --question).")
@_checkpoint_options
@click.option("--greedy/--sample", default=True, show_default=True, help="Greedy decoding or sampling.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.6, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, timings).")
def caption(image, question, prompt, greedy, temperature, top_p, repetition_penalty, seed, max_new_tokens, as_json, **ckpt):
    """Caption IMAGE (or answer --question about it), streaming the answer."""
    err = lambda msg: click.echo(msg, err=True)  # noqa: E731
    model = load_model(ckpt, echo=err)
    steps = model.stream(
        image,
        prompt,
        question=question,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    text, tokens, last = "", [], None
    started = False
    for step in steps:
        tokens.append(step.token)
        piece = step.text
        if not started:  # the answer usually begins with a space
            piece = piece.lstrip()
            started = bool(piece)
        text += piece
        last = step
        if not as_json and piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    text = text.rstrip()
    if as_json:
        out = {"image": image, "text": text, "tokens": tokens, "finish_reason": last.finish_reason, "timings": last.timings}
        click.echo(json.dumps(out))
    else:
        click.echo()


def main():  # console-script entry point
    cli(prog_name="tinyv")


if __name__ == "__main__":
    main()

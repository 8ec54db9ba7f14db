"""``tinyv`` command line. Only parsing and printing here; torch loads when a command runs."""
from __future__ import annotations

import json
import os
import sys

import click

from tinyv._version import __version__
from tinyv.engine.config import PRESET_NAMES

DEBUG_ENV = "TINYV_DEBUG"
CHECKPOINT_OPTIONS = ("phi2", "vit", "qformer", "stage")


class TinyVGroup(click.Group):
    """Turns TinyVError into one line on stderr and exit code 1 (traceback with TINYV_DEBUG=1)."""

    def invoke(self, ctx):
        from tinyv.errors import TinyVError

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


def checkpoint_options(f):
    opts = [
        click.option("--phi2", help="Phi-2 folder (transformers format), or hf://owner/repo."),
        click.option("--vit", help="eva_vit_g.pth, or an hf:// / https:// name."),
        click.option("--qformer", help="blip2_pretrained_flant5xxl.pth, or an hf:// / https:// name."),
        click.option("--stage", help="TinyGPT-V stage checkpoint, e.g. TinyGPT-V_for_Stage4.pth."),
        click.option(
            "--preset",
            type=click.Choice(PRESET_NAMES),
            help="Vision/Q-Former architecture of the checkpoints (default: the real TinyGPT-V).",
        ),
        click.option("--image-size", type=click.IntRange(14, 4480), help="Input resolution (448 stage 4, 224 stages 1-3)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def checkpoint_sources(opts: dict, needed_for: str) -> dict:
    """The four checkpoint options, all given (else one error naming the missing ones)."""
    from tinyv.errors import TinyVError

    given = {k: opts.get(k) for k in CHECKPOINT_OPTIONS}
    missing = [f"--{k}" for k, v in given.items() if not v]
    if missing:
        raise TinyVError(f"missing {', '.join(missing)}: {needed_for} needs --phi2, --vit, --qformer and --stage")
    return given


def main():  # console-script entry point
    cli(prog_name="tinyv")


# commands live one group per module; importing them registers them (they import only click)
from tinyv.cli import bench, bundle_cmds, cache_cmds, eval_cmd, run, serve  # noqa: E402,F401

if __name__ == "__main__":  # python -m tinyv.cli.main: run the registered module, not this copy
    from tinyv.cli.main import main as _main

    _main()

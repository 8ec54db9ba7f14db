"""``tinyv`` command line. Only parsing and printing here; torch loads when a command runs."""
from __future__ import annotations

import errno
import json
import os
import sys

import click

from tinyv._version import __version__
from tinyv.engine.config import PRESET_NAMES

DEBUG_ENV = "TINYV_DEBUG"
CHECKPOINT_OPTIONS = ("phi2", "vit", "qformer", "stage")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs (``main``)."""


def one_line(text) -> str:
    """``text`` as one printable line: line breaks, other control characters and undecodable
    bytes (from odd file names) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class TinyVGroup(click.Group):
    """Turns TinyVError (and interrupts, and errors of the operating system) into one line on
    stderr: exit 1, or 130 for Ctrl-C and 143 for SIGTERM (the shell's numbers); the traceback
    with TINYV_DEBUG=1."""

    def invoke(self, ctx):
        from tinyv.errors import TinyVError

        debug = os.environ.get(DEBUG_ENV) == "1"
        try:
            return super().invoke(ctx)
        except TinyVError as e:
            if debug:
                raise
            raise click.ClickException(one_line(e)) from None
        except MemoryError:
            if debug:
                raise
            raise click.ClickException("out of memory; close other programs or use a smaller model") from None
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            click.echo(f"tinyv: {'terminated' if terminated else 'interrupted'}", err=True)
            ctx.exit(143 if terminated else 130)
        except BrokenPipeError:
            raise  # click ends quietly: the reader (e.g. `head`) has all it wanted
        except OSError as e:
            if debug:
                raise
            raise click.ClickException(one_line(_os_error(e))) from None


def _os_error(e: OSError) -> str:
    """One line for an OSError: a file's names it; one with no file is most likely the output."""
    if e.filename:
        return f"{e.strerror or e}: {e.filename}"
    if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG):
        return f"cannot write the output ({e.strerror})"
    return str(e.strerror or e)


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


class GpuMemory(click.ParamType):
    """``8GB``, ``7.5GB``, ``6000MB`` -> bytes (GB = GiB, as a GPU's memory is counted)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from tinyv.engine.gpu_plan import parse_memory
        from tinyv.errors import TinyVError

        if isinstance(value, int):
            return value
        try:
            return parse_memory(value)
        except TinyVError as e:
            self.fail(str(e), param, ctx)


def device_options(f):
    opts = [
        click.option("--device", type=click.Choice(("cpu", "cuda", "auto")), default="cpu", show_default=True,
                     help="Where the bundle runs: cuda puts the LLM on the GPU through bitsandbytes "
                          "(pip install 'tinyv[gpu]'); auto picks cuda when usable and the budget fits."),
        click.option("--max-gpu-memory", type=GpuMemory(), default="8GB", show_default=True,
                     help="GPU memory budget; the plan (LLM, vision, KV cache) is decided from it before loading."),
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
    """Run the command; SIGTERM cleans up as Ctrl-C does; output that cannot be written (a full disk,
    /dev/full) ends with one line, not a traceback at exit."""
    import signal
    import warnings

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")  # Pillow's notes on odd files: tinyv reports what matters
    try:
        cli(prog_name="tinyv")
        code = 0
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()  # here, not at interpreter exit where a failure prints a traceback-like note
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not code:  # a failure already reported says enough
            click.echo(f"Error: cannot write the output ({e.strerror or e})", err=True)
            code = 1
    sys.exit(code)


def use_tinyv_image_limit() -> None:
    """The command owns its process: Pillow's own decompression-bomb check (a raw warning over 89
    megapixels, an error over 179 whatever TINYV_MAX_IMAGE_PIXELS says) gives way to tinyv's."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


# commands live one group per module; importing them registers them (they import only click)
from tinyv.cli import bench, bundle_cmds, cache_cmds, eval_cmd, push_cmd, run, serve  # noqa: E402,F401

if __name__ == "__main__":  # python -m tinyv.cli.main: run the registered module, not this copy
    from tinyv.cli.main import main as _main

    _main()

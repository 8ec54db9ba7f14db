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


class StageProgress:
    """One progress bar per export stage, on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.stage, self.bar = enabled, None, None
        self.tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tty:  # a log, not a terminal: one line per finished stage
            if done >= total and stage != self.stage:
                click.echo(f"{stage}: done", err=True)
                self.stage = stage
            return
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage:<16}", file=sys.stderr, leave=True,
                            bar_format="{desc} {bar:30} {n_fmt}/{total_fmt} [{elapsed}]")
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command("export")
@_checkpoint_options
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True, help="LLM weight bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True)
@click.option("--vision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Precision of the fused vision graph.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at -o.")
@click.option("--min-sqnr", type=float, help="Fail if any quantized layer's SQNR (dB) is below this.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Fail if greedy agreement with fp32 is below this.")
@click.option("--max-kl", type=click.FloatRange(min=0), help="Fail if the mean next-token KL vs fp32 exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export_cmd(bits, group_size, vision, output, force, min_sqnr, min_agreement, max_kl, as_json, **ckpt):
    """Export checkpoints to a quantized bundle (vision ONNX + quantized Phi-2)."""
    from tinyv.engine.errors import TinyVError

    given = {k: ckpt.get(k) for k in CHECKPOINT_OPTIONS}
    missing = [f"--{k}" for k, v in given.items() if not v]
    if missing:
        raise TinyVError(f"missing {', '.join(missing)}: export needs --phi2, --vit, --qformer and --stage")
    from tinyv.export.bundle import export_bundle

    bar = StageProgress(enabled=True)
    try:
        m = export_bundle(**given, out=output, bits=int(bits), group_size=int(group_size), vision=vision,
                          image_size=ckpt.get("image_size"), preset=ckpt.get("preset"), min_sqnr=min_sqnr,
                          min_agreement=min_agreement, max_kl=max_kl, force=force, progress=bar)
    finally:
        bar.close()
    summary = export_summary(output, m)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        q = summary["quality"]
        click.echo(f"wrote {output}: {summary['size_mb']:.1f} MB in {summary['seconds']:.1f} s")
        click.echo(f"vision {vision}: cosine vs fp32 {summary['vision_cosine']:.6f}")
        click.echo(f"LLM {bits}-bit: layer SQNR min {q['sqnr_min_db']:.1f} dB mean {q['sqnr_mean_db']:.1f} dB; "
                   f"KL mean {q['kl_mean']:.4f} max {q['kl_max']:.4f}; greedy agreement "
                   f"{q['token_agreement']:.1%} over {q['steps']} tokens")


def export_summary(output: str, m: dict) -> dict:
    q = m["quality"]
    return {
        "bundle": output,
        "bits": m["quantization"]["bits"],
        "group_size": m["quantization"]["group_size"],
        "vision": m["vision"]["precision"],
        "files": {k: v["size"] for k, v in m["files"].items()},
        "size_mb": sum(v["size"] for v in m["files"].values()) / 1e6,
        "seconds": m["export_timings"]["total_s"],
        "timings": m["export_timings"],
        "vision_cosine": m["vision"]["verify"]["cosine_min"],
        "vision_max_abs_err": m["vision"]["verify"]["max_abs_err"],
        "quality": {
            "sqnr_min_db": q["sqnr_db"]["min"], "sqnr_mean_db": q["sqnr_db"]["mean"],
            "kl_mean": q["kl_mean"], "kl_max": q["kl_max"], "token_agreement": q["token_agreement"],
            "steps": q["steps"],
        },
    }


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(bundle, verify, as_json):
    """Describe a bundle (and check its files)."""
    from tinyv.engine.bundle import format_manifest, read_manifest

    m = read_manifest(bundle, verify=verify)
    if as_json:
        click.echo(json.dumps(m, indent=2))
    else:
        click.echo(format_manifest(m))
        click.echo("files verified (sha256)" if verify else "file sizes checked (add --verify for sha256)")


def main():  # console-script entry point
    cli(prog_name="tinyv")


if __name__ == "__main__":
    main()

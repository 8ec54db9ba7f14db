"""tinyv caption / ask / chat: run a bundle (or the fp32 reference model) on images."""
from __future__ import annotations

import json
import os
import sys

import click

from tinyv.cli.main import (CHECKPOINT_OPTIONS, checkpoint_options, checkpoint_sources, cli, device_options,
                             one_line, use_tinyv_image_limit)

STDIN = "-"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def expand_images(paths) -> list[str]:
    """Files as given; folders become their image files (sorted, not recursive); ``-`` (stdin) once."""
    from tinyv.errors import TinyVError

    out = []
    for p in paths:
        if p != STDIN and os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith("."))
            if not found:
                raise TinyVError(f"{one_line(p)} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out.extend(found)
        else:
            out.append(p)
    if out.count(STDIN) > 1:
        raise TinyVError("- (the image from stdin) can be given only once")
    return out


def read_stdin_image() -> bytes:
    """The image piped to stdin (``tinyv caption -``)."""
    from tinyv.errors import TinyVError

    how = "pipe an image in, e.g. cat photo.jpg | tinyv caption -"
    if sys.stdin is None or sys.stdin.isatty():
        raise TinyVError(f"- reads the image from stdin, but stdin is a terminal; {how}")
    data = sys.stdin.buffer.read()
    if not data:
        raise TinyVError(f"- reads the image from stdin, but stdin is empty; {how}")
    return data


def check_question(question, prompt) -> None:
    """Fail before loading anything on a question or prompt that is not text."""
    from tinyv.engine.prompts import check_text

    if question is not None:
        check_text(question, "the question")
    if prompt is not None:
        check_text(prompt, "the prompt")


def open_model(opts: dict, one_shot: bool = False):
    """The bundle engine, or the fp32 reference model when checkpoint options are given: both
    answer ``stream(image, question, task=..., prompt=..., **options)``. ``one_shot``: the engine
    will answer once (``Engine.load``: the vision graph and the language model resident in turn)."""
    from tinyv.errors import TinyVError

    use_tinyv_image_limit()
    if not any(opts.get(k) for k in CHECKPOINT_OPTIONS):
        import tinyv

        return tinyv.load(opts.get("bundle"), threads=opts.get("threads"), announce=_err,
                          device=opts.get("device", "cpu"), max_gpu_memory=opts.get("max_gpu_memory", "8GB"),
                          one_shot=one_shot)
    if opts.get("bundle"):
        raise TinyVError("give either --bundle or the checkpoint options (--phi2 ...), not both")
    if opts.get("device", "cpu") != "cpu":
        raise TinyVError("--device runs bundles; the fp32 model from checkpoint files runs on the CPU "
                         "(export a bundle for the GPU: tinyv export --help)")
    given = checkpoint_sources(opts, "a TinyGPT-V model")
    from tinyv.export.reference import TinyGPTV

    if opts.get("threads"):
        import torch

        torch.set_num_threads(opts["threads"])
    return TinyGPTV.from_checkpoints(**given, image_size=opts.get("image_size"), preset=opts.get("preset"))


def run_options(f):
    opts = [
        click.option("--bundle", "-b", help="Bundle: a folder from `tinyv export` or hf://owner/repo[@revision] "
                     "(default: the built-in model)."),
        click.option("--greedy/--sample", default=True, show_default=True, help="Greedy decoding or sampling."),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.6, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, help="Seed for sampling."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=100, show_default=True),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's choice)."),
        click.option("--json", "as_json", is_flag=True, help="JSON output (one line per image)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return checkpoint_options(device_options(f))


def _sampling(kw: dict) -> dict:
    return {k: kw.pop(k) for k in ("greedy", "temperature", "top_p", "repetition_penalty", "seed", "max_new_tokens")}


def _consume(steps, echo: bool):
    """Drain a stream; print deltas as they come if ``echo``. Returns (text, tokens, last step)."""
    text, tokens, last, started = "", [], None, False
    for step in steps:
        tokens.append(step.token)
        piece = step.text
        if not started:  # the answer usually begins with a space
            piece = piece.lstrip()
            started = bool(piece)
        text += piece
        last = step
        if echo and piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    return text.rstrip(), tokens, last


def _record(image, text, tokens, last) -> dict:
    return {"image": image, "text": text, "tokens": tokens, "finish_reason": last.finish_reason, "timings": last.timings}


def run_images(images, question, task, prompt, as_json, opts):
    """Answer for every image: stream one; for many, a line each (a progress bar on a terminal),
    going on past an image that fails (reported on stderr, and as an error record with --json),
    and failing at the end."""
    from tinyv.errors import TinyVError

    check_question(question, prompt)
    sampling = _sampling(opts)
    images = expand_images(images)
    stdin = read_stdin_image() if STDIN in images else None
    model = open_model(opts, one_shot=len(images) == 1)

    def answer(image, echo):
        source = stdin if image == STDIN else image
        return _consume(model.stream(source, question, task=task, prompt=prompt, **sampling), echo=echo)

    if len(images) == 1:
        text, tokens, last = answer(images[0], echo=not as_json)
        click.echo(json.dumps(_record(images[0], text, tokens, last)) if as_json else "")
        return
    from tqdm import tqdm

    failed = 0
    for image in tqdm(images, desc="images", file=sys.stderr, disable=not sys.stderr.isatty()):
        try:
            text, tokens, last = answer(image, echo=False)
        except TinyVError as e:
            failed += 1
            tqdm.write(f"{one_line(image)}: error: {one_line(e)}", file=sys.stderr)
            if as_json:
                click.echo(json.dumps({"image": image, "error": str(e)}))
            continue
        click.echo(json.dumps(_record(image, text, tokens, last)) if as_json else f"{one_line(image)}: {text}")
    if failed:
        raise TinyVError(f"{failed} of {len(images)} images failed (see above)")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, allow_dash=True))
@click.option("--question", "-q", help="Ask this instead of asking for a caption.")
@click.option("--prompt", help="Raw prompt with <ImageHere> (overrides the template and --question).")
@run_options
def caption(images, question, prompt, as_json, **opts):
    """Caption IMAGES (files, folders, or - for stdin), streaming the answer for one image."""
    run_images(images, question, "caption", prompt, as_json, opts)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, allow_dash=True))
@click.argument("question")
@run_options
def ask(images, question, as_json, **opts):
    """Answer QUESTION about each of IMAGES (- for stdin) with the VQA template (short answers)."""
    from tinyv.errors import TinyVError

    if not question.strip():
        raise TinyVError("the question is empty")
    run_images(images, question, "vqa", None, as_json, opts)


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@run_options
def chat(image, as_json, **opts):
    """Ask questions about IMAGE one after another; the image is encoded once. Empty line or EOF ends.

    A question that fails (too long, not UTF-8) is reported and the next one read; the command
    then fails at the end."""
    from tinyv.errors import TinyVError

    sampling = _sampling(opts)
    if any(opts.get(k) for k in CHECKPOINT_OPTIONS):
        raise TinyVError("chat runs a bundle: pass --bundle (or nothing, for the built-in model)")
    if image == STDIN:
        raise TinyVError("chat reads its questions from stdin, so the image must be a file")
    model = open_model(opts)
    model.encode_image(image)  # a bad image is one error now, not one per question
    session = model.session(image)
    tty = sys.stdin.isatty()
    asked = failed = 0
    while True:
        if tty:
            click.echo("> ", nl=False, err=True)
        # bytes, decoded here: a line that is not UTF-8 is that question's error, not the session's end
        line = sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")
        if not line or not line.strip() or line.strip() in ("quit", "exit"):
            break
        question, asked = line.strip(), asked + 1
        try:
            text, tokens, last = _consume(session.stream(question, **sampling), echo=not as_json)
        except TinyVError as e:
            failed += 1
            click.echo(f"error: {one_line(e)}", err=True)
            if as_json:
                click.echo(json.dumps({"question": question, "error": str(e)}))
            continue
        click.echo(json.dumps({"question": question, **_record(image, text, tokens, last)}) if as_json else "")
    if failed:
        raise TinyVError(f"{failed} of {asked} questions failed (see above)")

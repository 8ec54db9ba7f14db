"""tinyv serve: the model behind an OpenAI-compatible HTTP API, for apps (needs tinyv[serve])."""
from __future__ import annotations

import os

import click

from tinyv.cli.main import cli

DEMO_MODEL_ID = "tinyv-demo"


def model_id(bundle: str | None) -> str:
    """The model name clients see: the bundle folder's name (the built-in model's for none)."""
    return os.path.basename(os.path.normpath(bundle)) if bundle else DEMO_MODEL_ID


@cli.command()
@click.option("--bundle", "-b", type=click.Path(exists=True, file_okay=False),
              help="Bundle from `tinyv export` (default: the built-in model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="TINYV_API_KEY", help="Clients must send Authorization: Bearer KEY "
              "(or set TINYV_API_KEY, which keeps it out of the process list).")
@click.option("--max-batch", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Answers decoded together; more requests wait for a place.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's choice).")
@click.option("--allow-url-images", is_flag=True, help="Also fetch http(s):// image URLs (off: a web page "
              "could make the server fetch from your network).")
@click.option("--allow-file-images", is_flag=True, help="Also read file:// image URLs (off: a web page could "
              "make the server read local files).")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Largest request body (413 above it).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True)
def serve(bundle, host, port, api_key, max_batch, threads, allow_url_images, allow_file_images, max_body_mb,
          max_image_pixels):
    """Serve the model over HTTP in OpenAI's Chat Completions shape (POST /v1/chat/completions,
    GET /v1/models, GET /health); requests arriving together are decoded in one batch."""
    from tinyv.errors import TinyVError

    try:
        from tinyv.serve.app import ServerSettings
        from tinyv.serve.images import ImagePolicy
        from tinyv.serve.server import is_loopback, serve_forever
    except ImportError as e:
        raise TinyVError(f"tinyv serve needs its extra ({e.name} is missing): pip install 'tinyv[serve]'") from None
    if not is_loopback(host) and not api_key:
        raise TinyVError(f"--host {host} lets other machines reach the model: pass --api-key KEY (or set "
                         "TINYV_API_KEY) so that only clients sending it get answers")
    if api_key is not None and not api_key.strip():
        raise TinyVError("the API key is empty")
    import tinyv

    engine = tinyv.load(bundle, threads=threads, announce=lambda line: click.echo(line, err=True))
    settings = ServerSettings(
        model=model_id(bundle), api_key=api_key, max_batch=max_batch, max_body_bytes=int(max_body_mb * (1 << 20)),
        images=ImagePolicy(allow_http=allow_url_images, allow_file=allow_file_images, max_pixels=max_image_pixels,
                           max_bytes=int(max_body_mb * (1 << 20))),
        allowed_hosts=None if not is_loopback(host) else ServerSettings().allowed_hosts)
    serve_forever(engine, settings, host, port, announce=lambda line: click.echo(line, err=True))

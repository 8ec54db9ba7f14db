"""tinyv cache info / clear: the image-embedding cache."""
from __future__ import annotations

import json

import click

from tinyv.cli.main import cli


@cli.group()
def cache():
    """The on-disk cache of image embeddings."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True)
def cache_info(as_json):
    """Where the cache is, how many entries and bytes."""
    from tinyv.engine.cache import EmbeddingCache, default_cache_folder

    info = EmbeddingCache(default_cache_folder()).info()
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"{info['folder']}: {info['entries']} entries, {info['bytes'] / 1e6:.2f} MB "
                   f"(bound {info['max_bytes'] / 1e6:.0f} MB)")


@cache.command("clear")
def cache_clear():
    """Remove every cached image embedding."""
    from tinyv.engine.cache import EmbeddingCache, default_cache_folder

    n = EmbeddingCache(default_cache_folder()).clear()
    click.echo(f"removed {n} entries")

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
    info = _cache().info()
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"{info['folder']}: {info['entries']} entries, {info['bytes'] / 1e6:.2f} MB "
                   f"(bound {info['max_bytes'] / 1e6:.0f} MB)")


@cache.command("clear")
def cache_clear():
    """Remove every cached image embedding."""
    n = _cache().clear()
    click.echo(f"removed {n} entries")


def _cache():
    """The default cache; a folder that cannot be used is an error here (running, it is reported
    once and embeddings stay in memory)."""
    from tinyv.engine.cache import EmbeddingCache, default_cache_folder
    from tinyv.engine.paths import folder_problem
    from tinyv.errors import TinyVError

    folder = default_cache_folder()
    problem = folder_problem(folder)
    if problem:
        raise TinyVError(f"the image cache {folder} cannot be used ({problem}); set TINYV_CACHE to a writable folder")
    return EmbeddingCache(folder)

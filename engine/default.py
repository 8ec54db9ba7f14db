"""The default model when the user names none.

Until the trained demo model ships (its own issue), this is a tiny model with random weights that
tinyv writes once into its cache — checkpoints in the real formats, and a bundle exported from
them — so the whole pipeline runs, and the user is told plainly that the words are noise.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from tinyv.engine.paths import cache_dir

DEFAULT_NAME = "random-tiny-v2"
NOTE = (
    "tinyv: no model given, so this runs a tiny model with RANDOM weights: the pipeline is real, "
    "the words are noise. For TinyGPT-V, export a bundle (tinyv export --help) and pass --bundle, "
    "or pass --phi2, --vit, --qformer and --stage."
)


def _once(folder: str, make) -> None:
    """Create ``folder`` with ``make(tmp)`` atomically (another process may race us)."""
    if os.path.isdir(folder):
        return
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        make(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _config():
    """The tiny preset with its vocabulary cut to the demo tokenizer's 400 entries, so the random
    model's output is visible noise rather than ids that decode to nothing."""
    import dataclasses

    from tinyv.engine.config import preset

    cfg = preset("tiny")
    return cfg.replace(phi=dataclasses.replace(cfg.phi, vocab_size=400))


def random_default_checkpoints():
    """(CheckpointPaths, note): tiny random checkpoints, written once and reused."""
    from tinyv.testing import CheckpointPaths, write_checkpoints

    folder = os.path.join(cache_dir(), DEFAULT_NAME, "checkpoints")
    _once(folder, lambda tmp: write_checkpoints(tmp, _config(), seed=0))
    paths = CheckpointPaths(
        phi2=os.path.join(folder, "phi-2"),
        vit=os.path.join(folder, "eva_vit_g.pth"),
        qformer=os.path.join(folder, "blip2_pretrained_flant5xxl.pth"),
        stage=os.path.join(folder, "TinyGPT-V_for_Stage4.pth"),
    )
    return paths, NOTE


def default_bundle():
    """(bundle folder, note): the 4-bit bundle of the tiny random model, exported once."""
    paths, note = random_default_checkpoints()
    folder = os.path.join(cache_dir(), DEFAULT_NAME, "bundle-q4")

    def make(tmp):
        from tinyv.export.bundle import export_bundle

        export_bundle(**paths.as_kwargs(), out=os.path.join(tmp, "b"), preset="tiny", bits=4)
        for name in os.listdir(os.path.join(tmp, "b")):
            os.rename(os.path.join(tmp, "b", name), os.path.join(tmp, name))
        os.rmdir(os.path.join(tmp, "b"))

    _once(folder, make)
    return folder, note

"""The default model when the user names none.

Until the trained demo model ships (its own issue), this is a tiny model with random weights that
tinyv writes once into its cache, in the real checkpoint formats: the whole pipeline runs, and the
user is told plainly that the words are noise.
"""
from __future__ import annotations

import os
import shutil
import tempfile

DEFAULT_NAME = "random-tiny-v1"
NOTE = (
    "tinyv: no model given, so this runs a tiny model with RANDOM weights: the pipeline is real, "
    "the words are noise. For TinyGPT-V pass --phi2, --vit, --qformer and --stage "
    "(e.g. --stage hf://Tyrannosaurus/TinyGPT-V/TinyGPT-V_for_Stage4.pth)."
)


def random_default_checkpoints():
    """(CheckpointPaths, note): tiny random checkpoints, written once and reused."""
    from tinyv.export.hub import cache_dir
    from tinyv.testing import CheckpointPaths, write_checkpoints

    folder = os.path.join(cache_dir(), DEFAULT_NAME)
    paths = CheckpointPaths(
        phi2=os.path.join(folder, "phi-2"),
        vit=os.path.join(folder, "eva_vit_g.pth"),
        qformer=os.path.join(folder, "blip2_pretrained_flant5xxl.pth"),
        stage=os.path.join(folder, "TinyGPT-V_for_Stage4.pth"),
    )
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-", dir=os.path.dirname(folder))
        try:
            write_checkpoints(tmp, "tiny", seed=0)
            try:
                os.rename(tmp, folder)  # atomic; another process may have won the race
            except OSError:
                if not os.path.isdir(folder):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths, NOTE

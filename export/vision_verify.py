"""Checking an exported vision graph against the torch model: probe images, run, compare.

Every export is run on ``probe_images()`` and compared with ``model.encode_pixels`` before it
is moved into place. Torch reference embeddings are computed before any ONNX Runtime session
exists; a graph too large to hold beside the torch model is checked piece by piece.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tinyv.engine.vision_onnx import open_session
from tinyv.errors import TinyVError
from tinyv.export.memory import release_memory
from tinyv.export.onnx_pieces import run_in_pieces
from tinyv.export.vision_trace import INPUT, OUTPUT

_VERIFY_BATCH = 2  # probes per ONNX Runtime run: exercises the batch axis; 4 at once cost ViT-g
# another 1.3 GB of activations and ran no faster


def probe_images(n: int = 4, size: int = 224, seed: int = 0) -> list:
    """``n`` deterministic RGB test images: shapes on coloured backgrounds, a gradient, noise.

    Flat areas, edges, smooth ramps and high frequencies: a graph that matches the torch model
    on these computes the same function.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 3):  # shapes on a coloured background
            img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            d = ImageDraw.Draw(img)
            for _ in range(3 + kind):
                x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
                w, h = (int(v) for v in rng.integers(size // 8, size // 3 + 1, 2))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                shape = int(rng.integers(0, 3))
                if shape == 0:
                    d.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
                elif shape == 1:
                    d.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
                else:
                    d.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=fill)
        elif kind == 1:  # a diagonal two-colour gradient
            t = np.linspace(0.0, 1.0, size)
            ramp = ((t[:, None] + t[None, :]) / 2)[..., None]  # [S, S, 1]
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = Image.fromarray((a * (1 - ramp) + b * ramp).round().astype(np.uint8), "RGB")
        else:  # uniform noise
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        images.append(img)
    return images


def verify_graph(path: str, pixels: torch.Tensor, reference: np.ndarray, whole: bool = True) -> dict:
    """Run the graph on the probe batch and compare with the torch embeddings.

    ``whole=False`` (large fp32 graphs): ONNX Runtime loads the whole file without touching the
    weights (no prepacking, the data file is mapped), then the numbers come from running it
    piece by piece, so no more than a piece of weights is ever in memory beside the torch model.
    """
    t0 = time.perf_counter()
    if whole:
        session = open_session(path)
        t1 = time.perf_counter()
        runs = [session.run([OUTPUT], {INPUT: x.numpy()})[0] for x in pixels.split(_VERIFY_BATCH)]
        out = np.concatenate(runs)
        pieces = 1
        del session
    else:
        open_session(path, prepack=False, arena=False)  # the file loads: graph valid, data file found
        t1 = time.perf_counter()
        out, pieces = run_in_pieces(path, {INPUT: pixels.numpy()})
    t2 = time.perf_counter()
    release_memory()
    if out.shape != reference.shape:
        raise TinyVError(
            f"the exported vision graph returned shape {list(out.shape)}, expected {list(reference.shape)}"
        )
    return {
        "probes": int(reference.shape[0]),
        **compare(out, reference),
        "seconds": t2 - t1,
        "load_seconds": t1 - t0,
        "pieces": pieces,
    }


def compare(out: np.ndarray, reference: np.ndarray) -> dict:
    """Per-image cosine of the flattened embeddings (min over images) and the max abs error."""
    a = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
    b = np.asarray(reference, dtype=np.float64).reshape(reference.shape[0], -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"cosine_min": float(cos.min()), "max_abs_err": float(np.abs(a - b).max())}

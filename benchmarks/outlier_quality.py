"""Quantization quality with and without planted massive activations (tinyv.testing outliers=N).

    python benchmarks/outlier_quality.py [--preset small] [--outliers 4]

Random weights have no outlier channels, so they flatter int8 activations; real Phi-2 and ViTs
have a few. For each precision this exports a bundle from plain and from outlier-planted
checkpoints of the same seed and prints what the export measured against fp32: the LLM's worst
per-layer weight SQNR, KL and greedy-token agreement, and the vision graph's cosine (ONNX Runtime,
whole graph); and the worst cosine of the graph as the engine runs it (``runtime_cosine_min``: the
ViT trunk on the C kernels where this CPU has them, ``engine/vision_native.py``) against the fp32
torch model on 8 probe images.
"""
import argparse
import json
import os
import tempfile

import numpy as np
import torch

from tinyv.engine.image import preprocess
from tinyv.engine.vision_native import open_vision_graph
from tinyv.export.bundle import export_bundle
from tinyv.export.reference import TinyGPTV
from tinyv.export.vision import probe_images
from tinyv.testing import write_checkpoints

PRECISIONS = [(4, "fp32"), (8, "fp32"), (4, "int8")]


def runtime_cosine_min(model: TinyGPTV, bundle: str) -> float:
    """The worst per-image cosine of the bundle's graph, run as the engine runs it, against torch fp32."""
    size = model.config.image_size
    pixels = torch.cat([preprocess(im, size) for im in probe_images(8, size)])
    graph = open_vision_graph(os.path.join(bundle, "vision.onnx"), None, 2, ("CPUExecutionProvider",), None)
    got = graph.run(None, {"pixel_values": pixels.numpy()})[0].reshape(len(pixels), -1).astype(np.float64)
    want = model.encode_pixels(pixels).numpy().reshape(len(pixels), -1).astype(np.float64)
    return float((np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min())


def measure(paths, preset: str, bits: int, vision: str, out: str) -> dict:
    m = export_bundle(**paths.as_kwargs(), out=out, preset=preset, bits=bits, vision=vision)
    q, v = m["quality"], m["vision"]
    model = TinyGPTV.from_checkpoints(**paths.as_kwargs(), preset=preset)
    return {"bits": bits, "vision": vision, "sqnr_min_db": round(q["sqnr_db"]["min"], 2),
            "kl_mean": q["kl_mean"], "token_agreement": q["token_agreement"],
            "vision_cosine_min": (v.get("int8") or v["verify"]).get("cosine_min", v["verify"]["cosine_min"]),
            "runtime_cosine_min": runtime_cosine_min(model, out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--outliers", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for planted in (0, args.outliers):
            paths = write_checkpoints(os.path.join(tmp, f"ck{planted}"), args.preset, seed=0, outliers=planted)
            for bits, vision in PRECISIONS:
                out = os.path.join(tmp, f"b{planted}-{bits}-{vision}")
                rows.append({"outliers": planted, **measure(paths, args.preset, bits, vision, out)})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
